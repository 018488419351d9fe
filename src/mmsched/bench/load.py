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
135 MB), ``mixed`` (nine images to one video). Requests draw from ``distinct`` samples per
kind (64 by default), each with its own bytes, made before the run: drawing 18.8 MB of random
pixels per request would cost more than the pipeline does. ``input`` says where a request's
pixels are when it reaches the pipeline:

- ``copy`` (the realistic path): the sample itself, in ordinary memory, as a Hugging Face
  processor's output is; the pipeline copies it where the ranks read it;
- ``arena``: at its arrival the request's processor writes the sample into a fresh
  [`Pipeline.allocate_tensor`][mmsched.pipeline.Pipeline.allocate_tensor] (on a worker
  thread, inside the request's latency); under the ``shm`` store that is the arena, whose
  ring then wraps and reclaims during the run.
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
import torch

from mmsched.config import Config
from mmsched.errors import ConfigError, MmschedError
from mmsched.hashing import DEFAULT_HASHER
from mmsched.pipeline import Pipeline
from mmsched.probes import ModelStub

from .cpu import CpuMeter
from .workloads import Sample, distinct_pool, qwen2vl_image, restamped, video_sample

_NOTES = {
    "copy": "each request's pixels in ordinary memory, copied in by the pipeline",
    "arena": "each request's pixels written by its processor into a fresh "
    "Pipeline.allocate_tensor, inside its latency",
}

WORKLOADS = ("image", "video", "mixed")
INPUTS = ("copy", "arena")
DISTINCT = 64  # distinct samples per kind, by default


@dataclass
class LoadRecord:
    """One (strategy, transport, tp, workload, rate) result; ``--json`` writes a list of these."""

    strategy: str
    transport: str
    tp: int
    workload: str
    input: str
    distinct: int
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


def make_pool(workload: str, distinct: int = DISTINCT) -> tuple[list[Sample], list[int]]:
    """Samples with distinct bytes, and the order requests cycle through them."""
    if workload == "image":
        return distinct_pool(lambda seed: qwen2vl_image(seed=seed), distinct), list(range(distinct))
    if workload == "video":
        return distinct_pool(lambda seed: video_sample(seed=seed), distinct), list(range(distinct))
    if workload == "mixed":  # nine images to one video
        images = distinct_pool(lambda seed: qwen2vl_image(seed=seed), distinct)
        videos = distinct_pool(lambda seed: video_sample(seed=seed), max(1, distinct // 9))
        order, images_sent = [], 0
        for i in range(10 * distinct):
            if i % 10 == 9:
                order.append(distinct + (i // 10) % len(videos))
            else:
                order.append(images_sent % distinct)
                images_sent += 1
        return [*images, *videos], order
    raise ValueError(f"unknown workload {workload!r}; known: {', '.join(WORKLOADS)}")


async def run_rate(
    pipeline: Pipeline,
    pool: list[Sample],
    order: list[int],
    *,
    rate: float,
    requests: int,
    seed: int = 0,
    write_into: Callable[[Sequence[int], torch.dtype], torch.Tensor] | None = None,
    on_done: Callable[[], None] | None = None,
) -> tuple[list[float], int, float, float]:
    """Offer ``requests`` at ``rate``/s; with ``write_into``, each request's sample is first
    written (restamped) into memory from it.

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
            if write_into is not None:  # the processor writes its output into the store
                sample = await asyncio.to_thread(restamped, sample, i + 1, write_into)
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
    hasher: str = DEFAULT_HASHER,
    model_step_ms: float = 5.0,
    input_path: str = "copy",
    distinct: int = DISTINCT,
    on_start: Callable[[str, int], None] | None = None,
    on_done: Callable[[], None] | None = None,
    on_record: Callable[[LoadRecord], None] | None = None,
) -> list[LoadRecord]:
    """Every (strategy, transport) pair at every offered rate, one pipeline per pair.

    Raises:
        ConfigError: an unknown input.
    """
    if input_path not in INPUTS:
        raise ConfigError(f"input must be one of {', '.join(INPUTS)}, not {input_path!r}")
    pool, order = make_pool(workload, distinct)
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
        async with Pipeline(config, probe=ModelStub(model_step_ms)) as pipeline:
            write_into = pipeline.allocate_tensor if input_path == "arena" else None
            # Warm up outside the measurement: a burst at the first rate wakes every thread
            # pool and goes once round the arena, as the measured requests will.
            await run_rate(
                pipeline,
                pool,
                order,
                rate=rates[0],
                requests=min(64, requests),
                seed=-1,
                write_into=write_into,
            )
            names = ["tokenizer", *(f"rank{r}" for r in range(tp))]
            pids = [os.getpid(), *pipeline.pids]
            for rate in rates:
                if on_start is not None:
                    on_start(f"{strategy}/{transport} @ {rate:g}/s", requests)
                meters = [CpuMeter([pid]) for pid in pids]
                cpu_before = [m.seconds() for m in meters]
                wall_before = time.monotonic()
                latencies, errors, arrival_rps, span = await run_rate(
                    pipeline,
                    pool,
                    order,
                    rate=rate,
                    requests=requests,
                    write_into=write_into,
                    on_done=on_done,
                )
                wall = time.monotonic() - wall_before
                cpu = [m.seconds() - b for m, b in zip(meters, cpu_before, strict=True)]
                record = LoadRecord(
                    strategy=strategy,
                    transport=transport,
                    tp=tp,
                    workload=workload,
                    input=input_path,
                    distinct=distinct,
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
                    notes=[_NOTES[input_path]],
                )
                records.append(record)
                if on_record is not None:
                    on_record(record)
    return records
