"""The GPU data plane on a real GPU: every store delivers each rank's features on its device,
copied and ready; the pinned arena is page-locked on each rank; the CUDA IPC pool gives its
slices back, refuses when full, and leaks no device memory across 1,000 requests, a killed
rank and a restart; the feature cache keeps each rank's copy on its GPU; a RankGroup and
on_rank_start see each rank's own device.

Needs CUDA: on a machine without it every test here is skipped, with the reason. The
committed output of a run on a GPU machine is in ``docs/results/gpu_tests.txt``.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from gpu_probe import OnDevice
from mmsched import Config, MultimodalInputs, Overloaded, PeerLost, Pipeline
from mmsched.bench.fanout import on_gpu
from mmsched.bench.workloads import Sample, image_sample, ordinary_memory, restamped
from mmsched.stores import StoreOptions
from mmsched.stores.pinned import PinnedShmStore
from mmsched.stores.shm import ShmStore

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU; torch sees none here"
    ),
]

TP = 2
STORES = ["inline", "shm", "pinned", "cuda-ipc"]


def config(store: str, **values: object) -> Config:
    base = Config(
        strategy="tokenizer",
        transport="zmq",
        payload_store=store,
        tp_size=TP,
        device="cuda",
        shm_arena_mb=64,
        cuda_pool_mb=64,
        hasher="blake3",
    )
    return base.replace(**values)


def distinct(n: int, *, rows: int = 200, first: int = 1) -> list[Sample]:
    """``n`` images of ``2 x rows`` patches (0.94 MB per 100 rows), distinct bytes each."""
    base = image_sample(2, rows, seed=rows)
    return [restamped(base, first + i, ordinary_memory) for i in range(n)]


def digest(sample: Sample) -> str:
    return MultimodalInputs.from_dict(sample.mm_inputs, hasher="blake3").content_digest()


async def send_all(
    pipeline: Pipeline, samples: list[Sample], prefix: str, *, concurrency: int = 16
) -> None:
    """Every sample through the pipeline; every rank must hold exactly its bytes, on its GPU."""
    limit = asyncio.Semaphore(concurrency)

    async def one(i: int, sample: Sample, expected: str) -> None:
        async with limit:
            trace = await pipeline.generate_traced(
                f"{prefix}-{i}", sample.input_ids, sample.mm_inputs
            )
        assert sorted(r.rank for r in trace.reports) == list(range(TP))
        for report in trace.reports:
            assert report.data["error"] is None
            assert report.data["content_digest"] == expected, f"{prefix}-{i} rank {report.rank}"
            assert report.data["devices"] == [f"cuda:{report.rank % torch.cuda.device_count()}"]
            assert report.data["current"] == report.rank % torch.cuda.device_count()

    expected = [digest(s) for s in samples]  # of the host bytes, before any move
    moved = [on_gpu(s) if pipeline.config.payload_store == "cuda-ipc" else s for s in samples]
    await asyncio.gather(
        *(one(i, s, e) for i, (s, e) in enumerate(zip(moved, expected, strict=True)))
    )


@pytest.mark.parametrize("store", STORES)
async def test_every_store_delivers_features_on_each_ranks_gpu(store: str) -> None:
    async with Pipeline(config(store), probe=OnDevice()) as pipeline:
        await send_all(pipeline, distinct(12), store)


async def test_features_already_on_the_gpu_reach_every_rank_through_each_store() -> None:
    for store in STORES:
        async with Pipeline(config(store), probe=OnDevice()) as pipeline:
            samples = [on_gpu(s) for s in distinct(4)]
            for i, sample in enumerate(samples):
                trace = await pipeline.generate_traced(
                    f"gpu-{store}-{i}", sample.input_ids, sample.mm_inputs
                )
                assert {r.data["content_digest"] for r in trace.reports} == {digest(sample)}


def test_the_pinned_store_page_locks_the_arena_on_each_gpu_rank() -> None:
    options = StoreOptions(capacity_bytes=8 << 20, consumers=1, timeout_s=5.0, min_bytes=1024)
    for cls, locked in ((PinnedShmStore, True), (ShmStore, False)):
        producer = cls.create(options)
        rank = cls.attach(
            producer.address, 0, StoreOptions(**{**vars(options), "device": "cuda:0"})
        )
        try:
            ref = producer.put(torch.arange(1 << 18, dtype=torch.float32))
            assert ref is not None
            view = rank.resolve(ref)
            assert view.is_pinned() is locked, cls.name
            assert torch.equal(view.cuda().cpu(), torch.arange(1 << 18, dtype=torch.float32))
            del view
        finally:
            rank.close()
            producer.close()


def test_a_gpu_tensor_reaches_the_shm_arena_in_one_copy() -> None:
    # The store's put and a placement's put both take a GPU tensor straight into the arena
    # (no page-locked staging tensor): every dtype and a non-contiguous one arrive exact.
    options = StoreOptions(capacity_bytes=8 << 20, consumers=1, timeout_s=5.0, min_bytes=1024)
    producer = ShmStore.create(options)
    rank = ShmStore.attach(producer.address, 0, options)
    try:
        tensors = [
            torch.randn(300, 200, device="cuda"),
            torch.randint(0, 255, (3, 448, 448), dtype=torch.uint8, device="cuda"),
            torch.randn(64, 64, device="cuda").to(torch.bfloat16).t(),  # non-contiguous
        ]
        for tensor in tensors:
            ref = producer.put(tensor)
            assert ref is not None and ref.device == "cpu"
            assert torch.equal(rank.resolve(ref), tensor.cpu())
        placement = producer.placement()
        try:
            ref = placement.put(tensors[0])
            assert ref is not None
            assert torch.equal(rank.resolve(ref), tensors[0].cpu())
        finally:
            placement.finish()
    finally:
        rank.close()
        producer.close()


async def test_a_full_cuda_pool_rejects_at_once_and_serves_again() -> None:
    # 8 MB of pool, 3 MB features, ranks that take 300 ms per iteration: a burst of twelve
    # cannot all be in the pool at once. Under reject the rest fail with Overloaded at once,
    # and once the ranks are done with theirs the pool serves again.
    settings = config("cuda-ipc", cuda_pool_mb=8, backpressure="reject", max_inflight_mb=None)
    async with Pipeline(settings, probe=OnDevice(step_ms=300)) as pipeline:
        samples = [on_gpu(s) for s in distinct(12, rows=320)]
        started = time.monotonic()
        outcomes = await asyncio.gather(
            *(
                pipeline.generate_traced(f"burst-{i}", s.input_ids, s.mm_inputs)
                for i, s in enumerate(samples)
            ),
            return_exceptions=True,
        )
        refused = [o for o in outcomes if isinstance(o, Overloaded)]
        served = [o for o in outcomes if not isinstance(o, BaseException)]
        assert refused and served and len(refused) + len(served) == len(samples), outcomes
        for trace, sample in zip(outcomes, samples, strict=True):
            if not isinstance(trace, BaseException):
                assert {r.data["content_digest"] for r in trace.reports} == {digest(sample)}
        assert time.monotonic() - started < 10  # nobody waited for room
        await send_all(pipeline, distinct(3, rows=320, first=100), "after", concurrency=1)


def gpu_memory_in_use() -> int:
    """Device memory in use by every process (what the driver reports), in bytes."""
    free, total = torch.cuda.mem_get_info()
    return total - free


async def wait_gone(pids: list[int], within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while any(os.path.exists(f"/proc/{pid}") for pid in pids):
        assert time.monotonic() < deadline, f"still alive: {pids}"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("store", ["pinned", "cuda-ipc"])
async def test_a_thousand_requests_a_killed_rank_and_a_restart_leak_no_gpu_memory(
    store: str,
) -> None:
    torch.cuda.init()
    gc.collect()
    torch.cuda.empty_cache()
    allocated_before = torch.cuda.memory_allocated()
    in_use_before = gpu_memory_in_use()
    settings = config(store, shm_arena_mb=32, cuda_pool_mb=32)  # the ring wraps ~60 times
    async with Pipeline(settings, probe=OnDevice()) as pipeline:
        await send_all(pipeline, distinct(1000, rows=200), f"{store}-a")
        pids = pipeline.pids
        os.kill(pids[1], signal.SIGKILL)
        with pytest.raises(PeerLost):
            for i in range(100):
                sample = distinct(1, first=5000 + i)[0]
                await pipeline.generate_traced(
                    f"after-kill-{i}", sample.input_ids, sample.mm_inputs
                )
                await asyncio.sleep(0.05)
    await wait_gone(pids, within_s=30)
    async with Pipeline(settings, probe=OnDevice()) as pipeline:
        await send_all(pipeline, distinct(50, rows=200, first=9000), f"{store}-b")
        pids = pipeline.pids
    await wait_gone(pids, within_s=30)
    gc.collect()
    torch.cuda.empty_cache()
    assert torch.cuda.memory_allocated() == allocated_before
    # Every rank's context and copies, and the pool, are gone with their owners.
    deadline = time.monotonic() + 10
    while gpu_memory_in_use() > in_use_before + (64 << 20) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert gpu_memory_in_use() <= in_use_before + (64 << 20), (
        f"{(gpu_memory_in_use() - in_use_before) >> 20} MiB more in use than before"
    )


@pytest.mark.parametrize("store", ["pinned", "cuda-ipc"])
async def test_the_feature_cache_keeps_each_ranks_copy_on_its_gpu(store: str) -> None:
    # Three images, then each again twice: the repeats are served from every rank's cache,
    # on its device, with the tokenizer's exact bytes.
    settings = config(store, feature_cache_mb=64)
    async with Pipeline(settings, probe=OnDevice()) as pipeline:
        first = distinct(3)
        await send_all(pipeline, first, f"{store}-first", concurrency=1)
        before = pipeline.request_bytes_sent
        await send_all(pipeline, first + first, f"{store}-again", concurrency=1)
        stats = pipeline.cache_stats()
        assert stats is not None and stats.hits == 6 and stats.misses == 3, stats
        ids = 8 * len(first[0].input_ids)
        assert (pipeline.request_bytes_sent - before) / 6 - ids < 1024


async def test_a_rank_group_delivers_on_each_ranks_gpu(tmp_path: Path) -> None:
    from mmsched import TokenizedGenerateReqInput
    from mmsched.rank_group import RankGroup

    group_config = config("pinned")
    entry, other = await asyncio.gather(
        RankGroup.join(group_config, 0, tmp_path), RankGroup.join(group_config, 1, tmp_path)
    )
    async with entry, other:
        sample = distinct(1)[0]
        published = await entry.publish(
            [TokenizedGenerateReqInput("g", sample.input_ids, {}, sample.mm_inputs)]
        )
        received = await other.receive()
        for iteration in (published, received):
            (req,) = iteration.requests
            assert isinstance(req.mm_inputs, MultimodalInputs)
            feature = req.mm_inputs.mm_items[0].feature
            assert feature.device.type == "cuda"
            assert torch.equal(feature.cpu(), sample.mm_inputs["mm_items"][0]["feature"])


async def test_on_rank_start_gets_each_ranks_cuda_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import orjson

    import rank_hooks

    monkeypatch.setenv("RANK_HOOKS_TEST_DIR", str(tmp_path))
    async with Pipeline(config("pinned"), on_rank_start=rank_hooks.load_model):
        devices = [
            orjson.loads((tmp_path / f"rank{r}.json").read_bytes())["device"] for r in range(TP)
        ]
    count = torch.cuda.device_count()
    assert devices == [f"cuda:{r % count}" for r in range(TP)]
