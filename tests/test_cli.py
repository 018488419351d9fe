"""``mmsched bench fanout`` end to end, small: the counts it reports are measured, not assumed."""

from __future__ import annotations

import json
from pathlib import Path

from mmsched.cli import main

FIELDS = {
    "strategy",
    "transport",
    "tp",
    "size_mb",
    "latency_ms",
    "cpu_ms_per_request",
    "hash_ms_per_request",
    "hashes_per_request",
    "encoded_bytes",
    "ranks_identical",
}


def test_bench_fanout_small(tmp_path: Path) -> None:
    out = tmp_path / "fanout.json"
    args = ["--tp", "2", "--sizes", "1", "--requests", "3", "--warmup", "1"]
    code = main(["bench", "fanout", *args, "--transports", "shm", "--json", str(out)])
    assert code == 0
    records = json.loads(out.read_text())
    # Every strategy on every transport asked for.
    pairs = {(r["strategy"], r["transport"]) for r in records}
    assert pairs == {(s, "shm") for s in ("per-rank", "entry-broadcast", "tokenizer", "zero-copy")}
    # The OS counts CPU in 10 ms ticks: one tiny row may read 0, the whole run cannot.
    assert sum(r["cpu_ms_per_request"] for r in records) > 0
    by_strategy = {r["strategy"]: r for r in records if r["transport"] == "shm"}
    for r in records:
        assert set(r) >= FIELDS
        assert r["ranks_identical"] is True
        assert r["latency_ms"]["p50"] > 0 and r["latency_ms"]["p99"] >= r["latency_ms"]["p50"]
        assert r["cpu_ms_per_request"] >= 0
        assert r["encoded_bytes"] > 990_000  # 1 MB of pixel values, rounded to whole patches
        assert r["floor_ms"] > 0
    assert by_strategy["per-rank"]["hashes_per_request"] == 2
    assert by_strategy["entry-broadcast"]["hashes_per_request"] == 1
    assert by_strategy["tokenizer"]["hashes_per_request"] == 1
    assert by_strategy["zero-copy"]["hashes_per_request"] == 1


def test_unknown_strategy_is_an_error(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["bench", "fanout", "--strategies", "fastest"]) == 2
    assert "unknown strategy 'fastest'" in capsys.readouterr().out
