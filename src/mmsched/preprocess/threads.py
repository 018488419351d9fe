"""The ``threads`` backend: Pillow decoding and the Pillow backend of the processor, on a pool
of threads of the server's own process.

What ``mmsched serve`` did before there were backends, and the fallback where torchvision is
absent. Pillow and numpy release the GIL for much of the work, but not all of it: it stops
scaling at a few cores (near 50 images/s on 16 cores for a 1024x768 JPEG).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from mmsched.errors import MmschedError
from mmsched.preprocess.backend import Backend, Outcome, Processed
from mmsched.preprocess.keys import processor_identity
from mmsched.preprocess.processor import PIL, build_processor, run_processor
from mmsched.serve.media import EncodedImage, MediaLimits, decode_image


class ThreadBackend(Backend):
    """Images decoded and processed on ``workers`` threads (default: one per core)."""

    name = "threads"

    def __init__(
        self, limits: MediaLimits, workers: int | None = None, wire_pixels: str = "float32"
    ) -> None:
        self.limits = limits
        self.wire_pixels = wire_pixels
        self._processor = build_processor(PIL)
        self.identity = processor_identity(PIL, self._processor, {"wire_pixels": wire_pixels})
        self._pool = ThreadPoolExecutor(
            workers or os.cpu_count() or 1, thread_name_prefix="mmsched-image"
        )

    @property
    def processor(self) -> Any:
        return self._processor

    def process_one(self, image: EncodedImage) -> Outcome:
        """One image, on the calling thread."""
        try:
            decoded = decode_image(image, self.limits)
            [(pixels, grid)] = run_processor(
                self._processor, image.param, [decoded], wire=self.wire_pixels
            )
        except MmschedError as exc:
            return exc
        return Processed(pixels, grid, owned=True)

    def process_blocking(self, images: Sequence[EncodedImage]) -> list[Outcome]:
        """Every image, side by side on the pool, waited for on the calling thread."""
        return list(self._pool.map(self.process_one, images))

    async def process(self, images: Sequence[EncodedImage]) -> list[Outcome]:
        loop = asyncio.get_running_loop()
        futures = [loop.run_in_executor(self._pool, self.process_one, image) for image in images]
        return list(await asyncio.gather(*futures))

    async def aclose(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
