"""``mmsched bench load`` end to end, small: open-loop arrivals, every field measured."""

from __future__ import annotations

import json
from pathlib import Path

from mmsched.cli import main


def test_bench_load_small(tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    args = ["--tp", "2", "--rates", "8,16", "--requests", "16", "--model-step-ms", "1"]
    pick = ["--strategy", "tokenizer,zero-copy", "--transport", "zmq"]
    assert main(["bench", "load", *args, *pick, "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    assert {(r["strategy"], r["transport"], r["offered_rps"]) for r in records} == {
        (s, "zmq", rate) for s in ("tokenizer", "zero-copy") for rate in (8, 16)
    }
    for r in records:
        assert r["workload"] == "image" and r["tp"] == 2
        assert r["completed"] == 16 and r["errors"] == 0
        assert 0 < r["latency_ms"]["p50"] <= r["latency_ms"]["p90"] <= r["latency_ms"]["p99"]
        assert r["arrival_rps"] > 0 and r["achieved_rps"] > 0
        assert set(r["cpu_utilization"]) == {"tokenizer", "rank0", "rank1"}
        assert r["cpu_seconds_per_request"] >= 0
