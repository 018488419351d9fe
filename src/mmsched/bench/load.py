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
  ring then wraps and reclaims during the run;
- ``worker``: at its arrival the request's processor, one of ``workers`` processes (8 by
  default), writes the sample into the arena through
  [`Pipeline.producer_access`][mmsched.pipeline.Pipeline.producer_access] and hands the
  handle back (inside the request's latency): the tokenizer process copies nothing.
"""

from __future__ import annotations

import asyncio
import functools
import multiprocessing
import os
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from mmsched.bench import DESIGN_STORE
from mmsched.cache import CacheStats
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
    "worker": "each request's pixels written into the arena by a processor worker process "
    "(Pipeline.producer_access), inside its latency",
}

WORKLOADS = ("image", "video", "mixed", "multiturn")
INPUTS = ("copy", "arena", "worker")
WORKERS = 8  # processor worker processes under input "worker", by default
DISTINCT = 64  # distinct samples per kind, by default
# multiturn: each conversation opens with one image and resends it on every later turn (as
# chat clients resend the history); a share of conversations open with one of a few images
# that many users send; conversations run ACTIVE at a time, their turns interleaved.
TURNS = 6
COMMON = 8
COMMON_SHARE = 0.2
ACTIVE = 16


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
    feature_cache_mb: int = 0
    repeat_share: float = 0.0  # requests whose features were all sent before (in the order)
    # The feature cache during the rate: hit_rate, feature_mb_sent_per_request, evictions,
    # resyncs (None without a cache).
    cache: dict[str, float] | None = None

    @property
    def keeps_up(self) -> bool:
        """At least 98% of the rate requests arrived at, nothing failed."""
        return self.errors == 0 and self.achieved_rps >= 0.98 * self.arrival_rps

    def as_dict(self) -> dict[str, Any]:
        """The record as ``--json`` writes it, with ``keeps_up``."""
        return {**asdict(self), "keeps_up": self.keeps_up}


def _draw(kind: str, seed: int) -> Sample:
    return qwen2vl_image(seed=seed) if kind == "image" else video_sample(seed=seed)


def pool_origins(workload: str, distinct: int = DISTINCT) -> list[tuple[str, int]]:
    """The samples ``make_pool`` makes, in its order: each one's kind and its index among
    that kind's samples (mixed traffic has one distinct video to nine distinct images)."""
    if workload in ("image", "video"):
        return [(workload, j) for j in range(distinct)]
    if workload == "multiturn":  # one opening image per conversation, then the common ones
        return [("image", j) for j in range(distinct + COMMON)]
    if workload == "mixed":
        return [("image", j) for j in range(distinct)] + [
            ("video", j) for j in range(max(1, distinct // 9))
        ]
    raise ValueError(f"unknown workload {workload!r}; known: {', '.join(WORKLOADS)}")


def make_pool(workload: str, distinct: int = DISTINCT) -> tuple[list[Sample], list[int]]:
    """Samples with distinct bytes, and the order requests cycle through them."""
    origins = pool_origins(workload, distinct)
    pool: list[Sample] = []
    for kind in ("image", "video"):
        count = sum(1 for k, _ in origins if k == kind)
        if count:
            pool += distinct_pool(functools.partial(_draw, kind), count)
    if workload == "multiturn":
        return pool, multiturn_order(distinct)
    if workload != "mixed":
        return pool, list(range(len(pool)))
    videos = len(pool) - distinct
    order, images_sent = [], 0
    for i in range(10 * distinct):  # nine images to one video
        if i % 10 == 9:
            order.append(distinct + (i // 10) % videos)
        else:
            order.append(images_sent % distinct)
            images_sent += 1
    return pool, order


def multiturn_order(conversations: int, *, seed: int = 0) -> list[int]:
    """Pool indices of ``conversations`` conversations of ``TURNS`` turns each: conversation
    ``c`` sends image ``c`` (or, for ``COMMON_SHARE`` of them, one of the ``COMMON`` images
    after the conversations' own) on every turn; ``ACTIVE`` conversations at a time."""
    rng = random.Random(seed)
    opening = [
        conversations + rng.randrange(COMMON) if rng.random() < COMMON_SHARE else c
        for c in range(conversations)
    ]
    order: list[int] = []
    for wave in range(0, conversations, ACTIVE):
        members = opening[wave : wave + ACTIVE]
        for _ in range(TURNS):
            order += members
    return order


def repeat_share(order: Sequence[int]) -> float:
    """The share of requests in ``order`` whose sample was sent earlier in it."""
    seen: set[int] = set()
    repeats = 0
    for index in order:
        repeats += index in seen
        seen.add(index)
    return repeats / len(order) if order else 0.0


_worker_arena: Any = None  # this worker process's ProducerArena
_worker_draws: dict[str, list[Sample]] = {}


def _worker_start(access: Any, kinds: list[str], started: Any) -> None:
    """A processor worker process: join the arena, draw the random bases once."""
    global _worker_arena
    _worker_arena = access.connect()
    for kind in kinds:
        _worker_draws[kind] = [_draw(kind, seed) for seed in range(4)]
    started.put(os.getpid())


def _worker_write(kind: str, index: int, stamp: int) -> list[Any]:
    """Write one sample's features into the arena, stamped; return their handles."""
    handles: list[Any] = []

    def allocate(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        tensor, lent = _worker_arena.allocate(shape, dtype)
        handles.append(lent)
        return torch.as_tensor(tensor)

    draws = _worker_draws[kind]
    restamped(draws[index % len(draws)], stamp, allocate)
    return handles


async def run_rate(
    pipeline: Pipeline,
    pool: list[Sample],
    order: list[int],
    *,
    rate: float,
    requests: int,
    seed: int = 0,
    write: Callable[[int, int], Awaitable[Sample]] | None = None,
    on_done: Callable[[], None] | None = None,
) -> tuple[list[float], int, float, float]:
    """Offer ``requests`` at ``rate``/s; with ``write``, each request's sample is first
    written by its processor: ``await write(pool index, stamp)`` gives the sample to send.

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
            if write is not None:  # the processor writes its output into the store
                sample = await write(order[i % len(order)], seed * 1_000_000 + i + 1)
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


def _cache_figures(
    before: CacheStats | None, after: CacheStats | None, requests: int
) -> dict[str, float] | None:
    if before is None or after is None:
        return None
    hits, misses = after.hits - before.hits, after.misses - before.misses
    return {
        "hit_rate": hits / (hits + misses) if hits + misses else 0.0,
        "feature_mb_sent_per_request": (after.bytes_sent - before.bytes_sent) / 1e6 / requests,
        "evictions": after.evictions - before.evictions,
        "resyncs": after.resyncs - before.resyncs,
    }


class _Writers:
    """Where each request's processor writes its output (``input``), for one pipeline."""

    def __init__(
        self,
        input_path: str,
        pipeline: Pipeline,
        pool: list[Sample],
        workload: str,
        distinct: int,
        workers: int = WORKERS,
    ) -> None:
        self._input, self._pipeline, self._pool = input_path, pipeline, pool
        self._origins = pool_origins(workload, distinct)
        self._kinds = sorted({kind for kind, _ in self._origins})
        self._workers = workers
        self._executor: ProcessPoolExecutor | None = None
        self.pids: list[int] = []
        self.write: Callable[[int, int], Awaitable[Sample]] | None = None

    async def __aenter__(self) -> _Writers:
        if self._input == "arena":
            self.write = self._write_arena
        elif self._input == "worker":
            ctx = multiprocessing.get_context("spawn")
            started = ctx.Queue()
            self._executor = ProcessPoolExecutor(
                self._workers,
                mp_context=ctx,
                initializer=_worker_start,
                initargs=(self._pipeline.producer_access(), self._kinds, started),
            )
            loop = asyncio.get_running_loop()
            # Start every worker now (each waits a moment, so that none takes two), and
            # learn their pids for the CPU figures.
            await asyncio.gather(
                *(
                    loop.run_in_executor(self._executor, time.sleep, 0.5)
                    for _ in range(self._workers)
                )
            )
            self.pids = [started.get(timeout=60) for _ in range(self._workers)]
            self.write = self._write_worker
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)

    async def _write_arena(self, index: int, stamp: int) -> Sample:
        return await asyncio.to_thread(
            restamped, self._pool[index], stamp, self._pipeline.allocate_tensor
        )

    async def _write_worker(self, index: int, stamp: int) -> Sample:
        kind, within = self._origins[index]
        loop = asyncio.get_running_loop()
        handles = await loop.run_in_executor(self._executor, _worker_write, kind, within, stamp)
        sample = self._pool[index]
        items = [
            {**item, "feature": self._pipeline.claim_tensor(lent)}
            for item, lent in zip(sample.mm_inputs["mm_items"], handles, strict=True)
        ]
        return Sample(sample.input_ids, {**sample.mm_inputs, "mm_items": items})


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
    workers: int = WORKERS,
    feature_cache_mb: int = 0,
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
            payload_store=DESIGN_STORE,  # a design is its strategy; zero-copy's preset says shm
            tp_size=tp,
            hasher=hasher,
            shm_arena_mb=2048 if workload != "image" else 1024,
            max_inflight_mb=None,  # measure the queue, do not cap it
            feature_cache_mb=feature_cache_mb,
        )
        async with (
            Pipeline(config, probe=ModelStub(model_step_ms)) as pipeline,
            _Writers(input_path, pipeline, pool, workload, distinct, workers) as writers,
        ):
            write = writers.write
            # Warm up outside the measurement: a burst at the first rate wakes every thread
            # pool and goes once round the arena, as the measured requests will. With a
            # feature cache, on other images: the measured requests must not find theirs
            # cached by the warm-up.
            warm = min(64, requests)
            if feature_cache_mb:
                warm_pool = distinct_pool(functools.partial(_draw, "image"), 16, first_stamp=10**6)
                await run_rate(
                    pipeline, warm_pool, list(range(16)), rate=rates[0], requests=warm, seed=-1
                )
            else:
                await run_rate(
                    pipeline, pool, order, rate=rates[0], requests=warm, seed=-1, write=write
                )
            # Over memory the ranks are tasks of this process: no pids, counted as the tokenizer.
            names = ["tokenizer", *(f"rank{r}" for r in range(len(pipeline.pids)))]
            meters = [CpuMeter([os.getpid()]), *(CpuMeter([pid]) for pid in pipeline.pids)]
            if writers.pids:  # the processor workers, together
                names.append("workers")
                meters.append(CpuMeter(writers.pids))
            for rate in rates:
                if on_start is not None:
                    on_start(f"{strategy}/{transport} @ {rate:g}/s", requests)
                cpu_before = [m.seconds() for m in meters]
                cache_before = pipeline.cache_stats()
                wall_before = time.monotonic()
                latencies, errors, arrival_rps, span = await run_rate(
                    pipeline,
                    pool,
                    order,
                    rate=rate,
                    requests=requests,
                    write=write,
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
                    feature_cache_mb=feature_cache_mb,
                    repeat_share=repeat_share([order[i % len(order)] for i in range(requests)]),
                    cache=_cache_figures(cache_before, pipeline.cache_stats(), requests),
                )
                records.append(record)
                if on_record is not None:
                    on_record(record)
    return records
