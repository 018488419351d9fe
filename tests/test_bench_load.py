"""``mmsched bench load`` end to end, small: open-loop arrivals, every field measured."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mmsched.bench.load import ACTIVE, TURNS, make_pool, multiturn_order, repeat_share
from mmsched.cli import main
from mmsched.hashing import get_hasher


def test_bench_load_small(tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    args = ["--tp", "2", "--rates", "8,16", "--requests", "16", "--model-step-ms", "1"]
    args += ["--distinct", "8"]
    pick = ["--strategy", "tokenizer,zero-copy", "--transport", "zmq"]
    assert main(["bench", "load", *args, *pick, "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    assert {(r["strategy"], r["transport"], r["offered_rps"]) for r in records} == {
        (s, "zmq", rate) for s in ("tokenizer", "zero-copy") for rate in (8, 16)
    }
    for r in records:
        assert r["workload"] == "image" and r["tp"] == 2
        assert r["input"] == "copy" and r["distinct"] == 8 and r["hasher"] == "blake3"
        assert r["completed"] == 16 and r["errors"] == 0
        assert 0 < r["latency_ms"]["p50"] <= r["latency_ms"]["p90"] <= r["latency_ms"]["p99"]
        assert r["arrival_rps"] > 0 and r["achieved_rps"] > 0
        assert set(r["cpu_utilization"]) == {"tokenizer", "rank0", "rank1"}
        assert r["cpu_seconds_per_request"] >= 0


def test_bench_load_over_memory_counts_the_ranks_in_the_tokenizer(tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    args = ["--tp", "2", "--rate", "20", "--requests", "4", "--distinct", "2"]
    assert (
        main(
            [
                "bench",
                "load",
                *args,
                "--strategy",
                "tokenizer",
                "--transport",
                "memory",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    (record,) = json.loads(out.read_text())
    assert record["completed"] == 4 and record["errors"] == 0
    assert set(record["cpu_utilization"]) == {"tokenizer"}  # the ranks are its tasks


def one_zero_copy_run(
    tmp_path: Path, input_path: str, requests: int, *extra: str
) -> dict[str, Any]:
    """One rate (20/s, TP=2, 4 distinct images) of ``--input input_path``: its record."""
    out = tmp_path / "load.json"
    args = ["--tp", "2", "--rate", "20", "--requests", str(requests), "--model-step-ms", "1"]
    args += ["--distinct", "4", "--input", input_path, "--strategy", "zero-copy", *extra]
    assert main(["bench", "load", *args, "--transport", "zmq", "--json", str(out)]) == 0
    (record,) = json.loads(out.read_text())
    assert record["input"] == input_path
    assert record["completed"] == requests and record["errors"] == 0
    return dict(record)


def test_arena_input_wraps_the_ring_under_load(tmp_path: Path) -> None:
    # 70 requests of 18.8 MB, each written by its processor into a fresh allocation of a
    # 1 GiB arena: 1.3 GB in all, so the ring wraps and reclaims while requests run.
    one_zero_copy_run(tmp_path, "arena", 70)


def test_samples_are_distinct() -> None:
    pool, order = make_pool("image", 8)
    assert sorted(order) == list(range(8))
    hashes = {
        get_hasher("blake3").hash_tensor("image", s.mm_inputs["mm_items"][0]["feature"])
        for s in pool
    }
    assert len(hashes) == 8
    mixed, order = make_pool("mixed", 9)
    assert len(mixed) == 10 and order.count(9) == 9  # one video in every ten requests


def test_worker_processes_write_into_the_arena_under_load(tmp_path: Path) -> None:
    # Two workers, not the default eight: each is a spawned process that imports torch, and
    # two already share the arena and take turns with the requests.
    record = one_zero_copy_run(tmp_path, "worker", 40, "--workers", "2")
    assert set(record["cpu_utilization"]) == {"tokenizer", "rank0", "rank1", "workers"}


def test_multiturn_conversations_resend_their_image_and_the_cache_serves_them(
    tmp_path: Path,
) -> None:
    order = multiturn_order(32)
    assert len(order) == 32 * TURNS
    for wave in range(0, len(order), ACTIVE * TURNS):  # each turn resends the same images
        turns = [order[wave + t * ACTIVE : wave + (t + 1) * ACTIVE] for t in range(TURNS)]
        assert all(turn == turns[0] for turn in turns)
    assert any(index >= 32 for index in order)  # some open with a common image
    assert 1 - 32 / len(order) <= repeat_share(order) < 1
    out = tmp_path / "load.json"
    args = ["--tp", "2", "--rate", "20", "--requests", "48", "--model-step-ms", "1"]
    args += ["--workload", "multiturn", "--distinct", "8", "--feature-cache-mb", "256"]
    assert main(["bench", "load", *args, "--strategy", "tokenizer", "--json", str(out)]) == 0
    (record,) = json.loads(out.read_text())
    assert record["completed"] == 48 and record["errors"] == 0
    assert record["repeat_share"] > 0.8 and record["feature_cache_mb"] == 256
    # What the mirror counted: every resend a hit (the cache holds all eight images).
    assert record["cache"]["hit_rate"] == record["repeat_share"]
    assert record["cache"]["resyncs"] == 0
