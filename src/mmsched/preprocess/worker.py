"""A preprocessing worker process: decodes images and runs the processor, one at a time, on
one thread, and writes each output straight into the pipeline's payload store.

The parent ([`mmsched.preprocess.pool`][]) sends ``(job, param, bytes, format)`` on the
worker's pipe; the worker answers with one of:

- ``("lent", job, handle, grid)``: the features are in the payload store's arena, written
  there by this process through the arena's lending protocol
  ([`mmsched.stores.lending`][]); only the small handle crosses back, and the parent claims
  it ([`Pipeline.claim_tensor`][mmsched.pipeline.Pipeline.claim_tensor]);
- ``("bytes", job, shape, dtype, grid)`` followed by the tensor's bytes (``float32``, or
  ``uint8`` under ``wire_pixels = "uint8"``) on the same pipe, where the
  store lends no memory (the ``inline`` store): one copy through the kernel's pipe buffer
  into a tensor of the parent's;
- ``("bad", job, problem)``: the image cannot be used (HTTP 400);
- ``("full", job, message)``: the arena had no room in time (HTTP 503);
- ``("error", job, message)``: anything else that went wrong with this image.

Torch runs on one thread here (``torch.set_num_threads(1)``): the pool's parallelism is its
processes, and a worker that spread one image over every core would contend with the others.
The worker exits when the parent closes its end of the pipe (the parent exited or died) or
sends ``None``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker is started with (picklable)."""

    backend: str  # the processor's: torchvision or pil
    max_bytes: int
    max_pixels: int
    access: Any | None  # the arena's ArenaAccess, or None: features come back on the pipe
    wire_pixels: str = "float32"  # uint8: only the processor's resize (mmsched.pixels)


def main(conn: Connection, spec: WorkerSpec) -> None:
    """The worker's loop (the target of its process)."""
    import torch

    torch.set_num_threads(1)
    from mmsched.errors import ArenaFull, MmschedError
    from mmsched.preprocess.processor import build_processor, run_processor
    from mmsched.serve.media import BadRequest, EncodedImage, MediaLimits, decode_image

    processor = build_processor(spec.backend)
    limits = MediaLimits(spec.max_bytes, spec.max_pixels)
    # One image through it before the worker says it is ready: the processor's first call
    # loads what it imports lazily (a second or more), which no request should wait for.
    from PIL import Image

    run_processor(processor, "warm-up", [Image.new("RGB", (56, 56))])
    arena = spec.access.connect() if spec.access is not None else None
    try:
        conn.send(("ready", os.getpid()))
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                return  # the parent is gone
            if message is None:
                return
            job, param, data, media_format = message
            try:
                image = decode_image(EncodedImage(param, data, media_format), limits)
                [(pixels, grid)] = run_processor(
                    processor, param, [image], wire=spec.wire_pixels
                )
                pixels = pixels.contiguous()
                if arena is None:
                    dtype = str(pixels.dtype).removeprefix("torch.")
                    conn.send(("bytes", job, tuple(pixels.shape), dtype, grid))
                    # Flat: send_bytes measures a buffer of one-byte items by its first dimension.
                    conn.send_bytes(pixels.numpy().reshape(-1).data)
                    continue
                room, lent = arena.allocate(tuple(pixels.shape), pixels.dtype)
                room.copy_(pixels)
                conn.send(("lent", job, lent, grid))
            except BadRequest as exc:
                conn.send(("bad", job, exc.problem))
            except ArenaFull as exc:
                conn.send(("full", job, str(exc)))
            except (MmschedError, Exception) as exc:
                conn.send(("error", job, f"{type(exc).__name__}: {exc}"))
    except OSError:
        return  # the parent closed the pipe while this worker answered: it is gone
    finally:
        if arena is not None:
            arena.close()
