"""Soak (``pytest -m slow``): 10,000 requests through each transport, memory flat.

Resident memory of the tokenizer and every rank, summed, may grow less than 5% between
the end of warm-up and the end of the run; shared memory may not grow at all. Both are this
run's own (its processes, the segments they map or named), never the host's: other runs on
the machine (parallel CI jobs) may come and go meanwhile.
"""

from __future__ import annotations

import asyncio
import os

import psutil
import pytest

from mmsched import Config, Pipeline
from mmsched.bench.workloads import image_sample
from own_run import segments_of, shared_memory_of

pytestmark = [pytest.mark.slow, pytest.mark.faults]

REQUESTS = 10_000
WARMUP = 1_000
CONCURRENCY = 16


def resident_bytes(pids: list[int]) -> int:
    return sum(psutil.Process(p).memory_info().rss for p in pids)


@pytest.mark.parametrize(
    ("strategy", "transport"),
    [("tokenizer", "torch"), ("tokenizer", "zmq"), ("tokenizer", "shm"), ("zero-copy", "shm")],
)
async def test_soak_memory_stays_flat(strategy: str, transport: str) -> None:
    sample = image_sample(2, 8)  # 75 kB: enough to use the data plane, small enough for 10k
    config = Config(strategy=strategy, transport=transport, tp_size=2, shm_arena_mb=64)
    async with Pipeline(config) as pipeline:
        pids = [os.getpid(), *pipeline.pids]
        semaphore = asyncio.Semaphore(CONCURRENCY)

        async def one(i: int) -> None:
            async with semaphore:
                out = await pipeline.generate(f"s{i}", sample.input_ids, sample.mm_inputs)
                assert len(out.pad_values) == 1

        await asyncio.gather(*(one(i) for i in range(WARMUP)))
        rss_after_warmup = resident_bytes(pids)
        shm_after_warmup = shared_memory_of(pids)
        await asyncio.gather(*(one(i) for i in range(WARMUP, REQUESTS)))
        growth = resident_bytes(pids) / rss_after_warmup - 1
        assert growth < 0.05, f"resident memory grew {growth:.1%} over {REQUESTS} requests"
        assert shared_memory_of(pids) <= shm_after_warmup
        if transport == "shm":
            assert shm_after_warmup > 0, "the check must see the run's arenas"
    assert not segments_of(pids)
