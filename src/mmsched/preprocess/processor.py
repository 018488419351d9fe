"""Qwen2-VL's image processor, built from its defaults, with the backend asked for, and one
image run through it.

``transformers`` ships the processor in two implementations: the torchvision backend
(``Qwen2VLImageProcessor`` in transformers 5, ``Qwen2VLImageProcessorFast`` in 4), which runs
on torch tensors, on a CPU or a GPU, and the Pillow/numpy backend
(``Qwen2VLImageProcessorPil`` in 5, ``Qwen2VLImageProcessor`` in 4). Both resize with bicubic
interpolation and normalise with CLIP's mean and deviation, but their resizing kernels differ,
so their outputs are close, not equal ([The server](../serving.md#preprocessing) gives the
measured difference).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from mmsched.pixels import resized_batch, specs_of
from mmsched.serve.media import BadRequest

log = logging.getLogger(__name__)

TORCHVISION = "torchvision"
PIL = "pil"


def torchvision_available() -> bool:
    """Whether torchvision imports here (and with it the processor's torchvision backend)."""
    try:
        import torchvision
        import torchvision.transforms.v2.functional  # noqa: F401
    except Exception:  # absent, or a build that does not match torch: either way, not here
        return False
    return True


def build_processor(backend: str) -> Any:
    """Qwen2-VL's image processor from its defaults (no download), of ``backend``
    (``torchvision`` or ``pil``).

    Raises:
        ImportError: ``torchvision`` asked for where it does not import.
    """
    import transformers

    if backend == TORCHVISION:
        if not torchvision_available():
            raise ImportError("the processor's torchvision backend needs torchvision")
        if not hasattr(transformers, "Qwen2VLImageProcessorPil"):  # transformers 4
            return getattr(transformers, "Qwen2VLImageProcessorFast")()  # noqa: B009 (5 lacks it)
        processor = transformers.Qwen2VLImageProcessor()  # 5: the torchvision backend
        if getattr(processor, "backend", TORCHVISION) != TORCHVISION:
            raise ImportError("transformers offers no torchvision backend of this processor")
        return processor
    # transformers 5 names the Pillow backend's class apart; in 4 the default class is it.
    pil_class = getattr(transformers, "Qwen2VLImageProcessorPil", None)
    return (pil_class or transformers.Qwen2VLImageProcessor)()


def run_processor(
    processor: Any,
    param: str,
    images: list[Any],
    device: torch.device | None = None,
    wire: str = "float32",
) -> list[tuple[torch.Tensor, tuple[int, int, int]]]:
    """``images`` (PIL images, or ``(3, H, W)`` uint8 tensors for the torchvision backend)
    through ``processor``: each one's ``pixel_values`` (float32, one row per patch) and its
    ``(t, h, w)`` patch grid, in order. Under ``wire="uint8"`` only the processor's resize
    runs: each one's resized uint8 ``(3, H, W)`` pixels ([`mmsched.pixels`][]), which every
    rank normalizes and patchifies; tensors of one size are resized together
    ([`resized_batch`][mmsched.pixels.resized_batch]).

    Raises:
        BadRequest: naming ``param``: the processor refused one of them (an aspect ratio
            over 200, say).
        torch.cuda.OutOfMemoryError: the GPU had no room for them: not the images' fault,
            and the caller's to answer (they may fit one at a time).
    """
    if wire == "uint8":
        resize, _ = specs_of(processor)
        try:
            return resized_batch(images, resize)
        except ValueError as exc:  # a size the processor refuses (an extreme aspect ratio)
            raise BadRequest(param, f"the image processor refused it: {exc}") from None
    torch_backend = getattr(processor, "backend", None) == TORCHVISION or device is not None
    kwargs: dict[str, Any] = {"return_tensors": "pt" if torch_backend else "np"}
    if device is not None:
        kwargs["device"] = device
    try:
        out = processor(images=images, **kwargs)
        thw = out["image_grid_thw"]
        grid_rows = (
            thw.tolist()
            if isinstance(thw, torch.Tensor)
            else np.asarray(thw).reshape(-1, 3).tolist()
        )
        grids = [(int(t), int(h), int(w)) for t, h, w in grid_rows]
        pixels = out["pixel_values"]
        if not isinstance(pixels, torch.Tensor):
            pixels = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))
        elif pixels.dtype != torch.float32:
            pixels = pixels.float()
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as exc:  # an image the processor refuses (an extreme aspect ratio)
        raise BadRequest(param, f"the image processor refused it: {exc}") from None
    rows = [t * h * w for t, h, w in grids]
    parts = torch.split(pixels, rows) if len(rows) > 1 else (pixels,)
    return list(zip(parts, grids, strict=True))
