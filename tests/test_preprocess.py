"""The preprocessing stage of ``mmsched serve``: content keys of the encoded bytes, the
processed-features cache, the process pool writing into the payload store (a worker killed
mid-image, shutdown), the caller-supplied hash, and the cuda backend (skipped without CUDA)."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import re
import signal
import time
from collections.abc import AsyncIterator

import numpy as np
import psutil
import pytest
import pytest_asyncio
import torch

Image = pytest.importorskip("PIL.Image", reason="the serve extra installs Pillow")
pytest.importorskip("transformers", reason="the serve extra installs transformers")

from mmsched import Config, Pipeline  # noqa: E402
from mmsched.errors import InvalidMultimodalInput, Overloaded, PreprocessWorkerLost  # noqa: E402
from mmsched.hashing import hash_stats, pad_values_of  # noqa: E402
from mmsched.inputs import MultimodalInputs  # noqa: E402
from mmsched.pixels import resized_pixels, specs_of  # noqa: E402
from mmsched.preprocess import Preprocessor, StageSettings, content_key, key_hash  # noqa: E402
from mmsched.preprocess.backend import Processed  # noqa: E402
from mmsched.preprocess.cache import ProcessedCache  # noqa: E402
from mmsched.preprocess.keys import processor_identity  # noqa: E402
from mmsched.preprocess.pool import ProcessPoolBackend  # noqa: E402
from mmsched.preprocess.processor import (  # noqa: E402
    PIL,
    TORCHVISION,
    build_processor,
    torchvision_available,
)
from mmsched.preprocess.threads import ThreadBackend  # noqa: E402
from mmsched.serve.chat import ChatProcessor  # noqa: E402
from mmsched.serve.media import BadRequest, EncodedImage, MediaLimits  # noqa: E402

LIMITS = MediaLimits()
WORKER_BACKEND = TORCHVISION if torchvision_available() else PIL


def encoded(width: int = 64, height: int = 48, seed: int = 0, fmt: str = "PNG") -> EncodedImage:
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return EncodedImage(f"image[{seed}]", out.getvalue(), fmt)


def url_of(image: EncodedImage) -> str:
    media = "image/png" if image.format == "PNG" else "image/jpeg"
    return f"data:{media};base64," + base64.b64encode(image.data).decode()


def messages(*images: EncodedImage) -> list[object]:
    parts = [{"type": "image_url", "image_url": {"url": url_of(i)}} for i in images]
    return [{"role": "user", "content": [{"type": "text", "text": "what?"}, *parts]}]


# -- content keys ----------------------------------------------------------------------------


def test_same_bytes_and_processor_give_the_same_key_any_change_another() -> None:
    pil = build_processor(PIL)
    identity = processor_identity(PIL, pil)
    image = encoded()
    key = content_key(image.data, "PNG", identity)
    assert len(key) == 32
    rebuilt = processor_identity(PIL, build_processor(PIL))
    assert content_key(bytes(image.data), "PNG", rebuilt) == key
    flipped = bytes([image.data[0] ^ 1]) + image.data[1:]
    other_options = type(pil)(min_pixels=56 * 56 * 4)
    others = {
        content_key(flipped, "PNG", identity),
        content_key(image.data, "JPEG", identity),
        content_key(image.data, "PNG", processor_identity(PIL, other_options)),
        content_key(image.data, "PNG", processor_identity("cuda", pil)),
    }
    assert key not in others and len(others) == 4
    assert key_hash(key) == int.from_bytes(key[:8], "big")


def test_key_fields_are_length_prefixed() -> None:
    # The same bytes split differently between the fields: a plain concatenation would
    # give both the same key.
    assert content_key(b"Zdata", "PNG", b"id") != content_key(b"data", "PNG", b"idZ")
    assert content_key(b"data", "PNGX", b"id") != content_key(b"Xdata", "PNG", b"id")


# -- the cache -------------------------------------------------------------------------------


def test_the_cache_evicts_the_least_recently_used_within_its_budget() -> None:
    cache = ProcessedCache(capacity_bytes=3 * 400)
    tensors = {k: torch.full((100,), float(n)) for n, k in enumerate([b"a", b"b", b"c", b"d"])}
    for key in (b"a", b"b", b"c"):
        assert cache.put(key, tensors[key], (1, 1, 1))
    assert cache.get(b"a") is not None  # a is now the most recent: b goes first
    assert cache.put(b"d", tensors[b"d"], (1, 1, 1))
    assert cache.get(b"b") is None
    assert cache.get(b"a") is not None and cache.get(b"d") is not None
    assert not cache.put(b"huge", torch.zeros(1000), (1, 1, 1))  # over the whole budget
    stats = cache.stats()
    assert (stats.entries, stats.bytes_held, stats.evictions) == (3, 1200, 1)
    kept = cache.get(b"a")
    assert kept is not None and kept.pixels.data_ptr() != tensors[b"a"].data_ptr()  # a copy


async def test_a_repeat_is_neither_decoded_nor_processed() -> None:
    stage = Preprocessor(StageSettings(backend="threads", cache_mb=64), LIMITS)
    await stage.start(None)
    try:
        image = encoded(seed=1)
        [first] = await stage.process([image])
        [again] = await stage.process([EncodedImage("elsewhere", bytes(image.data), "PNG")])
        stats = stage.stats()
        assert (stats.processed, stats.cached) == (1, 1)
        assert stats.cache is not None and stats.cache.hits == 1
        assert not isinstance(first, BaseException) and not isinstance(again, BaseException)
        assert again.cached and again.key == first.key
        assert torch.equal(again.processed.pixels, first.processed.pixels)
        assert 'mmsched_preprocess_images_total{outcome="cached"} 1' in stage.metrics_text()
        # The same image twice in one request: processed once.
        twice = encoded(seed=2)
        results = await stage.process([twice, twice])
        assert stage.stats().processed == 2
        assert all(not isinstance(r, BaseException) for r in results)
    finally:
        await stage.aclose()


async def test_a_bad_image_fails_alone_among_good_ones() -> None:
    stage = Preprocessor(StageSettings(backend="threads", cache_mb=0), LIMITS)
    await stage.start(None)
    chat = ChatProcessor(preprocessor=stage)
    try:
        good, bad = encoded(seed=3), EncodedImage("x", b"\x89PNG\r\n\x1a\nnot really", "PNG")
        results = await stage.process([good, bad, encoded(seed=4)])
        assert [type(r).__name__ for r in results] == ["Result", "BadRequest", "Result"]
        with pytest.raises(BadRequest) as refused:
            await chat.prepare_async(messages(good, bad))
        assert refused.value.param == "messages[0].content[2].image_url"
        prepared = await chat.prepare_async(messages(good))
        assert prepared.images == 1
    finally:
        await stage.aclose()


# -- the caller-supplied hash ----------------------------------------------------------------


def item(**extra: object) -> dict[str, object]:
    return {
        "mm_items": [
            {
                "modality": "image",
                "feature": torch.ones(4, 1176),
                "offsets": [(1, 1)],
                "image_grid_thw": torch.tensor([[1, 2, 2]]),
                **extra,
            }
        ]
    }


def test_a_supplied_hash_is_the_items_hash_and_nothing_is_hashed() -> None:
    key = content_key(b"bytes", "PNG", b"identity")
    before = hash_stats()
    built = MultimodalInputs.from_dict(item(content_hash=key), input_len=3)
    counted = hash_stats() - before
    assert (counted.count, counted.supplied) == (0, 1)
    assert built.mm_items[0].hash == key_hash(key)
    assert built.mm_items[0].pad_values == pad_values_of(key_hash(key))
    assert "content_hash" not in built.mm_items[0].model_specific_data
    assert MultimodalInputs.from_dict(item(content_hash=7)).mm_items[0].hash == 7


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (b"short", "8 to 64 bytes"),
        (b"x" * 65, "8 to 64 bytes"),
        ("0123456789abcdef", "an int or bytes"),
        (True, "an int or bytes"),
        (-1, "[0, 2**64)"),
        (2**64, "[0, 2**64)"),
    ],
)
def test_an_invalid_supplied_hash_is_refused(value: object, problem: str) -> None:
    with pytest.raises(InvalidMultimodalInput, match="content_hash") as refused:
        MultimodalInputs.from_dict(item(content_hash=value))
    assert refused.value.field == "mm_items[0].content_hash" and problem in str(refused.value)


async def test_generate_takes_the_supplied_hash_without_hashing() -> None:
    key = content_key(b"other bytes", "PNG", b"identity")
    config = Config(transport="memory", tp_size=2, feature_cache_mb=16)
    async with Pipeline(config) as pipeline:
        before = hash_stats()
        output = await pipeline.generate("r", [0, 5, 0], item(content_hash=key))
        again = await pipeline.generate("r2", [0, 5, 0], item(content_hash=key))
        counted = hash_stats() - before
        stats = pipeline.cache_stats()
    assert output.pad_values == [pad_values_of(key_hash(key))[0]]
    assert again.pad_values == output.pad_values
    assert (counted.count, counted.supplied) == (0, 2)
    assert stats is not None and stats.hits == 1  # the ranks' cache keyed by the same key


# -- the process pool ------------------------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pool() -> AsyncIterator[tuple[Pipeline, ProcessPoolBackend]]:
    config = Config(transport="memory", tp_size=1, shm_arena_mb=64, timeout_s=30)
    async with Pipeline(config) as pipeline:
        backend = ProcessPoolBackend(LIMITS, 2, WORKER_BACKEND, timeout_s=30)
        await backend.start(pipeline)
        try:
            yield pipeline, backend
        finally:
            await backend.aclose()


@pytest.mark.asyncio(loop_scope="module")
async def test_the_pool_writes_features_into_the_store(
    pool: tuple[Pipeline, ProcessPoolBackend],
) -> None:
    pipeline, backend = pool
    assert backend.lends and len(set(backend.pids)) == 2
    assert all(pid != os.getpid() for pid in backend.pids)
    images = [encoded(seed=s) for s in (5, 6, 7)]
    results = await backend.process(images)
    reference = ThreadBackend(LIMITS) if WORKER_BACKEND == PIL else None
    for image, result in zip(images, results, strict=True):
        assert isinstance(result, Processed) and not result.owned  # a view of the arena
        if reference is not None:
            expected = reference.process_one(image)
            assert isinstance(expected, Processed)
            assert torch.equal(result.pixels, expected.pixels) and result.grid == expected.grid
    output = await pipeline.generate(
        "pooled", [0, *[9] * 4, 0], {"mm_items": [_item_of(results[0])]}
    )
    assert len(output.pad_values) == 1


def _item_of(result: object) -> dict[str, object]:
    assert isinstance(result, Processed)
    t, h, w = result.grid
    tokens = t * h * w // 4
    return {
        "modality": "image",
        "feature": result.pixels,
        "offsets": [(1, tokens)],
        "image_grid_thw": torch.tensor([list(result.grid)]),
    }


@pytest.mark.asyncio(loop_scope="module")
async def test_a_bad_image_in_the_pool_fails_alone(
    pool: tuple[Pipeline, ProcessPoolBackend],
) -> None:
    _, backend = pool
    bad = EncodedImage("bad", b"\xff\xd8\xff\xe0 truncated", "JPEG")
    wide = encoded(width=2000, height=8, seed=8)  # aspect ratio over 200: the processor refuses
    results = await backend.process([encoded(seed=9), bad, wide, encoded(seed=10)])
    kinds = [type(r).__name__ for r in results]
    assert kinds == ["Processed", "BadRequest", "BadRequest", "Processed"]
    assert "refused" in str(results[2])


@pytest.mark.asyncio(loop_scope="module")
async def test_a_worker_killed_mid_image_fails_that_image_and_is_replaced(
    pool: tuple[Pipeline, ProcessPoolBackend],
) -> None:
    _, backend = pool
    big = encoded(width=2400, height=1800, seed=11)  # long enough to be caught in the act
    work = asyncio.ensure_future(backend.process([big]))
    deadline = time.monotonic() + 20
    while not backend.busy_pids() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    [victim] = backend.busy_pids()
    os.kill(victim, signal.SIGKILL)
    [outcome] = await asyncio.wait_for(work, 30)
    assert isinstance(outcome, PreprocessWorkerLost) and str(victim) in str(outcome)
    # The pool recovers: the next images are served, by a new process in the dead one's place.
    results = await asyncio.wait_for(backend.process([encoded(seed=12), encoded(seed=13)]), 60)
    assert all(isinstance(r, Processed) for r in results)
    # The replacement starts right after the lost image's answer, and may still be starting
    # (importing torch takes seconds on a loaded machine) when the other worker has served
    # those two: the pool is whole again within a bound, not necessarily by then.
    deadline = time.monotonic() + 60
    while len(backend.pids) < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert victim not in backend.pids and len(backend.pids) == 2 and backend.replaced >= 1


async def test_a_pool_without_a_lending_store_returns_features_by_pipe_and_leaves_nothing() -> None:
    backend = ProcessPoolBackend(LIMITS, 1, WORKER_BACKEND, timeout_s=30)
    await backend.start(None)
    try:
        [pid] = backend.pids
        [result] = await backend.process([encoded(seed=14)])
        assert isinstance(result, Processed) and result.owned and not backend.lends
        assert result.pixels.shape[1] == 1176
    finally:
        await backend.aclose()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    with pytest.raises(PreprocessWorkerLost):
        await backend.process([encoded(seed=15)])


async def test_uint8_wire_pixels_are_the_processors_resize_through_every_cpu_backend() -> None:
    """Under ``wire_pixels = "uint8"`` the backends make the resized uint8 pixels (through a
    worker's pipe as well as on threads), and the wire format is part of the content key."""
    images = [encoded(width=90, height=70, seed=s) for s in (16, 17)]
    threads = ThreadBackend(LIMITS, wire_pixels="uint8")
    pooled = ProcessPoolBackend(LIMITS, 1, WORKER_BACKEND, timeout_s=30, wire_pixels="uint8")
    await pooled.start(None)
    try:
        through_pipe = await pooled.process(images)
    finally:
        await pooled.aclose()
    resize, _ = specs_of(build_processor(PIL))
    for image, result in zip(images, through_pipe, strict=True):
        assert isinstance(result, Processed) and result.pixels.dtype == torch.uint8
        on_threads = threads.process_one(image)
        assert isinstance(on_threads, Processed)
        if WORKER_BACKEND == PIL:  # the same backend: the same bytes
            assert torch.equal(result.pixels, on_threads.pixels)
        with Image.open(io.BytesIO(image.data)) as decoded:
            expected, grid = resized_pixels(decoded.convert("RGB"), resize)
        assert torch.equal(on_threads.pixels, expected) and on_threads.grid == grid
    floats = ThreadBackend(LIMITS)
    assert floats.identity != threads.identity
    assert content_key(images[0].data, "PNG", floats.identity) != content_key(
        images[0].data, "PNG", threads.identity
    )


# -- the cuda backend ------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and torchvision_available()),
    reason="the cuda backend needs a CUDA GPU and torchvision (neither is here)",
)


