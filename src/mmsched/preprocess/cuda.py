"""The ``cuda`` backend: images decoded on a GPU and processed there, in micro-batches.

Requests arrive one by one; the GPU works best on many images at once. Images are gathered
for at most ``preprocess_batch_ms`` (or until ``preprocess_batch_images`` have come), then
one thread runs the batch: JPEGs are decoded on the GPU together (``torchvision.io.decode_jpeg``
with ``device``; nvJPEG), PNGs (and JPEGs whose EXIF orientation must be applied) are decoded
on the CPU by Pillow and moved, and the torchvision backend of the processor runs on the GPU
over the whole batch. The features stay on the GPU: under the ``cuda-ipc`` payload store they
reach the ranks device to device, and with the content key as their hash nothing copies them
to the host to hash them.

GPU memory is bounded: each image reserves, before any work, what it will take
([`GpuFootprint`][mmsched.preprocess.cuda.GpuFootprint], from its header's size) against
``preprocess_gpu_mb``: a work share (its decoded pixels and the processor's intermediates),
given back when its batch is done, and a held share (what the stage hands over), given back
when that tensor is freed (after the request's pipeline has copied it). The held share is
what the wire format makes: under ``wire_pixels="float32"`` the processor's ``pixel_values``
(18.8 MB for a 1024x768 photo), under ``"uint8"`` the resized pixels, an eighth of that
(2.35 MB). An image that does not fit is refused with
[`Overloaded`][mmsched.errors.Overloaded] (HTTP 503) rather than queued.

One bad image never fails a batch: a batch decode or processor run that raises (the GPU out
of memory for the batch at once included) is retried image by image, and only the images
that fail alone get their error (HTTP 400; 503 for one the GPU has no memory for).

Sharing the GPU with the ranks (the default device is rank 0's, ``cuda:0``): this process
then holds a CUDA context (a few hundred MB) plus up to ``preprocess_gpu_mb`` on that GPU,
and its kernels take time slices from the model's. Give the stage its own GPU where there is
one, or size ``preprocess_gpu_mb`` into the model's memory plan.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

import mmsched.frames  # noqa: F401  (its filter of torch's read-only buffer warning)
from mmsched.errors import ConfigError, MmschedError, Overloaded
from mmsched.pixels import WIRE_FORMATS, specs_of
from mmsched.preprocess.backend import Backend, Outcome, Processed
from mmsched.preprocess.keys import processor_identity
from mmsched.preprocess.processor import TORCHVISION, build_processor, run_processor
from mmsched.serve.media import (
    BadRequest,
    EncodedImage,
    MediaLimits,
    decode_image,
    read_header,
)

log = logging.getLogger(__name__)


class GpuBudget:
    """Bytes of GPU memory the stage may hold at once (thread-safe)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.held = 0
        self.refused = 0
        self._lock = threading.Lock()

    def reserve(self, nbytes: int) -> bool:
        with self._lock:
            if self.held + nbytes > self.capacity:
                self.refused += 1
                return False
            self.held += nbytes
            return True

    def release(self, nbytes: int) -> None:
        with self._lock:
            self.held = max(0, self.held - nbytes)


@dataclass(frozen=True)
class Reservation:
    """One image's share of the GPU budget, in bytes.

    Attributes:
        work: held while its batch runs: the decoded pixels and the processor's intermediates.
        held: what the stage hands over, held until that tensor is freed.
    """

    work: int
    held: int

    @property
    def total(self) -> int:
        return self.work + self.held


class GpuFootprint:
    """What an image of a given size takes on the GPU, by the processor's resize rule and the
    wire format, without decoding it.

    Args:
        processor: a Qwen2-VL image processor ([`specs_of`][mmsched.pixels.specs_of] reads it).
        wire_pixels: ``float32`` or ``uint8`` (the config's ``wire_pixels``).

    Raises:
        ConfigError: an unknown wire format, or a processor that is not Qwen2-VL's.
    """

    def __init__(self, processor: Any, wire_pixels: str) -> None:
        if wire_pixels not in WIRE_FORMATS:
            raise ConfigError(
                f"wire_pixels must be one of {', '.join(WIRE_FORMATS)}, got {wire_pixels!r}"
            )
        self.wire_pixels = wire_pixels
        self._resize, patch = specs_of(processor)
        self._frames = patch.temporal_patch_size

    def of(self, width: int, height: int) -> Reservation:
        """The reservation of a ``width x height`` image.

        Raises:
            ValueError: the processor refuses the size (an aspect ratio over 200).
        """
        new_h, new_w = self._resize.size(height, width)
        decoded = 3 * width * height  # uint8 (3, H, W), as nvJPEG or Pillow gives it
        resized = 3 * new_h * new_w
        if self.wire_pixels == "uint8":
            # Only the resize runs, but images of one size are resized together
            # (pixels.resized_batch stacks them): each holds, besides its decoded image, its
            # copy in the stack and, as torchvision resizes uint8 bicubically in float32 on a
            # GPU, a float copy of that and a float output, rounded into the uint8 pixels
            # that are kept. An image resized alone is not stacked: reserved for all the same,
            # as which company it will have is not known when it is admitted.
            return Reservation(2 * decoded + 4 * (decoded + resized), resized)
        # The processor's pixel_values: every resized pixel repeated to the temporal patch's
        # frames, float32; its intermediates are counted as that much again.
        features = 4 * self._frames * resized
        return Reservation(decoded + features, features)


