"""What a preprocessing backend is: encoded images in, each one's features or its error out.

A backend takes a batch of [`EncodedImage`][mmsched.serve.media.EncodedImage]s (the images
of one request, or of several, as the stage groups them) and returns, per image and in
order, a [`Processed`][mmsched.preprocess.backend.Processed] or the error that image alone
met: [`BadRequest`][mmsched.serve.media.BadRequest] (undecodable, refused by the processor:
HTTP 400), [`Overloaded`][mmsched.errors.Overloaded] (a budget: 503) or
[`PreprocessWorkerLost`][mmsched.errors.PreprocessWorkerLost] (503). One image's error never
fails another's.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mmsched.errors import MmschedError
from mmsched.serve.media import EncodedImage


@dataclass(frozen=True)
class Processed:
    """One image's ``pixel_values`` and ``(t, h, w)`` patch grid.

    ``owned``: the tensor is in memory of its own (not a view of the payload store's arena,
    nor counted in a GPU budget), so a cache may keep it as it is.
    """

    pixels: torch.Tensor
    grid: tuple[int, int, int]
    owned: bool = True


Outcome = Processed | MmschedError


class Backend(ABC):
    """Decodes and processes images; one of ``cpu``, ``threads``, ``cuda``."""

    name: str
    identity: bytes
    """What makes its output what it is (``processor_identity``): part of every key."""
    wants_headers: bool = False
    """Whether it reads each image's header before decoding (to budget for it): then the
    process that reads the bytes reads the header too ([`EncodedImage.header`][
    mmsched.serve.media.EncodedImage]), off this one's event loop."""

    @property
    @abstractmethod
    def processor(self) -> Any:
        """The image processor object (its options: ``patch_size``, ``merge_size``...)."""

    async def start(self, pipeline: Any | None) -> None:  # noqa: B027 (optional hook)
        """Start what runs the work; ``pipeline`` (when given) is the one the features go to
        (its payload store may lend room to worker processes)."""

    @abstractmethod
    async def process(self, images: Sequence[EncodedImage]) -> list[Outcome]:
        """Each image's features, or its own error, in order."""

    async def aclose(self) -> None:  # noqa: B027 (optional hook)
        """Stop what runs the work; nothing it started outlives this."""