def test_the_gpu_budget_reserves_what_each_wire_format_holds() -> None:
    # The budget's arithmetic needs no GPU: the cuda backend reserves GpuFootprint.of.
    from mmsched.errors import ConfigError
    from mmsched.preprocess.cuda import GpuBudget, GpuFootprint

    processor = build_processor(PIL)
    floats = GpuFootprint(processor, "float32").of(1024, 768)
    uint8 = GpuFootprint(processor, "uint8").of(1024, 768)
    decoded = 3 * 1024 * 768
    assert uint8.held == 3 * 756 * 1036  # the resized pixels, 2.35 MB
    assert floats.held == 3996 * 1176 * 4 == 8 * uint8.held  # pixel_values, 18.8 MB
    assert floats.work == decoded + floats.held  # the processor's intermediates: as much again
    # uint8: stacked with the images of its size (a copy), resized in float32 on the GPU
    # (a float copy in, a float image out).
    assert uint8.work == 2 * decoded + 4 * (decoded + uint8.held)
    assert uint8.total < floats.total

    def held_at_once(footprint: GpuFootprint) -> int:
        """Images whose features wait for the pipeline, each batch done, until one is refused."""
        budget, count = GpuBudget(256 << 20), 0
        while budget.reserve(footprint.of(1024, 768).total):
            budget.release(footprint.of(1024, 768).work)  # its batch ran
            count += 1
        assert budget.refused == 1 and budget.held == count * footprint.of(1024, 768).held
        return count

    many, few = (
        held_at_once(GpuFootprint(processor, "uint8")),
        held_at_once(GpuFootprint(processor, "float32")),
    )
    assert many >= 7 * few, (many, few)
    with pytest.raises(ValueError):  # the processor refuses it: the backend answers 400
        GpuFootprint(processor, "uint8").of(201 * 28, 28)
    with pytest.raises(ConfigError, match="wire_pixels"):
        GpuFootprint(processor, "float16")