@dataclass
class _Item:
    image: EncodedImage
    size: tuple[int, int]  # width, height
    orientation: int
    reserved: Reservation
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Outcome] = field(repr=False)
    admitted: float = field(default_factory=time.monotonic)


def _out_of_memory(param: str) -> Overloaded:
    """The error of an image the GPU had no memory for, even alone (HTTP 503, as a full
    budget is: the memory is not the image's fault, and may be there on a retry)."""
    return Overloaded(
        f"{param}: the GPU ran out of memory preprocessing it (the GPU is shared, or "
        "preprocess_gpu_mb is more than it has free)"
    )


def _host_bytes(data: bytes | memoryview) -> torch.Tensor:
    """``data`` as a uint8 tensor on the host, without a copy: nvJPEG only reads it (on its
    way to the GPU). Read-only ``bytes`` are fine for that: ``mmsched.frames`` silences
    torch's warning that its tensor could write them, once for the process.

    ``torch.frombuffer`` alone, not a view of it: each torch call from Python lets the GIL
    go and takes it back, and in a server the batch thread waits for it each time behind
    the event loop. One call less per image cut a batch of 32's decode from 48 to 34 ms at
    p50 in a server at 600 requests/s (docs/results/serve_h200_gil.txt); the rest of the
    batch's calls wait all the same."""
    if not memoryview(data).nbytes:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(data, dtype=torch.uint8)


