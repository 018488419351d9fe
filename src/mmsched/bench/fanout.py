"""``mmsched bench fanout``: how long until every rank has a request's inputs, per design.

For each strategy and transport a real pipeline starts (``tp`` rank processes in a
torch.distributed group); requests are sent one at a time, so that no request waits behind
another and the figure is the fan-out itself. Every request, warm-up included, carries
fresh, distinct bytes made before its clock starts:

- ``input="copy"``: the processor's output is a new tensor in ordinary memory, as a Hugging
  Face processor's is (the realistic path);
- ``input="arena"``: the processor writes each request's output into a fresh
  [`Pipeline.allocate_tensor`][mmsched.pipeline.Pipeline.allocate_tensor]; only for payload
  stores whose allocations the ranks share, where the ring of the arena then wraps and its
  slots are reclaimed during the run;
- ``input="gpu"``: the processor's output is on the GPU (a GPU image processor's); only with
  ``consume="cuda"``;
- ``input="repeat"``: a new tensor in ordinary memory holding the same bytes every time (a
  client resending an image); only with a feature cache (``feature_cache_mb``), where the
  warm-up requests put it in the ranks' caches and the timed ones find it there.

Measured per request:

- latency: from the call into the pipeline (the processor's output is ready) to the last rank
  having consumed the inputs (``consume``: ``none``, it holds usable tensors; ``read``, it
  read every byte once; ``cuda``, it holds them on its GPU, copied), both read from
  CLOCK_MONOTONIC, which every process of a host shares;
- CPU: user + system seconds of the tokenizer and every rank process during the requests,
  from the OS (10 ms ticks: time enough requests for the figure to mean something);
- hashing: hashes and their CPU time, read from each process's own counter
  ([`mmsched.hash_stats`][mmsched.hashing.hash_stats]), not assumed from the strategy;
- identity: every rank reports a fingerprint for every request; for the warm-up requests
  and the last timed one, every rank also reports a digest of all bytes it holds, compared
  with the tokenizer's;
- the floor: right after each request, the least work its path needs on this machine, on
  a payload of the same size made the same way just before ([`mmsched.bench.floor`][]);
  a row's floor is the median of its requests'.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from mmsched.bench import DESIGN_STORE
from mmsched.codec import encode, encoded_size
from mmsched.config import Config
from mmsched.errors import ConfigError
from mmsched.hashing import DEFAULT_HASHER, HashStats, hash_stats, uncounted
from mmsched.inputs import MultimodalInputs
from mmsched.messages import ProbeReport, TokenizedGenerateReqInput
from mmsched.pipeline import Pipeline
from mmsched.probes import CONSUME_MODES, RankTimings
from mmsched.stores import PayloadStore, store_class
from mmsched.strategies import get_strategy
from mmsched.tokenizer import RequestTrace

from .cpu import CpuMeter
from .floor import Floor, FloorMeter
from .workloads import FreshPayloads, Sample, ordinary_memory

DEFAULT_STRATEGIES = ("per-rank", "entry-broadcast", "tokenizer", "zero-copy")
DEFAULT_TRANSPORTS = ("torch", "zmq", "shm")
DEFAULT_SIZES_MB = (1.0, 10.0, 50.0, 100.0)
INPUTS = ("copy", "arena", "gpu", "repeat")


@dataclass
class FanoutRecord:
    """One (strategy, transport, tp, size, input, consume) result; ``--json`` writes these."""

    strategy: str
    transport: str
    payload_store: str
    tp: int
    size_mb: float
    hasher: str
    input: str  # "copy", "arena", "gpu" or "repeat"
    consume: str  # "none", "read" or "cuda"
    requests: int
    latency_ms: dict[str, float]
    floor_ms: float  # median over the requests of each one's floor for this row's path
    floor_parts_ms: dict[str, float]  # medians of the floor's parts
    cpu_ms_per_request: float
    hash_ms_per_request: float
    hashes_per_request: float
    encoded_bytes: int
    encoded_bytes_raw_dict: int
    ranks_identical: bool
    sent_bytes: float = 0.0  # median bytes a timed request sent to the entry rank
    feature_cache_mb: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def x_floor(self) -> float:
        """p50 over the floor: 1.0 is the best this machine can do."""
        return self.latency_ms["p50"] / self.floor_ms if self.floor_ms > 0 else float("nan")

    def as_dict(self) -> dict[str, Any]:
        """The record as ``--json`` writes it, with ``x_floor``."""
        return {**asdict(self), "x_floor": self.x_floor}


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


def _rank_hashes(trace: RequestTrace) -> HashStats:
    """The hash counters of the ranks' processes summed (running totals as of this
    request), each process once: ranks that are tasks of one process share its counter."""
    # A shared counter's latest reading is its largest: the rank that observed last had
    # seen every rank's hash of the request (each hashes before it observes).
    by_pid: dict[int, dict[str, Any]] = {}
    for r in trace.reports:
        pid = int(r.data["pid"])
        if pid not in by_pid or r.data["hash_count"] > by_pid[pid]["hash_count"]:
            by_pid[pid] = r.data
    return HashStats(
        sum(int(d["hash_count"]) for d in by_pid.values()),
        sum(float(d["hash_cpu_seconds"]) for d in by_pid.values()),
    )


def _ranks_share_this_process(trace: RequestTrace) -> bool:
    return any(int(r.data["pid"]) == os.getpid() for r in trace.reports)


def encoded_sizes(sample: Sample, hasher: str) -> tuple[int, int]:
    """Bytes of one request encoded carrying the built object, and the raw dict."""
    with uncounted():
        built = MultimodalInputs.from_dict(
            sample.mm_inputs, hasher=hasher, input_len=len(sample.input_ids)
        )
    as_object = TokenizedGenerateReqInput("size", sample.input_ids, mm_inputs=built)
    as_dict = TokenizedGenerateReqInput("size", sample.input_ids, mm_inputs=sample.mm_inputs)
    return encoded_size(encode(as_object)), encoded_size(encode(as_dict))


@dataclass
class _Row:
    """What one row accumulates over its requests."""

    latencies: list[float] = field(default_factory=list)
    floors: list[Floor] = field(default_factory=list)
    sent: list[int] = field(default_factory=list)
    cpu_s: float = 0.0
    tokenizer_hashes: HashStats = field(default_factory=HashStats)
    identical: bool = True


async def _one_request(
    pipeline: Pipeline,
    payloads: FreshPayloads,
    rid: str,
    row: _Row,
    *,
    path: str,
    hasher: str,
    meter: CpuMeter,
    floors: FloorMeter,
    consume: str,
    tp: int,
    timed: bool,
    check_bytes: bool,
) -> RequestTrace:
    allocate = pipeline.allocate_tensor if path == "arena" else ordinary_memory
    # Fresh bytes (or, under repeat, fresh memory with the same bytes), made before the clock.
    make = payloads.again if path == "repeat" else payloads.next
    # In a thread: waiting for arena room on the event loop would block the answers that
    # give it back.
    sample = await asyncio.to_thread(make, allocate)
    with uncounted():  # the benchmark's own check, not the pipeline's work
        digest = (
            MultimodalInputs.from_dict(sample.mm_inputs, hasher=hasher).content_digest()
            if check_bytes
            else None
        )
    if path == "gpu":
        sample = on_gpu(sample)
    cpu_before, hashes_before = meter.seconds(), hash_stats()
    sent_before = pipeline.request_bytes_sent
    trace = await pipeline.generate_traced(rid, sample.input_ids, sample.mm_inputs)
    sent = pipeline.request_bytes_sent - sent_before
    cpu_s, hashes = meter.seconds() - cpu_before, hash_stats() - hashes_before
    del sample  # its arena room may be needed by the next one
    # The floor, right after: the same work on bytes made the same way just before it (a
    # hash of bytes just written runs slower than a second hash of them would).
    twin = await asyncio.to_thread(payloads.next, allocate)
    if path == "gpu":
        twin = on_gpu(twin)
    floor = floors.measure(
        twin.mm_inputs["mm_items"][0]["feature"],
        read=consume == "read",
        to_device=consume == "cuda",
    )
    del twin
    row.identical &= _identical(trace, tp, digest)
    if timed:
        row.latencies.append(_latency_ms(trace))
        row.floors.append(floor)
        row.sent.append(sent)
        row.cpu_s += cpu_s
        row.tokenizer_hashes = row.tokenizer_hashes + hashes
    return trace


def on_gpu(sample: Sample) -> Sample:
    """``sample`` with its features moved to the GPU, the copy finished (before any clock)."""
    items = [{**item, "feature": item["feature"].cuda()} for item in sample.mm_inputs["mm_items"]]
    torch.cuda.synchronize()
    return Sample(sample.input_ids, {**sample.mm_inputs, "mm_items": items})


def _paths(
    inputs: Sequence[str], store: type[PayloadStore], consume: str, cached: bool = False
) -> list[str]:
    # The arena path exists where the store's allocations are what the ranks read; the GPU
    # path where the ranks take features onto their GPU (a GPU store's rows only there);
    # the repeat path where the ranks cache features.
    if store.needs_gpu and consume != "cuda":
        return []
    exists = {
        "copy": True,
        "arena": store.shares_allocations,
        "gpu": consume == "cuda",
        "repeat": cached,
    }
    return [p for p in inputs if exists[p]]


async def run_combination(
    strategy: str,
    transport: str,
    sizes_mb: Sequence[float],
    *,
    store: str | None = None,
    feature_cache_mb: int = 0,
    tp: int,
    hasher: str,
    requests: int,
    warmup: int = 1,
    inputs: Sequence[str] = INPUTS,
    consume: str = "none",
    floors: FloorMeter,
    on_request: Callable[[], None] | None = None,
    on_record: Callable[[FanoutRecord], None] | None = None,
) -> list[FanoutRecord]:
    """Time ``requests`` sequential requests per size and input under one combination
    (``store``: a payload store other than the strategy's own)."""
    room_mb = max(256, int(2.5 * max(sizes_mb)))
    config = Config(
        transport=transport,
        strategy=strategy,
        payload_store=DESIGN_STORE,  # a design is its strategy; zero-copy's preset says shm
        hasher=hasher,
        tp_size=tp,
        shm_arena_mb=room_mb,
        cuda_pool_mb=room_mb,
        device="cuda" if consume == "cuda" else "cpu",
        feature_cache_mb=feature_cache_mb,
    )
    paths = _paths(
        inputs, store_class(store or config.payload_store), consume, feature_cache_mb > 0
    )
    if not paths:
        return []
    if store is not None:
        config = config.replace(payload_store=store)
    sends_object = get_strategy(strategy).builds_in_tokenizer
    records = []
    # Warm-ups and the last timed request prove that every rank holds the same bytes.
    probe = RankTimings(digest_prefix="check-", consume=consume)
    async with Pipeline(config, probe=probe) as pipeline:
        meter = CpuMeter([os.getpid(), *pipeline.pids])
        for size_mb in sizes_mb:
            payloads = FreshPayloads(size_mb, seed=int(size_mb * 1000))
            object_bytes, dict_bytes = encoded_sizes(payloads.next(ordinary_memory), hasher)
            for path in paths:
                row = _Row()
                warm = max(1, warmup)
                baseline: RequestTrace | None = None
                for i in range(warm + requests):
                    timed = i >= warm
                    check = not timed or i == warm + requests - 1
                    trace = await _one_request(
                        pipeline,
                        payloads,
                        f"{'check-' if check else ''}{path}-{size_mb:g}-{i}",
                        row,
                        path=path,
                        hasher=hasher,
                        meter=meter,
                        floors=floors,
                        consume=consume,
                        tp=tp,
                        timed=timed,
                        check_bytes=check,
                    )
                    if i == warm - 1:
                        baseline = trace  # the ranks' hash counters before the timed requests
                    if timed and on_request is not None:
                        on_request()
                assert baseline is not None
                rank_hashes = _rank_hashes(trace) - _rank_hashes(baseline)
                # Ranks in this process (the memory transport): their counter is the
                # tokenizer's too, and already holds its hashes.
                own = HashStats() if _ranks_share_this_process(trace) else row.tokenizer_hashes
                hashes = own.count + rank_hashes.count
                hash_s = own.cpu_seconds + rank_hashes.cpu_seconds
                n = len(row.latencies)
                record = FanoutRecord(
                    strategy=strategy,
                    transport=transport,
                    payload_store=config.payload_store,
                    tp=tp,
                    size_mb=size_mb,
                    hasher=hasher,
                    input=path,
                    consume=consume,
                    requests=requests,
                    latency_ms={
                        "p50": float(np.percentile(row.latencies, 50)),
                        "p99": float(np.percentile(row.latencies, 99)),
                        "mean": statistics.fmean(row.latencies),
                    },
                    floor_ms=statistics.median(f.total_ms(path, consume) for f in row.floors),
                    floor_parts_ms={
                        part: statistics.median(getattr(f, part) for f in row.floors)
                        for part in FLOOR_PARTS
                    },
                    cpu_ms_per_request=row.cpu_s * 1000 / n,
                    hash_ms_per_request=hash_s * 1000 / n,
                    hashes_per_request=hashes / n,
                    encoded_bytes=object_bytes if sends_object else dict_bytes,
                    encoded_bytes_raw_dict=dict_bytes,
                    ranks_identical=row.identical,
                    sent_bytes=float(np.median(row.sent)),
                    feature_cache_mb=feature_cache_mb,
                    notes=_notes(path),
                )
                records.append(record)
                if on_record is not None:
                    on_record(record)
    return records


FLOOR_PARTS = ("copy_ms", "hash_ms", "copy_and_hash_ms", "read_ms", "to_device_ms", "on_device_ms")


def _notes(path: str) -> list[str]:
    if path == "arena":
        return ["each request written by the processor into a fresh Pipeline.allocate_tensor"]
    if path == "gpu":
        return ["each request a new tensor on the GPU (a GPU processor's output)"]
    if path == "repeat":
        return ["each request a new tensor in ordinary memory with the same bytes (cached)"]
    return ["each request a new tensor in ordinary memory, copied in by the pipeline"]


def combinations(strategies: Sequence[str], transports: Sequence[str]) -> list[tuple[str, str]]:
    """Every (strategy, transport) pair, in the order given."""
    return [(s, t) for s in strategies for t in transports]


def requests_in_run(
    *,
    strategies: Sequence[str],
    transports: Sequence[str],
    sizes_mb: Sequence[float],
    tps: Sequence[int],
    requests: int,
    inputs: Sequence[str] = INPUTS,
    consume: Sequence[str] = ("none",),
    stores: Sequence[str | None] = (None,),
    feature_cache_mb: int = 0,
) -> int:
    """Timed requests a run makes (for a progress bar)."""
    rows = 0
    for strategy, transport in combinations(strategies, transports):
        for store in stores:
            name = (
                store
                or Config(
                    strategy=strategy, transport=transport, payload_store=DESIGN_STORE
                ).payload_store
            )
            rows += sum(
                len(_paths(inputs, store_class(name), mode, feature_cache_mb > 0))
                for mode in consume
            )
    return rows * len(sizes_mb) * len(tps) * requests


async def run_fanout(
    *,
    strategies: Sequence[str] = DEFAULT_STRATEGIES,
    transports: Sequence[str] = DEFAULT_TRANSPORTS,
    sizes_mb: Sequence[float] = DEFAULT_SIZES_MB,
    tps: Sequence[int] = (4,),
    hasher: str = DEFAULT_HASHER,
    requests: int = 20,
    warmup: int = 3,
    inputs: Sequence[str] = INPUTS,
    consume: Sequence[str] = ("none",),
    stores: Sequence[str | None] = (None,),
    feature_cache_mb: int = 0,
    on_request: Callable[[], None] | None = None,
    on_record: Callable[[FanoutRecord], None] | None = None,
) -> list[FanoutRecord]:
    """The whole comparison: every combination at every size, TP, input and consume mode,
    and payload store (``None``: the strategy's own).

    Raises:
        ConfigError: an unknown input or consume mode.
    """
    for mode in consume:
        if mode not in CONSUME_MODES:
            raise ConfigError(f"consume must be among {', '.join(CONSUME_MODES)}, not {mode!r}")
    for path in inputs:
        if path not in INPUTS:
            raise ConfigError(f"input must be among {', '.join(INPUTS)}, not {path!r}")
    floors = FloorMeter(int(max(sizes_mb) * 1e6) + (1 << 20), hasher)
    records: list[FanoutRecord] = []
    try:
        for tp in tps:
            for mode in consume:
                for (strategy, transport), store in itertools.product(
                    combinations(strategies, transports), stores
                ):
                    records += await run_combination(
                        strategy,
                        transport,
                        sizes_mb,
                        store=store,
                        feature_cache_mb=feature_cache_mb,
                        tp=tp,
                        hasher=hasher,
                        requests=requests,
                        warmup=warmup,
                        inputs=inputs,
                        consume=mode,
                        floors=floors,
                        on_request=on_request,
                        on_record=on_record,
                    )
    finally:
        floors.close()
    return records
