"""The `mmsched` command line: `bench fanout` end to end, small (the counts it reports are
measured, not assumed), and the help and flags a user meets first."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmsched.cli import main

FIELDS = {
    "strategy",
    "transport",
    "payload_store",
    "tp",
    "size_mb",
    "hasher",
    "input",
    "consume",
    "latency_ms",
    "floor_ms",
    "floor_parts_ms",
    "x_floor",
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
    # Every strategy on every transport asked for, copy path and (where the store shares its
    # allocations) arena path, each consume mode.
    rows = {(r["strategy"], r["transport"], r["input"], r["consume"]) for r in records}
    strategies = ("per-rank", "entry-broadcast", "tokenizer", "zero-copy")
    assert rows == {
        (s, "shm", path, consume)
        for s in strategies
        for path in ("copy", "arena")
        for consume in ("none", "read")
        if path == "copy" or s == "zero-copy"
    }
    # The OS counts CPU in 10 ms ticks: one tiny row may read 0, the whole run cannot.
    assert sum(r["cpu_ms_per_request"] for r in records) > 0
    for r in records:
        assert set(r) >= FIELDS
        assert r["hasher"] == "blake3"  # one default, the one Config has
        assert r["ranks_identical"] is True
        assert r["latency_ms"]["p50"] > 0 and r["latency_ms"]["p99"] >= r["latency_ms"]["p50"]
        assert r["cpu_ms_per_request"] >= 0
        assert r["encoded_bytes"] > 990_000  # 1 MB of pixel values, rounded to whole patches
        parts = r["floor_parts_ms"]
        assert parts["hash_ms"] > 0 and parts["copy_ms"] > 0
        assert (parts["read_ms"] > 0) == (r["consume"] == "read")
        # The floor is a lower bound measured beside the row: a row below it is a bug.
        assert r["floor_ms"] > 0 and r["x_floor"] >= 1.0, r
        expected = {"per-rank": 2, "entry-broadcast": 1, "tokenizer": 1, "zero-copy": 1}
        assert r["hashes_per_request"] == expected[r["strategy"]], r


def test_unknown_strategy_is_an_error(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["bench", "fanout", "--strategies", "fastest"]) == 2
    assert "unknown strategy 'fastest'" in capsys.readouterr().out


def test_top_level_help_lists_every_command_in_plain_text(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from mmsched.cli import main

    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for command in ("serve", "bench fanout", "bench load", "bench serve", "bench report"):
        assert f"mmsched {command}" in text
    assert "``" not in text


def test_both_benchmarks_take_both_spellings_of_the_design_flags() -> None:
    from mmsched.cli import build_parser

    parser = build_parser()
    for bench in ("fanout", "load"):
        one = parser.parse_args(["bench", bench, "--strategy", "tokenizer", "--transport", "zmq"])
        two = parser.parse_args(
            ["bench", bench, "--strategies", "tokenizer", "--transports", "zmq"]
        )
        assert vars(one) == vars(two)


def test_bench_load_without_design_flags_runs_every_strategy() -> None:
    # The README shows `mmsched bench load` with no flags: it must name every strategy.
    from mmsched.bench.fanout import DEFAULT_STRATEGIES
    from mmsched.cli import build_parser

    args = build_parser().parse_args(["bench", "load"])
    assert args.strategy == list(DEFAULT_STRATEGIES)
    assert args.transport == ["torch"]


def test_bench_fanout_counts_only_the_pipelines_hashes_with_ranks_in_process(
    tmp_path: Path,
) -> None:
    # Over the memory transport the ranks share the tokenizer's process and its counter;
    # the benchmark's floor and checks hash there too. Only the pipeline's count.
    out = tmp_path / "fanout.json"
    args = ["--tp", "4", "--sizes", "0.01", "--requests", "4", "--warmup", "1"]
    args += ["--strategies", "per-rank,tokenizer", "--transports", "memory"]
    assert main(["bench", "fanout", *args, "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    assert records
    expected = {"per-rank": 4, "tokenizer": 1}
    for r in records:
        assert r["hashes_per_request"] == expected[r["strategy"]], r