class CudaBackend(Backend):
    """Decode and process on ``device``, micro-batched (module docstring)."""

    name = "cuda"
    wants_headers = True

    def __init__(
        self,
        limits: MediaLimits,
        device: str,
        budget_mb: int,
        batch_ms: float,
        batch_images: int,
        wire_pixels: str = "float32",
    ) -> None:
        self.limits = limits
        self.wire_pixels = wire_pixels
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ConfigError(f"the cuda preprocessing backend needs a CUDA device, not {device!r}")
        if not torch.cuda.is_available():
            raise ConfigError("the cuda preprocessing backend needs CUDA, and torch sees no GPU")
        try:
            self._processor = build_processor(TORCHVISION)
            from torchvision.io import ImageReadMode, decode_jpeg
        except ImportError as exc:
            raise ConfigError(f"the cuda preprocessing backend needs torchvision: {exc}") from exc
        self._decode_jpeg, self._rgb = decode_jpeg, ImageReadMode.RGB
        self.identity = processor_identity(
            "cuda",
            self._processor,
            {"decoder": "nvjpeg", "torch": torch.__version__, "wire_pixels": wire_pixels},
        )
        self.footprint = GpuFootprint(self._processor, wire_pixels)
        self.budget = GpuBudget(budget_mb << 20)
        self.batch_s = batch_ms / 1e3
        self.batch_images = batch_images
        self.batches = 0  # batches run
        self.batched_images = 0
        self._queue: list[_Item] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._runner = ThreadPoolExecutor(1, thread_name_prefix="mmsched-preprocess-gpu")

    @property
    def processor(self) -> Any:
        return self._processor

    async def start(self, pipeline: Any | None) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._batcher(), name="mmsched-preprocess-batcher")
        # The CUDA context and the kernels' first run, before the first request pays for it.
        await asyncio.get_running_loop().run_in_executor(self._runner, self._warm)
        log.info(
            "preprocessing on %s: batches of up to %d images or %.1f ms, %d MB budget",
            self.device,
            self.batch_images,
            self.batch_s * 1e3,
            self.budget.capacity >> 20,
        )

    def _warm(self) -> None:
        blank = torch.zeros((3, 56, 56), dtype=torch.uint8, device=self.device)
        run_processor(self._processor, "warm-up", [blank], self.device)
        torch.cuda.synchronize(self.device)

    async def process(self, images: Sequence[EncodedImage]) -> list[Outcome]:
        if self._task is None or self._wake is None:
            raise MmschedError("the cuda preprocessing backend is not started")
        loop = asyncio.get_running_loop()
        outcomes: list[Outcome | None] = [None] * len(images)
        waiting: list[tuple[int, asyncio.Future[Outcome]]] = []
        for n, image in enumerate(images):
            try:
                item = self._admit(image, loop)
            except MmschedError as exc:
                outcomes[n] = exc
                continue
            self._queue.append(item)
            waiting.append((n, item.future))
        self._wake.set()
        for n, future in waiting:
            outcomes[n] = await future
        return [o for o in outcomes if o is not None]

    def _admit(self, image: EncodedImage, loop: asyncio.AbstractEventLoop) -> _Item:
        """The image's header read (its size checked) and its GPU memory reserved.

        Raises:
            BadRequest: not an image of its format, too many pixels, or a size the
                processor refuses.
            Overloaded: its memory does not fit in the budget now.
        """
        # Read where the bytes arrived (an HTTP process, a worker thread) when it could be:
        # a header parse is a tenth of a millisecond of this loop's time per image.
        header = read_header(image, self.limits)
        width, height, orientation = header.width, header.height, header.orientation
        try:
            reserved = self.footprint.of(width, height)
        except ValueError as exc:  # the processor would refuse it: no room taken for it
            raise BadRequest(image.param, f"the image processor refused it: {exc}") from None
        if not self.budget.reserve(reserved.total):
            raise Overloaded(
                f"{image.param}: the GPU preprocessing budget (preprocess_gpu_mb="
                f"{self.budget.capacity >> 20}) is full: {self.budget.held >> 20} MB held"
            )
        return _Item(image, (width, height), orientation, reserved, loop, loop.create_future())

    async def _batcher(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._queue:
                continue
            # A bounded window: the first image waits at most batch_s for company.
            deadline = time.monotonic() + self.batch_s
            while len(self._queue) < self.batch_images and time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), deadline - time.monotonic())
                self._wake.clear()
            batch, self._queue = self._queue[: self.batch_images], self._queue[self.batch_images :]
            if self._queue:
                self._wake.set()
            try:
                outcomes = await loop.run_in_executor(self._runner, self._run_batch, batch)
            except Exception as exc:  # a bug of ours: this batch's error, not the server's end
                log.exception("a preprocessing batch failed")
                outcomes = [MmschedError(f"preprocessing failed: {exc}")] * len(batch)
            for item, outcome in zip(batch, outcomes, strict=True):
                if not item.future.done():
                    item.future.set_result(outcome)

    def _run_batch(self, batch: list[_Item]) -> list[Outcome]:
        started, cpu_started = time.monotonic(), time.thread_time()
        self.batches += 1
        self.batched_images += len(batch)
        try:
            decoded = self._decode(batch)
            decoded_at, cpu_decoded = time.monotonic(), time.thread_time()
            outcomes = self._process(batch, decoded)
            processed_at, cpu_processed = time.monotonic(), time.thread_time()
            torch.cuda.synchronize(self.device)  # the features are ready when handed over
            synced_at = time.monotonic()
        except BaseException:
            # The batch fails whole (the batcher answers each image with the error): nothing
            # of it is handed over, so what each image held goes back too, or every such
            # batch would shrink the budget for good.
            for item in batch:
                self.budget.release(item.reserved.total)
            raise
        for item in batch:  # the decoded pixels and the intermediates are gone
            self.budget.release(item.reserved.work)
        for item, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, Processed):
                weakref.finalize(outcome.pixels, self.budget.release, item.reserved.held)
            else:
                self.budget.release(item.reserved.held)
        # Where a server's preprocessing time goes, when asked (the mmsched.preprocess.cuda
        # logger at DEBUG): how long the batch's first image waited, and how long it ran, in
        # the decode call, the processor's calls and the wait for the GPU to finish them
        # (the calls return once the GPU has their work queued, or sooner where it is busy),
        # and the CPU time this thread spent in the first two: a call that took far longer
        # than its CPU time waited (for the GIL, a lock or the GPU), one that did not ran.
        if log.isEnabledFor(logging.DEBUG):
            done = time.monotonic()
            log.debug(
                "a batch of %d images: the first admitted %.1f ms before it started; "
                "it ran %.1f ms (decode %.1f, process %.1f, GPU wait %.1f; on the CPU: "
                "decode %.1f, process %.1f)",
                len(batch),
                (started - min(item.admitted for item in batch)) * 1e3,
                (done - started) * 1e3,
                (decoded_at - started) * 1e3,
                (processed_at - decoded_at) * 1e3,
                (synced_at - processed_at) * 1e3,
                (cpu_decoded - cpu_started) * 1e3,
                (cpu_processed - cpu_decoded) * 1e3,
            )
        return outcomes

    def _decode(self, batch: list[_Item]) -> list[torch.Tensor | MmschedError]:
        """Each image as a ``(3, H, W)`` uint8 tensor on the GPU, or its error."""
        out: list[torch.Tensor | MmschedError | None] = [None] * len(batch)
        on_gpu = [
            n for n, it in enumerate(batch) if it.image.format == "JPEG" and it.orientation == 1
        ]
        if on_gpu:
            data = [_host_bytes(batch[n].image.data) for n in on_gpu]
            try:
                tensors = self._decode_jpeg(data, mode=self._rgb, device=self.device)
                for n, tensor in zip(on_gpu, tensors, strict=True):
                    out[n] = tensor
            except Exception:  # one bad file fails nvJPEG's batch: each on its own below
                pass
        for n, item in enumerate(batch):
            if out[n] is not None:
                continue
            out[n] = self._decode_one(item)
        return [o for o in out if o is not None]

    def _decode_one(self, item: _Item) -> torch.Tensor | MmschedError:
        if item.image.format == "JPEG" and item.orientation == 1:
            data = _host_bytes(item.image.data)
            with contextlib.suppress(Exception):  # nvJPEG refuses some (CMYK): Pillow below
                decoded: torch.Tensor = self._decode_jpeg(data, mode=self._rgb, device=self.device)
                return decoded
        try:
            image = decode_image(item.image, self.limits)
        except MmschedError as exc:
            return exc
        array = np.array(image)  # (H, W, 3) uint8, upright and RGB (media.to_rgb); writable
        tensor = torch.from_numpy(array).permute(2, 0, 1).contiguous()
        try:
            return tensor.pin_memory().to(self.device, non_blocking=True)
        except torch.cuda.OutOfMemoryError:
            return _out_of_memory(item.image.param)

    def _process(
        self, batch: list[_Item], decoded: list[torch.Tensor | MmschedError]
    ) -> list[Outcome]:
        outcomes: list[Outcome | None] = [
            d if isinstance(d, MmschedError) else None for d in decoded
        ]
        good = [n for n, d in enumerate(decoded) if isinstance(d, torch.Tensor)]
        tensors = [d for d in decoded if isinstance(d, torch.Tensor)]
        if not good:
            return [o for o in outcomes if o is not None]
        results: list[tuple[torch.Tensor, tuple[int, int, int]]] | None = None
        out_of_memory = False
        try:
            results = run_processor(
                self._processor, "images", tensors, self.device, self.wire_pixels
            )
        except MmschedError:  # one refused image fails the batch's call: each alone
            pass
        except torch.cuda.OutOfMemoryError:  # the batch did not fit at once: each alone
            out_of_memory = True
        if results is not None:
            for n, (pixels, grid) in zip(good, results, strict=True):
                outcomes[n] = Processed(pixels, grid, owned=False)
            return [o for o in outcomes if o is not None]
        if out_of_memory:
            # Here, not in the handler, whose traceback kept the failed call's tensors: what
            # the allocator caches goes back to the GPU, whose other users (the ranks) may
            # be what left too little.
            torch.cuda.empty_cache()
        for n, tensor in zip(good, tensors, strict=True):
            outcomes[n] = self._process_one(batch[n].image.param, tensor)
        return [o for o in outcomes if o is not None]

    def _process_one(self, param: str, tensor: torch.Tensor) -> Outcome:
        """One image through the processor alone: its features, or its error."""
        try:
            [(pixels, grid)] = run_processor(
                self._processor, param, [tensor], self.device, self.wire_pixels
            )
        except MmschedError as exc:
            return exc
        except torch.cuda.OutOfMemoryError:
            return _out_of_memory(param)
        return Processed(pixels, grid, owned=False)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for item in self._queue:
            if not item.future.done():
                item.future.set_result(MmschedError("the preprocessing stage closed"))
            self.budget.release(item.reserved.total)
        self._queue.clear()
        self._runner.shutdown(wait=True)