def test_a_batch_out_of_gpu_memory_is_retried_image_by_image(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The retry needs no GPU: the resize of the batch runs out of memory, as it would on one.
    from types import SimpleNamespace

    import mmsched.preprocess.processor as processor_module
    from mmsched.pixels import resized_batch
    from mmsched.preprocess.cuda import CudaBackend
    from mmsched.preprocess.processor import run_processor

    too_large = torch.zeros((3, 64, 96), dtype=torch.uint8)
    calls: list[int] = []

    def resize_in_little_memory(images: list[torch.Tensor], resize: object) -> object:
        calls.append(len(images))
        if len(images) > 1 or images[0] is too_large:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return resized_batch(images, resize)  # type: ignore[arg-type]

    monkeypatch.setattr(processor_module, "resized_batch", resize_in_little_memory)
    backend = CudaBackend.__new__(CudaBackend)  # its GPU is not needed for this
    backend._processor = build_processor(PIL)
    backend.device, backend.wire_pixels = torch.device("cpu"), "uint8"
    rng = np.random.default_rng(0)
    fits = [torch.from_numpy(rng.integers(0, 255, (3, 48, 64), dtype=np.uint8)) for _ in "ab"]
    decoded = [fits[0], too_large, BadRequest("c", "not decodable"), fits[1]]
    batch = [SimpleNamespace(image=EncodedImage(p, b"", "PNG")) for p in "abcd"]
    outcomes = backend._process(batch, decoded)  # type: ignore[arg-type]
    assert calls == [3, 1, 1, 1]  # the batch, then each image alone
    resize, _ = specs_of(backend._processor)
    for n, tensor in ((0, fits[0]), (3, fits[1])):
        got = outcomes[n]
        expected, grid = resized_pixels(tensor, resize)
        assert isinstance(got, Processed) and torch.equal(got.pixels, expected), n
        assert got.grid == grid
    # Only the image that does not fit even alone fails, and as the GPU's lack (503).
    assert isinstance(outcomes[1], Overloaded) and "b: the GPU ran out of memory" in str(
        outcomes[1]
    )
    assert isinstance(outcomes[2], BadRequest)

    # The float32 processor's OutOfMemoryError is no client's 400: it reaches the backend.
    def out_of_memory(**kwargs: object) -> object:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.cuda.OutOfMemoryError):
        run_processor(out_of_memory, "p", [fits[0]], torch.device("cpu"))


