"""The shared-memory arena: written once, viewed without copies, reclaimed, never leaked."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from mmsched import ConfigError, TransportError
from mmsched.shm import (
    SHM_DIR,
    ArenaFull,
    ArenaReader,
    ArenaWriter,
    Ref,
    live_segments,
    open_reader,
    pack,
    register_writer,
    sweep_stale_segments,
    unpack,
    unregister_writer,
)


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


def test_oversized_payload_is_refused_and_packs_inline(arena: ArenaWriter) -> None:
    with pytest.raises(ArenaFull, match="exceeds the arena"):
        arena.put(b"z" * (2 << 20))
    packed = pack([b"h", b"z" * (2 << 20)], arena, min_bytes=1024)
    assert [memoryview(f).nbytes for f in packed[1:]] == [1, 2 << 20]  # both inline
    assert [bytes(f) for f in unpack(packed)] == [b"h", b"z" * (2 << 20)]


def test_pack_sends_big_frames_by_ref_and_in_arena_tensors_without_copy(arena: ArenaWriter) -> None:
    register_writer(arena)
    reader = open_reader(arena.name, 0)  # unpack resolves refs through this process's readers
    try:
        tensor = arena.allocate_tensor((1000,), torch.float32)
        tensor.copy_(torch.arange(1000.0))
        big = os.urandom(100_000)
        packed = pack([b"header", big, tensor.numpy().data], arena, min_bytes=1024)
        assert len(packed) == 2  # descriptor + the inline header: two payloads by ref
        frames = unpack(packed)
        assert bytes(frames[0]) == b"header" and bytes(frames[1]) == big
        got = np.frombuffer(frames[2], dtype=np.float32)
        assert np.array_equal(got, np.arange(1000.0, dtype=np.float32))
        # The tensor went by a ref to its own allocation, not a copy: same offset, and a
        # write through the tensor shows in the reader's view of the same memory.
        descriptors = json.loads(bytes(packed[0])[len(b"MMSHM1") :])
        assert descriptors[2][2] == tensor.data_ptr() - arena._mapped.base
        tensor[0] = 42.0
        assert got[0] == 42.0
    finally:
        unregister_writer(arena)
        reader.close()


def test_dev_shm_too_small_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="enlarge /dev/shm"):
        ArenaWriter(1 << 60, n_readers=1)


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
    # 1000 image tokens): everything over 4 KiB goes by ref, the rest is a small header.
    from mmsched import MultimodalInputs, TokenizedGenerateReqInput, encode
    from mmsched.bench.workloads import qwen2vl_image
    from mmsched.tokenizer import ARENA_MIN_BYTES

    big_arena = ArenaWriter(32 << 20, n_readers=1)
    try:
        sample = qwen2vl_image()
        built = MultimodalInputs.from_dict(sample.mm_inputs)
        frames = encode(TokenizedGenerateReqInput("r", sample.input_ids, mm_inputs=built))
        packed = pack(frames, big_arena, ARENA_MIN_BYTES)
        on_the_wire = sum(memoryview(f).nbytes for f in packed)
        assert on_the_wire < 1024, on_the_wire
    finally:
        big_arena.close()


def test_forged_refs_are_refused(arena: ArenaWriter) -> None:
    # Found by an adversarial review: nbytes=-1 returned the rest of the arena.
    reader = open_reader(arena.name, 0)
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
    for descriptors in (b"{}", b"[[1, 2]]", b"[7]", b"not json", b'[["%s", 0, 4096, -1]]'):
        frames = [b"MMSHM1" + descriptors.replace(b"%s", arena.name.encode())]
        with pytest.raises(TransportError):
            unpack(frames)
    assert bytes(reader.view(ref)) == bytes(reader.view(ref))  # the real ref still works
    reader.close()
