"""The shared-memory arena and the ``shm`` payload store: written once, viewed without
copies, reclaimed, never leaked."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mmsched import (
    ArenaFull,
    CodecError,
    Config,
    ConfigError,
    Decoder,
    MultimodalInputs,
    Pipeline,
    RankTimings,
    TokenizedGenerateReqInput,
    TransportError,
    encode,
)
from mmsched.bench.workloads import image_sample, ordinary_memory, restamped
from mmsched.hashing import tensor_bytes
from mmsched.messages import MaterializedInputs
from mmsched.stores import PayloadRef, StoreOptions
from mmsched.stores.arena import (
    SHM_DIR,
    ArenaReader,
    ArenaWriter,
    Ref,
    live_segments,
    sweep_stale_segments,
)
from mmsched.stores.copying import ParallelCopier
from mmsched.stores.shm import ShmStore

OPTIONS = StoreOptions(capacity_bytes=1 << 20, consumers=1, timeout_s=0.2, min_bytes=1024)


@pytest.fixture
def store() -> ShmStore:
    producer = ShmStore.create(OPTIONS)
    yield producer
    producer.close()


@pytest.fixture
def arena() -> ArenaWriter:
    writer = ArenaWriter(1 << 20, n_readers=1, timeout_s=0.2)
    yield writer
    writer.close()


def test_payload_is_written_once_and_viewed_in_place(arena: ArenaWriter) -> None:
    reader = ArenaReader(arena.name, 0)
    payload = os.urandom(300_000)
    ref = arena.put(payload)
    view = reader.view(ref)
    assert bytes(view) == payload
    # The view is shared memory itself, not a copy: the writer's later bytes show through.
    writer_side = np.frombuffer(arena._mapped.mm, dtype=np.uint8, count=4, offset=ref.offset)
    writer_side[:] = [1, 2, 3, 4]
    assert bytes(view[:4]) == b"\x01\x02\x03\x04"
    del writer_side
    reader.close()


def test_space_is_reclaimed_when_views_are_dropped(arena: ArenaWriter) -> None:
    reader = ArenaReader(arena.name, 0)
    for i in range(40):  # 40 x 200 kB through a 1 MiB ring
        view = reader.view(arena.put(bytes([i]) * 200_000))
        assert view[0] == i
        del view
    reader.close()


def test_full_arena_raises_naming_the_reader(arena: ArenaWriter) -> None:
    reader = ArenaReader(arena.name, 0)
    held = [reader.view(arena.put(b"x" * 300_000)) for _ in range(3)]
    with pytest.raises(ArenaFull, match="watermarks"):
        arena.put(b"y" * 300_000)
    del held
    gc.collect()
    arena.put(b"y" * 300_000)  # released: room again
    reader.close()


def test_oversized_payload_is_refused_and_travels_inline(store: ShmStore) -> None:
    consumer = ShmStore.attach(store.address, 0, OPTIONS)
    try:
        with pytest.raises(ArenaFull, match="exceeds the arena"):
            store._writer.put(b"z" * (2 << 20))  # type: ignore[union-attr]
        big = torch.full((2 << 20,), 7, dtype=torch.uint8)
        assert store.put(big) is None  # can never fit: the codec sends it in the frames
        frames = encode(MaterializedInputs(rid="r", mm_inputs=None), store)
        message = Decoder(store=consumer).decode(frames)
        assert isinstance(message, MaterializedInputs)
    finally:
        consumer.close()


def test_store_puts_tensors_once_and_allocated_ones_without_copy(store: ShmStore) -> None:
    consumer = ShmStore.attach(store.address, 0, OPTIONS)
    try:
        allocated = store.allocate((1000,), torch.float32)
        allocated.copy_(torch.arange(1000.0))
        ordinary = torch.randn(300, 100)
        in_place = store.put(allocated)
        copied = store.put(ordinary)
        assert in_place is not None and copied is not None
        # The allocated tensor went by a ref to its own allocation, not a copy.
        assert in_place.location[2] == allocated.data_ptr() - store._writer._mapped.base  # type: ignore[union-attr]
        assert (in_place.dtype, in_place.shape, in_place.device) == ("float32", (1000,), "cpu")
        assert len(orjson_dumps(in_place.to_tree())) < 200
        got = consumer.resolve(in_place)
        assert torch.equal(got, torch.arange(1000.0)) and torch.equal(
            consumer.resolve(copied), ordinary
        )
        allocated[0] = 42.0  # a write through the producer's tensor shows in the rank's view
        assert got[0] == 42.0
        # A consumer forwards what it resolved as the same reference (the entry rank), and
        # puts nothing else (it cannot write the arena): that travels inline.
        assert consumer.put(got) == in_place
        assert consumer.put(torch.randn(1000)) is None
    finally:
        consumer.close()


def test_staged_copies_run_beside_the_hash_and_put_returns_them() -> None:
    # 3 MB is above the size the copy is split into chunks for.
    options = StoreOptions(capacity_bytes=8 << 20, consumers=1, timeout_s=0.2, min_bytes=1024)
    producer = ShmStore.create(options)
    consumer = ShmStore.attach(producer.address, 0, options)
    try:
        first, second = torch.randn(750_001), torch.randn(5_000)  # an odd length: a short tail
        small = torch.randn(10)  # below min_bytes: not staged, travels inline
        with producer.placement() as placement:
            placement.stage([first, second, small])
            # Both copies were started before any put: their room is already reserved.
            assert len(producer._writer._live) == 2  # type: ignore[union-attr]
            refs = [placement.put(first), placement.put(second)]
            assert placement.put(small) is not None  # not staged: an ordinary copy
        assert all(r is not None for r in refs)
        producer.settle(placement.placed)
        got = [consumer.resolve(r) for r in refs if r is not None]
        assert torch.equal(got[0], first) and torch.equal(got[1], second)
        # Staged room never sent is reclaimed like any payload once later ones are read.
        with producer.placement() as unsent:
            unsent.stage([torch.randn(300_000)])
        del got
        gc.collect()
        for _ in range(4):  # 2.8 MB each: the ring wraps past the unsent room
            ref = producer.put(torch.randn(700_000))
            assert ref is not None
            consumer.resolve(ref)  # read and dropped at once
    finally:
        consumer.close()
        producer.close()


def test_parallel_copy_matches_for_any_length() -> None:
    copier = ParallelCopier(threads=3)
    try:
        for n in (0, 1, 65, (1 << 20) - 1, (3 << 20) + 7):
            src = torch.randint(0, 256, (n,), dtype=torch.uint8)
            dst = torch.zeros(n, dtype=torch.uint8)
            copier.copy(dst.data_ptr(), src.data_ptr(), n)
            assert torch.equal(dst, src), n
    finally:
        copier.close()


def orjson_dumps(value: object) -> bytes:
    import orjson

    return orjson.dumps(value)


def test_put_tensor_writes_the_bytes_tensor_bytes_reads(arena: ArenaWriter) -> None:
    # On the CPU too (the GPU case: tests/test_gpu.py): a non-contiguous bf16 tensor's
    # bytes, as tensor_bytes reads them.
    tensor = torch.randn(40, 30).to(torch.bfloat16).t()
    ref = arena.put_tensor(tensor)
    reader = ArenaReader(arena.name, 0)
    try:
        view = bytes(reader.view(ref))
    finally:
        reader.close()
    assert ref.nbytes == tensor.numel() * 2 and view == bytes(tensor_bytes(tensor))


class _OnGpu:
    """A CPU tensor that says it is on a GPU: put_tensor takes its device path."""

    device = SimpleNamespace(type="cuda")

    def __init__(self, tensor: torch.Tensor) -> None:
        self._tensor = tensor

    def detach(self) -> torch.Tensor:
        return self._tensor


@pytest.mark.parametrize("hold", [True, False])
def test_a_failed_copy_from_the_gpu_gives_its_room_back(
    arena: ArenaWriter, monkeypatch: pytest.MonkeyPatch, hold: bool
) -> None:
    # 600 KB of a 1 MiB arena whose copy fails (a CUDA error surfaces there): the room was
    # never sent, so 600 KB more fit at once, held or not, no reader having read anything.
    def failing(*args: object, **kwargs: object) -> torch.Tensor:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    payload = torch.zeros(600_000, dtype=torch.uint8)
    with monkeypatch.context() as patched:
        patched.setattr(torch, "frombuffer", failing)
        with pytest.raises(RuntimeError, match="CUDA error"):
            arena.put_tensor(_OnGpu(payload), hold=hold)
    ref = arena.put(bytes(600_000), wait=False)
    assert ref.nbytes == 600_000


@pytest.mark.parametrize("hold", [True, False])
def test_a_failed_copy_from_the_host_gives_its_room_back(
    arena: ArenaWriter, monkeypatch: pytest.MonkeyPatch, hold: bool
) -> None:
    # The same for put: a copy that fails leaves room no reader will see, and it is free.
    class FailingCopier:
        def copy(self, *args: object) -> None:
            raise RuntimeError("cannot schedule new futures after shutdown")

    with monkeypatch.context() as patched:
        patched.setattr("mmsched.stores.arena.shared_copier", FailingCopier)
        with pytest.raises(RuntimeError, match="after shutdown"):
            arena.put(bytes(600_000), hold=hold)
    ref = arena.put(bytes(600_000), wait=False)
    assert ref.nbytes == 600_000


def test_a_copy_that_fails_to_start_returns_only_once_its_chunks_are_done() -> None:
    # The pool refuses the second chunk (shut down): the first, already running, must be
    # done before the error reaches the caller, who may then give its room up.
    copier = ParallelCopier(threads=2)
    finished = threading.Event()

    def slow_chunk() -> int:
        time.sleep(0.2)
        finished.set()
        return 0

    real_pool = copier._pool
    submitted: list[Future[int]] = []

    class RefusingPool:
        def submit(self, *args: object) -> Future[int]:
            if submitted:
                raise RuntimeError("cannot schedule new futures after shutdown")
            submitted.append(real_pool.submit(slow_chunk))
            return submitted[0]

    copier._pool = RefusingPool()  # type: ignore[assignment]
    src, dst = bytearray(2 << 20), bytearray(2 << 20)
    try:
        with pytest.raises(RuntimeError, match="after shutdown"):
            copier.copy(_address_of(dst), _address_of(src), len(src))
        assert finished.is_set()
    finally:
        real_pool.shutdown(wait=True)


def _address_of(buffer: bytearray) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


def test_dev_shm_too_small_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="enlarge /dev/shm"):
        ArenaWriter(1 << 60, n_readers=1)


def test_an_arena_beyond_the_memory_left_is_refused_before_any_page_is_taken(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A /dev/shm sized at the host's RAM has room the memory does not: reserving it would
    wake the OOM killer (which kills the largest process, not the caller), so it is refused."""
    from mmsched.stores import arena

    before = live_segments()
    monkeypatch.setattr(arena, "_memory_available", lambda: 8 << 20)
    with pytest.raises(ConfigError, match="8 MiB of memory available"):
        ArenaWriter(64 << 20, n_readers=1)
    assert live_segments() == before
    monkeypatch.undo()
    memory = arena._memory_available()  # the real reading: /proc/meminfo on Linux
    assert memory is None or memory > 64 << 20


