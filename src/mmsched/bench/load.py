"""``mmsched bench load``: throughput and tail latency under open-loop Poisson traffic.

Requests arrive at exponentially distributed intervals at the offered rate, whatever the
pipeline does (open loop: a slow pipeline builds a queue instead of slowing the client, as
real traffic does). Each request's latency runs from its *scheduled* arrival to its output,
client side, so time spent queued before the pipeline took it counts (no coordinated
omission). Reported per (strategy, transport, rate):

- achieved requests/s: completed requests over the time from the first arrival to the last
  completion, beside the arrival rate the random schedule actually realised (1,000 Poisson
  arrivals stray about 3% from the nominal rate, so "keeps up" compares with the realised);
- latency p50 / p90 / p99;
- CPU: utilization of each process (tokenizer, every rank) over the run, and CPU seconds per
  request summed over all of them.

Workloads: ``image`` (one 1120x700 image as a Qwen2-VL processor emits it: pixel_values
float32 (4000, 1176), 18.8 MB, with image_grid_thw), ``video`` (10 s of 720p at 2 fps,
135 MB), ``mixed`` (nine images to one video). A few distinct samples are made before the
run and reused: making 18.8 MB of random pixels per request would cost more than the
pipeline does. They are made in
[`Pipeline.allocate_tensor`][mmsched.pipeline.Pipeline.allocate_tensor] (``--zero-copy-input
arena``): under the ``shm`` payload store, in the tokenizer's arena, as a processor writing
its output there would.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from mmsched.config import Config
from mmsched.errors import MmschedError
from mmsched.pipeline import Pipeline
from mmsched.probes import ModelStub

from .cpu import CpuMeter
from .workloads import Sample, in_shared_memory, qwen2vl_image, video_sample

WORKLOADS = ("image", "video", "mixed")
_POOL = 4  # distinct samples per kind


@dataclass
class LoadRecord:
    """One (strategy, transport, tp, workload, rate) result; ``--json`` writes a list of these."""

    strategy: str
    transport: str
    tp: int
    workload: str
    offered_rps: float
    arrival_rps: float
    achieved_rps: float
    requests: int
    completed: int
    errors: int
    latency_ms: dict[str, float]
    cpu_seconds_per_request: float
    cpu_utilization: dict[str, float]
    model_step_ms: float
    hasher: str
    notes: list[str] = field(default_factory=list)

    @property
    def keeps_up(self) -> bool:
        """At least 98% of the rate requests arrived at, nothing failed."""
        return self.errors == 0 and self.achieved_rps >= 0.98 * self.arrival_rps

    def as_dict(self) -> dict[str, Any]:
        """The record as ``--json`` writes it, with ``keeps_up``."""
        return {**asdict(self), "keeps_up": self.keeps_up}


def make_pool(workload: str) -> tuple[list[Sample], list[int]]:
    """Distinct samples, and the order requests cycle through them."""
    if workload == "image":
        return [qwen2vl_image(seed=i) for i in range(_POOL)], list(range(_POOL))
    if workload == "video":
        return [video_sample(seed=i) for i in range(2)], [0, 1]
    if workload == "mixed":  # nine images to one video
        samples = [*(qwen2vl_image(seed=i) for i in range(_POOL)), video_sample(seed=0)]
        return samples, [0, 1, 2, 3, 0, 1, 2, 3, 0, 4]
    raise ValueError(f"unknown workload {workload!r}; known: {', '.join(WORKLOADS)}")


async def run_rate(
    pipeline: Pipeline,
    pool: list[Sample],
    order: list[int],
    *,
    rate: float,
    requests: int,
    seed: int = 0,
    on_done: Callable[[], None] | None = None,
) -> tuple[list[float], int, float, float]:
    """Offer ``requests`` at ``rate``/s.

    Returns latencies (ms), errors, the realised arrival rate, and the span from the first
    arrival to the last completion (s).
    """
    rng = random.Random(seed)
    arrivals = np.cumsum([rng.expovariate(rate) for _ in range(requests)])
    start = time.monotonic()
    latencies: list[float] = []
    errors = 0
    last_done = start

    async def one(i: int, due: float) -> None:
        nonlocal errors, last_done
        sample = pool[order[i % len(order)]]
        try:
            await pipeline.generate(f"load-{seed}-{i}", sample.input_ids, sample.mm_inputs)
            done = time.monotonic()
            latencies.append((done - due) * 1000)
            last_done = max(last_done, done)
        except MmschedError:
            errors += 1
        if on_done is not None:
            on_done()

    tasks = []
    for i, offset in enumerate(arrivals):
        due = start + float(offset)
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, due)))
    await asyncio.gather(*tasks)
    arrival_rps = requests / float(arrivals[-1]) if requests > 1 else rate
    return latencies, errors, arrival_rps, max(last_done - start, 1e-9)


async def run_load(
    *,
    pairs: Sequence[tuple[str, str]],
    rates: Sequence[float],
    workload: str = "image",
    tp: int = 4,
    requests: int = 1000,
    hasher: str = "blake3",
    model_step_ms: float = 5.0,
    zero_copy_input: str = "arena",
    on_start: Callable[[str, int], None] | None = None,
    on_done: Callable[[], None] | None = None,
    on_record: Callable[[LoadRecord], None] | None = None,
) -> list[LoadRecord]:
    """Every (strategy, transport) pair at every offered rate, one pipeline per pair."""
    base_pool, order = make_pool(workload)
    records: list[LoadRecord] = []
    for strategy, transport in pairs:
        config = Config(
            strategy=strategy,
            transport=transport,
            tp_size=tp,
            hasher=hasher,
            shm_arena_mb=2048 if workload != "image" else 1024,
            max_inflight_mb=None,  # measure the queue, do not cap it
        )
        # "arena": samples live in memory the payload store hands out (shared memory under
        # the shm store, as a processor writing its output there would).
        in_arena = zero_copy_input == "arena"
        async with Pipeline(config, probe=ModelStub(model_step_ms)) as pipeline:
            pool = base_pool
            if in_arena:
                pool = [in_shared_memory(s, pipeline.allocate_tensor) for s in base_pool]
            # Warm up every sample once, outside the measurement.
            for i, sample in enumerate(pool):
                await pipeline.generate(f"warm-{i}", sample.input_ids, sample.mm_inputs)
            names = ["tokenizer", *(f"rank{r}" for r in range(tp))]
            pids = [os.getpid(), *pipeline.pids]
            for rate in rates:
                if on_start is not None:
                    on_start(f"{strategy}/{transport} @ {rate:g}/s", requests)
                meters = [CpuMeter([pid]) for pid in pids]
                cpu_before = [m.seconds() for m in meters]
                wall_before = time.monotonic()
                latencies, errors, arrival_rps, span = await run_rate(
                    pipeline, pool, order, rate=rate, requests=requests, on_done=on_done
                )
                wall = time.monotonic() - wall_before
                cpu = [m.seconds() - b for m, b in zip(meters, cpu_before, strict=True)]
                record = LoadRecord(
                    strategy=strategy,
                    transport=transport,
                    tp=tp,
                    workload=workload,
                    offered_rps=rate,
                    arrival_rps=arrival_rps,
                    achieved_rps=len(latencies) / span,
                    requests=requests,
                    completed=len(latencies),
                    errors=errors,
                    latency_ms={
                        f"p{q}": float(np.percentile(latencies, q)) if latencies else float("nan")
                        for q in (50, 90, 99)
                    },
                    cpu_seconds_per_request=sum(cpu) / max(1, len(latencies)),
                    cpu_utilization={n: c / wall for n, c in zip(names, cpu, strict=True)},
                    model_step_ms=model_step_ms,
                    hasher=hasher,
                    notes=["payload written by the processor into the arena"] if in_arena else [],
                )
                records.append(record)
                if on_record is not None:
                    on_record(record)
    return records