def test_a_batch_that_fails_whole_gives_back_all_its_gpu_budget() -> None:
    # A failure past the per-image handling (a pinned allocation, an asynchronous CUDA error
    # seen at the synchronize) fails the batch: none of it is handed over, so neither its
    # work nor its held share may stay reserved. No GPU needed: the decode fails first.
    from types import SimpleNamespace

    from mmsched.preprocess.cuda import CudaBackend, GpuBudget, Reservation

    backend = CudaBackend.__new__(CudaBackend)
    backend.budget = GpuBudget(1 << 30)
    backend.batches = backend.batched_images = 0
    reserved = Reservation(work=3 << 20, held=2 << 20)
    batch = [SimpleNamespace(reserved=reserved) for _ in range(4)]
    for _ in batch:
        assert backend.budget.reserve(reserved.total)

    def fails(items: object) -> object:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    backend._decode = fails  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="illegal memory access"):
        backend._run_batch(batch)  # type: ignore[arg-type]
    assert backend.budget.held == 0


def test_each_gpu_batch_says_at_debug_how_long_it_waited_and_ran(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # What finds where a cuda server's preprocessing time goes: no GPU needed to check it.
    import logging
    from types import SimpleNamespace

    from mmsched.preprocess.cuda import CudaBackend, GpuBudget, Reservation

    backend = CudaBackend.__new__(CudaBackend)
    backend.budget = GpuBudget(1 << 30)
    backend.batches = backend.batched_images = 0
    backend.device = torch.device("cpu")
    reserved = Reservation(work=1 << 20, held=0)

    def decode_in_20_ms(items: list[object]) -> list[object]:
        time.sleep(0.02)
        return [BadRequest("p", "x")] * len(items)

    monkeypatch.setattr(backend, "_decode", decode_in_20_ms)
    monkeypatch.setattr(backend, "_process", lambda items, decoded: decoded)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    admitted = time.monotonic() - 0.05  # the first image waited 50 ms for its batch
    batch = [SimpleNamespace(reserved=reserved, admitted=admitted + n * 0.01) for n in range(3)]
    with caplog.at_level(logging.DEBUG, logger="mmsched.preprocess.cuda"):
        backend._run_batch(batch)  # type: ignore[arg-type]
    [record] = [r for r in caplog.records if r.name == "mmsched.preprocess.cuda"]
    found = re.fullmatch(
        r"a batch of 3 images: the first admitted ([\d.]+) ms before it started; "
        r"it ran ([\d.]+) ms \(decode ([\d.]+), process ([\d.]+), GPU wait ([\d.]+); "
        r"on the CPU: decode ([\d.]+), process ([\d.]+)\)",
        record.getMessage(),
    )
    assert found is not None, record.getMessage()
    waited, ran, decode, process, gpu, decode_cpu, process_cpu = map(float, found.groups())
    assert 50 <= waited < 1050 and 20 <= ran < 1020, (waited, ran)
    assert 20 <= decode <= ran and process + gpu <= ran - decode + 0.2, found.groups()
    # The thread's CPU time is within its wall time (0.2 ms: the figures' rounding), and a
    # decode that slept shows as waiting: its CPU time far below its 20 ms.
    assert decode_cpu <= decode + 0.2 and process_cpu <= process + 0.2, found.groups()
    assert decode_cpu < 10, found.groups()

    # With DEBUG off nothing is worked out for the line: items without an admission time
    # (which the line would read) run all the same, and nothing is logged.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mmsched.preprocess.cuda"):
        backend._run_batch([SimpleNamespace(reserved=reserved)])  # type: ignore[list-item]
    assert not [r for r in caplog.records if r.name == "mmsched.preprocess.cuda"]


def photo(width: int, height: int, seed: int, fmt: str = "JPEG") -> EncodedImage:
    """Smooth colour with a little noise, as a photo is (pure noise is every decoder's and
    resizer's worst case, and no camera's)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([128 + 100 * np.sin(x / (40 + 9 * c) + y / (60 + 5 * c)) for c in range(3)], -1)
    pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt, quality=90)
    return EncodedImage(f"photo[{seed}]", out.getvalue(), fmt)


def jpeg(width: int, height: int, seed: int) -> EncodedImage:
    return photo(width, height, seed)


@pytest.mark.gpu
@needs_cuda
async def test_cuda_batches_decode_and_process_on_the_gpu_close_to_the_cpu() -> None:
    from mmsched.preprocess.cuda import CudaBackend
    from mmsched.preprocess.threads import ThreadBackend

    backend = CudaBackend(LIMITS, "cuda:0", 512, batch_ms=20, batch_images=8)
    await backend.start(None)
    cpu = ThreadBackend(LIMITS)
    try:
        images = [jpeg(320, 240, 20), photo(320, 240, 21, "PNG"), jpeg(400, 300, 22)]
        bad = EncodedImage("bad", b"\xff\xd8\xff\xe0 truncated", "JPEG")
        results = await asyncio.gather(
            backend.process(images[:2]), backend.process([bad, images[2]])
        )
        flat = [*results[0], *results[1]]
        kinds = [type(r).__name__ for r in flat]
        assert kinds == ["Processed", "Processed", "BadRequest", "Processed"]
        assert backend.batches == 1, backend.batches  # both requests' images in one batch
        for image, got in zip(images, [flat[0], flat[1], flat[3]], strict=True):
            assert isinstance(got, Processed) and got.pixels.device.type == "cuda"
            expected = cpu.process_one(image)
            assert isinstance(expected, Processed) and got.grid == expected.grid
            # Another decoder (nvJPEG) and resize: close, not equal (docs/serving.md).
            difference = (got.pixels.cpu() - expected.pixels).abs()
            largest, mean = difference.max().item(), difference.mean().item()
            assert largest < 0.7 and mean < 0.05, (image.param, largest, mean)
    finally:
        await backend.aclose()
        await cpu.aclose()


@pytest.mark.gpu
@needs_cuda
async def test_cuda_over_its_memory_budget_is_overloaded() -> None:
    from mmsched.preprocess.cuda import CudaBackend

    backend = CudaBackend(LIMITS, "cuda:0", 1, batch_ms=1, batch_images=4)
    await backend.start(None)
    try:
        [outcome] = await backend.process([jpeg(1024, 768, 23)])
        assert isinstance(outcome, Overloaded) and "preprocess_gpu_mb" in str(outcome)
        [small] = await backend.process([jpeg(64, 48, 24)])
        assert isinstance(small, Processed)
        del small
        assert backend.budget.held <= backend.budget.capacity
    finally:
        await backend.aclose()


def test_the_default_pool_leaves_the_http_processes_their_cores(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 16 cores: the server's process, 4 ranks and (with --api-servers 4) 4 HTTP processes
    # each take one; one HTTP process is the server's own.
    from mmsched import Config
    from mmsched.preprocess import stage

    monkeypatch.setattr(stage.os, "sched_getaffinity", lambda pid: set(range(16)))
    assert stage.default_workers(4) == 11
    assert stage.default_workers(4, http_processes=1) == 11
    assert stage.default_workers(4, http_processes=4) == 7
    assert stage.default_workers(40, http_processes=4) == 1
    settings = StageSettings.of(Config(tp_size=4, api_servers=4))
    assert (settings.ranks, settings.http_processes) == (4, 4)