def test_a_containers_memory_limit_bounds_the_arena(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # docker --memory: /proc/meminfo shows the host's memory, the cgroup the container's.
    from mmsched.stores import arena

    # 96 MiB allowed, 48 MiB used, of which 16 MiB page cache that can be dropped (24 MiB
    # of "file" is page cache, 8 MiB of it shared memory, which cannot): 64 MiB left.
    (tmp_path / "memory.max").write_text(f"{96 << 20}\n")
    (tmp_path / "memory.current").write_text(f"{48 << 20}\n")
    (tmp_path / "memory.stat").write_text(f"anon {24 << 20}\nfile {24 << 20}\nshmem {8 << 20}\n")
    monkeypatch.setattr(arena, "CGROUP_DIR", tmp_path)
    assert arena._memory_available() == 64 << 20
    with pytest.raises(ConfigError, match="64 MiB of memory available"):
        ArenaWriter(128 << 20, n_readers=1)
    (tmp_path / "memory.max").write_text("max\n")
    memory = arena._memory_available()
    assert memory is not None and memory > 64 << 20


def test_stale_segments_of_dead_processes_are_swept() -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    stale = SHM_DIR / f"mmsched-{dead.stdout.strip()}-deadbeef"
    stale.write_bytes(b"left by a crashed run")
    mine = ArenaWriter(4096, n_readers=1)
    try:
        assert stale.name in sweep_stale_segments()
        assert stale.name not in live_segments()
        assert mine.name in live_segments()  # a live process's segment stays
    finally:
        mine.close()
    assert mine.name not in live_segments()


def test_zero_copy_request_crosses_sockets_in_under_1_kb() -> None:
    # What zero-copy sends to the entry rank for a Qwen2-VL image (18.8 MB of pixel values,
    # 1000 image tokens): the tensors go by reference, the rest is a small header.
    from mmsched.bench.workloads import qwen2vl_image

    big = ShmStore.create(StoreOptions(capacity_bytes=32 << 20, consumers=1, min_bytes=4096))
    try:
        sample = qwen2vl_image()
        built = MultimodalInputs.from_dict(sample.mm_inputs)
        frames = encode(TokenizedGenerateReqInput("r", sample.input_ids, mm_inputs=built), big)
        on_the_wire = sum(memoryview(f).nbytes for f in frames)
        # The token ids (1,000 int64) ride along as one frame of 8 kB; everything else is
        # the header with its references.
        assert on_the_wire - 8 * len(sample.input_ids) < 1024, on_the_wire
    finally:
        big.close()


def test_forged_refs_are_refused(store: ShmStore) -> None:
    # Found by an adversarial review: nbytes=-1 returned the rest of the arena.
    arena = store._writer
    assert arena is not None
    reader = ArenaReader(arena.name, 0)
    ref = arena.put(os.urandom(1000))
    forged = [
        Ref(ref.arena, ref.seq, ref.offset, -1),
        Ref(ref.arena, -1, ref.offset, 10),
        Ref(ref.arena, ref.seq, 0, 10),  # the header page of watermarks
        Ref(ref.arena, ref.seq, ref.offset, 1 << 40),
        Ref("mmsched-other", ref.seq, ref.offset, 10),
        Ref(ref.arena, ref.seq, ref.offset, True),  # type: ignore[arg-type]
    ]
    for bad in forged:
        with pytest.raises(TransportError, match="not a payload of arena"):
            reader.view(bad)
    consumer = ShmStore.attach(store.address, 0, OPTIONS)
    good = ["shm", "uint8", [1000], "cpu", [ref.arena, ref.seq, ref.offset, ref.nbytes]]
    trees = [
        {},
        [1, 2],
        [*good[:4], [ref.arena, ref.seq, ref.offset, -1]],
        [*good[:4], [ref.arena, ref.seq, 0, 1000]],
        ["shm", "uint8", [2000], "cpu", good[4]],  # shape says more than the payload
        ["shm", "complex", [1000], "cpu", good[4]],
        ["shm", "uint8", [1000], "cuda:0", good[4]],
        ["other", "uint8", [1000], "cpu", good[4]],
    ]
    decoder = Decoder(store=consumer)
    for tree in trees:
        frames = [orjson_dumps({"v": 1, "n": 0, "msg": {"$t": "abort", "rid": {"$ref": tree}}})]
        with pytest.raises(CodecError):
            decoder.decode(frames)
    assert bytes(consumer.resolve(PayloadRef.from_tree(good)).numpy()) == bytes(reader.view(ref))
    reader.close()
    consumer.close()


def test_a_forked_child_copies_with_its_own_threads() -> None:
    from mmsched.stores.copying import shared_copier

    # numpy only: the child of a process that used torch's thread team must not use it.
    src = np.random.default_rng(0).integers(0, 256, 3 << 20, dtype=np.uint8)
    dst = np.zeros_like(src)
    shared_copier().copy(dst.ctypes.data, src.ctypes.data, src.nbytes)  # the parent's pool
    pid = os.fork()
    if pid == 0:  # the child: a copy must finish, not wait on the parent's threads
        dst[:] = 0
        shared_copier().copy(dst.ctypes.data, src.ctypes.data, src.nbytes)
        os._exit(0 if np.array_equal(dst, src) else 1)
    deadline = time.monotonic() + 20
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child's copy never finished")
    assert os.waitstatus_to_exitcode(done[1]) == 0


# -- concurrent senders ---------------------------------------------------------------------


def test_a_watermark_past_an_unsent_payload_does_not_free_it() -> None:
    """Two threads reserve 0 then 1; 1 is sent and read first. The reader's watermark then
    passes 0, which no reader has seen yet: only the writer's hold keeps it from reuse."""
    writer = ArenaWriter(1 << 16, 1, timeout_s=0.05)
    try:
        reader = ArenaReader(writer.name, 0)
        first, _ = writer.reserve(40_000, hold=True)  # still being hashed, not yet sent
        second = writer.put(b"x" * 20_000, hold=True)
        view = reader.view(second)
        del view
        gc.collect()
        writer.release(second.seq)
        with pytest.raises(ArenaFull):  # no room without reusing the unsent payload
            writer.reserve(40_000)
        writer.release(first.seq)  # sent and read by every reader, or never sent
        writer.reserve(40_000)
        reader.close()
    finally:
        writer.close()


async def test_concurrent_requests_through_a_small_arena_keep_their_bytes() -> None:
    """Requests prepared on several tokenizer threads finish hashing (and go out) in another
    order than they took room in the arena; the ring wraps many times meanwhile. Every rank
    must hold exactly the tokenizer's bytes for every request."""
    config = Config(
        strategy="zero-copy",
        transport="zmq",
        tp_size=2,
        shm_arena_mb=8,
        max_inflight_mb=None,
        hasher="blake3",
    )
    bases = [image_sample(2, 2 * rows, seed=rows) for rows in (100, 300, 600)]  # 0.9-5.6 MB
    async with Pipeline(config, probe=RankTimings(digest_prefix="")) as pipeline:
        for burst in range(4):
            samples = [
                restamped(bases[(burst + i) % 3], burst * 100 + i + 1, ordinary_memory)
                for i in range(40)
            ]
            expected = [
                MultimodalInputs.from_dict(s.mm_inputs, hasher="blake3").content_digest()
                for s in samples
            ]
            traces = await asyncio.gather(
                *(
                    pipeline.generate_traced(f"b{burst}-{i}", s.input_ids, s.mm_inputs)
                    for i, s in enumerate(samples)
                )
            )
            for trace, digest in zip(traces, expected, strict=True):
                assert {r.data["content_digest"] for r in trace.reports} == {digest}


async def test_the_shm_transport_over_the_shm_store_reserves_one_large_arena() -> None:
    # The store's arena holds the bytes; the transport's carries headers: together less
    # than two arenas of shm_arena_mb (which is what a host once had to hold).
    import os

    from mmsched import Config, Pipeline
    from own_run import shared_memory_of

    config = Config(transport="shm", payload_store="shm", tp_size=2, shm_arena_mb=512)
    async with Pipeline(config) as pipeline:
        mapped = shared_memory_of([os.getpid(), *pipeline.pids])
    assert 512 << 20 <= mapped <= (512 + 256 + 1) << 20, mapped >> 20
