"""``mmsched bench fanout``: how long until every rank holds a request's inputs, per strategy.

For each strategy a real pipeline starts (``tp`` rank processes in a torch.distributed
group); for each payload size, requests are sent one at a time, so that no request waits
behind another and the figure is the fan-out itself. Measured per request:

- latency: from "processor output ready in the tokenizer" (``created_at``) to "the last rank
  holds a usable MultimodalInputs" (the latest ``ready_at`` the ranks report), both read
  from CLOCK_MONOTONIC, which every process of a host shares;
- CPU: user + system seconds of the tokenizer and every rank process over the timed
  requests, from the OS, divided by the number of requests (the OS counts in 10 ms ticks:
  time enough requests for the figure to mean something);
- hashing: hashes and their CPU time, read from each process's own counter
  ([`mmsched.hash_stats`][mmsched.hashing.hash_stats]), not assumed from the strategy;
- identity: every rank reports a fingerprint for every request; for one request per size
  every rank also reports a digest of all bytes it holds, compared with the tokenizer's;
- the floor: one copy plus one hash of the payload on this machine ([`floor`][mmsched.bench.floor]).

The payload is built once per size, before timing (its generation is no part of any cost).
Under ``zero-copy`` the processor writes it straight into the tokenizer's arena
(``zero_copy_input="arena"``, the designed path) or hands over ordinary memory that the
tokenizer copies in (``"copy"``).
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from mmsched.codec import encode, encoded_size
from mmsched.config import Config
from mmsched.hashing import hash_stats
from mmsched.inputs import MultimodalInputs
from mmsched.messages import ProbeReport, TokenizedGenerateReqInput
from mmsched.pipeline import Pipeline
from mmsched.probes import RankTimings
from mmsched.strategies import get_strategy
from mmsched.tokenizer import RequestTrace

from .cpu import CpuMeter
from .floor import floor_ms
from .workloads import Sample, image_of_size, in_shared_memory

DEFAULT_STRATEGIES = ("per-rank", "entry-broadcast", "tokenizer", "zero-copy")
DEFAULT_TRANSPORTS = ("torch", "zmq", "shm")
DEFAULT_SIZES_MB = (1.0, 10.0, 50.0, 100.0)


@dataclass
class FanoutRecord:
    """One (strategy, transport, tp, size) result; ``--json`` writes a list of these."""

    strategy: str
    transport: str
    tp: int
    size_mb: float
    hasher: str
    requests: int
    latency_ms: dict[str, float]
    cpu_ms_per_request: float
    hash_ms_per_request: float
    hashes_per_request: float
    encoded_bytes: int
    encoded_bytes_raw_dict: int
    ranks_identical: bool
    floor_ms: float = 0.0
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """The record as ``--json`` writes it."""
        return asdict(self)


@dataclass
class _RankCounters:
    count: int
    cpu_seconds: float


def _rank_counters(trace: RequestTrace) -> dict[int, _RankCounters]:
    return {
        r.rank: _RankCounters(int(r.data["hash_count"]), float(r.data["hash_cpu_seconds"]))
        for r in trace.reports
    }


def _latency_ms(trace: RequestTrace) -> float:
    all_ranks_ready_at = max(float(r.data["ready_at"]) for r in trace.reports)
    return (all_ranks_ready_at - trace.created_at) * 1000


def _identical(trace: RequestTrace, tp: int, reference_digest: str | None) -> bool:
    reports: list[ProbeReport] = trace.reports
    if len(reports) != tp or any(r.data["error"] for r in reports):
        return False
    if len({r.data["fingerprint"] for r in reports}) != 1:
        return False
    if reference_digest is not None:
        return all(r.data["content_digest"] == reference_digest for r in reports)
    return True


@dataclass(frozen=True)
class SizeFacts:
    """What a payload size gives whatever the strategy: measured once per size, not per run."""

    floor_ms: float
    digest: str  # what every rank must hold, bit for bit
    object_bytes: int  # encoded request carrying the built object
    dict_bytes: int  # encoded request carrying the raw dict


def size_facts(sample: Sample, hasher: str) -> SizeFacts:
    """Measured once per payload size: its floor, reference digest and encoded sizes."""
    built = MultimodalInputs.from_dict(
        sample.mm_inputs, hasher=hasher, input_len=len(sample.input_ids)
    )
    as_object = TokenizedGenerateReqInput("size", sample.input_ids, mm_inputs=built)
    as_dict = TokenizedGenerateReqInput("size", sample.input_ids, mm_inputs=sample.mm_inputs)
    return SizeFacts(
        floor_ms=floor_ms(sample.mm_inputs["mm_items"][0]["feature"], hasher),
        digest=built.content_digest(),
        object_bytes=encoded_size(encode(as_object)),
        dict_bytes=encoded_size(encode(as_dict)),
    )


async def run_combination(
    strategy: str,
    transport: str,
    samples: dict[float, Sample],
    facts: dict[float, SizeFacts],
    *,
    tp: int,
    hasher: str,
    requests: int,
    warmup: int = 1,
    zero_copy_input: str = "arena",
    on_record: Callable[[FanoutRecord], None] | None = None,
) -> list[FanoutRecord]:
    """Time ``requests`` sequential requests of each sample size under one combination."""
    config = Config(
        transport=transport,
        strategy=strategy,
        hasher=hasher,
        tp_size=tp,
        shm_arena_mb=max(256, int(2.5 * max(samples))),
    )
    # What crosses from the tokenizer: the built object, or the raw dict.
    sends_object = get_strategy(strategy).builds_in_tokenizer
    # "arena": the processor writes into memory the pipeline's payload store hands out (shared
    # memory under the shm store, where sending then copies nothing; plain memory otherwise).
    in_arena = zero_copy_input == "arena"
    records = []
    # Warm-up requests also prove that every rank holds the same bytes: their ranks digest.
    async with Pipeline(config, probe=RankTimings(digest_prefix="warm-")) as pipeline:
        meter = CpuMeter([os.getpid(), *pipeline.pids])
        for size_mb, base_sample in samples.items():
            sample = (
                in_shared_memory(base_sample, pipeline.allocate_tensor) if in_arena else base_sample
            )
            identical = True
            last: RequestTrace | None = None
            for i in range(max(1, warmup)):
                last = await pipeline.generate_traced(
                    f"warm-{size_mb}-{i}", sample.input_ids, sample.mm_inputs
                )
                identical &= _identical(last, tp, facts[size_mb].digest)
            assert last is not None
            before_ranks = _rank_counters(last)
            before_local = hash_stats()
            cpu_before = meter.seconds()
            latencies = []
            for i in range(requests):
                last = await pipeline.generate_traced(
                    f"{size_mb}-{i}", sample.input_ids, sample.mm_inputs
                )
                latencies.append(_latency_ms(last))
                identical &= _identical(last, tp, None)
            cpu_s = meter.seconds() - cpu_before
            local = hash_stats() - before_local
            after_ranks = _rank_counters(last)
            hashes = local.count + sum(
                after_ranks[r].count - before_ranks[r].count for r in after_ranks
            )
            hash_s = local.cpu_seconds + sum(
                after_ranks[r].cpu_seconds - before_ranks[r].cpu_seconds for r in after_ranks
            )
            notes = (
                ["payload written by the processor into Pipeline.allocate_tensor"]
                if in_arena
                else []
            )
            del sample, last  # release arena space held by this size before the next
            record = FanoutRecord(
                strategy=strategy,
                transport=transport,
                tp=tp,
                size_mb=size_mb,
                hasher=hasher,
                requests=requests,
                latency_ms={
                    "p50": float(np.percentile(latencies, 50)),
                    "p99": float(np.percentile(latencies, 99)),
                    "mean": statistics.fmean(latencies),
                },
                cpu_ms_per_request=cpu_s * 1000 / requests,
                hash_ms_per_request=hash_s * 1000 / requests,
                hashes_per_request=hashes / requests,
                encoded_bytes=facts[size_mb].object_bytes
                if sends_object
                else facts[size_mb].dict_bytes,
                encoded_bytes_raw_dict=facts[size_mb].dict_bytes,
                ranks_identical=identical,
                floor_ms=facts[size_mb].floor_ms,
                notes=notes,
            )
            records.append(record)
            if on_record is not None:
                on_record(record)
    return records


def combinations(strategies: Sequence[str], transports: Sequence[str]) -> list[tuple[str, str]]:
    """Every (strategy, transport) pair, in the order given."""
    return [(s, t) for s in strategies for t in transports]


async def run_fanout(
    *,
    strategies: Sequence[str] = DEFAULT_STRATEGIES,
    transports: Sequence[str] = DEFAULT_TRANSPORTS,
    sizes_mb: Sequence[float] = DEFAULT_SIZES_MB,
    tps: Sequence[int] = (4,),
    hasher: str = "sha256",
    requests: int = 20,
    warmup: int = 3,
    zero_copy_input: str = "arena",
    on_floor: Callable[[float, float], None] | None = None,
    on_record: Callable[[FanoutRecord], None] | None = None,
) -> list[FanoutRecord]:
    """The whole comparison: every combination at every size and TP, in one run."""
    samples = {size: image_of_size(size, seed=int(size * 1000)) for size in sizes_mb}
    facts = {}
    for size, sample in samples.items():
        facts[size] = size_facts(sample, hasher)
        if on_floor is not None:
            on_floor(size, facts[size].floor_ms)
    records: list[FanoutRecord] = []
    for tp in tps:
        for strategy, transport in combinations(strategies, transports):
            records += await run_combination(
                strategy,
                transport,
                samples,
                facts,
                tp=tp,
                hasher=hasher,
                requests=requests,
                warmup=warmup,
                zero_copy_input=zero_copy_input,
                on_record=on_record,
            )
    return records
