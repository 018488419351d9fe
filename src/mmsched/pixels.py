"""Qwen2-VL images as uint8 pixels on the wire: resized in the front end, patchified on each rank.

A Qwen2-VL image processor resizes an image (``smart_resize``: both sides a multiple of
``patch_size * merge_size``, the area within ``min_pixels`` and ``max_pixels``), rescales it
to ``[0, 1]``, normalizes it with ``image_mean`` / ``image_std``, repeats it to
``temporal_patch_size`` frames and cuts it into patches: ``pixel_values`` of shape
``(grid_t * grid_h * grid_w, C * T * P * P)``, float32. For a 1024x768 photo that is 3,996
rows of 1,176 floats, 18.8 MB, although the image it was made from, resized, is 2.35 MB of
uint8 (1036x756x3). Every byte of the float form travels to every rank.

This module splits the processor in two, where the bytes are fewest:

- the front end ([`resized_pixels`][mmsched.pixels.resized_pixels]) does only the resize,
  with the processor's own ``smart_resize`` and the resample of the processor's backend
  (Pillow's ``Image.resize``, or torchvision's ``resize`` with antialiasing, as
  ``transformers`` calls them), and hands over the uint8 ``(3, H, W)`` pixels and the grid
  ``(1, H / P, W / P)``;
- each rank ([`pixel_values`][mmsched.pixels.pixel_values]) rescales, normalizes and
  patchifies them on its own device, in the order of ``transformers``' ``patchify``, into
  the ``pixel_values`` the model expects.

What a rank needs to do that travels with the item, under the key
[`ITEM_KEY`][mmsched.pixels.ITEM_KEY], as a small dict
([`PatchSpec`][mmsched.pixels.PatchSpec]: patch, temporal patch and merge sizes, rescale
factor, mean and std): the ranks need no processor, and an item says what it holds.
[`check_item`][mmsched.pixels.check_item] is the boundary check
([`MultimodalInputs.from_dict`][mmsched.inputs.MultimodalInputs.from_dict] calls it): pixels
whose shape does not match their grid, or a spec that is not one, are that request's
[`InvalidMultimodalInput`][mmsched.errors.InvalidMultimodalInput].

The result equals the processor's own ``pixel_values`` up to float rounding (the tests
measure it against both backends: see [the server's docs](../serving.md#uint8-pixels-on-the-wire)).
The front end needs Pillow (and torchvision for that backend); the rank side needs torch
only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mmsched.errors import ConfigError, InvalidMultimodalInput

if TYPE_CHECKING:
    from PIL import Image

ITEM_KEY = "uint8_pixels"
"""The item field (model-specific data) that marks an image's feature as uint8 pixels
``(C, H, W)`` and holds its [`PatchSpec`][mmsched.pixels.PatchSpec] as a dict."""

BACKENDS = ("pil", "torchvision")
"""The processor backends whose resize the front end reproduces."""

WIRE_FORMATS = ("float32", "uint8")
"""What a server sends its ranks for each image: the processor's float32 ``pixel_values``,
or the resized uint8 pixels that each rank turns into them."""


@dataclass(frozen=True)
class ResizeSpec:
    """How the front end resizes an image: the processor's ``smart_resize`` settings.

    Attributes:
        min_pixels: least area after resizing (the processor's ``size["shortest_edge"]``).
        max_pixels: most area after resizing (``size["longest_edge"]``).
        factor: both sides become multiples of it: ``patch_size * merge_size``.
        patch_size: side of one patch, in pixels.
        resample: the PIL resampling filter, by number (``3``: bicubic).
        backend: ``pil`` (Pillow's ``Image.resize``) or ``torchvision`` (its ``resize``,
            antialiased): the processor's backend, whose resampling differs slightly.
    """

    min_pixels: int
    max_pixels: int
    factor: int
    patch_size: int
    resample: int
    backend: str

    def size(self, height: int, width: int) -> tuple[int, int]:
        """``(height, width)`` after resizing, by the processor's own ``smart_resize``.

        Raises:
            ValueError: the processor refuses the size (an aspect ratio over 200).
        """
        resized: tuple[int, int] = _smart_resize()(
            height,
            width,
            factor=self.factor,
            min_pixels=self.min_pixels,
            max_pixels=self.max_pixels,
        )
        return resized


@dataclass(frozen=True)
class PatchSpec:
    """What a rank needs to turn uint8 pixels into ``pixel_values``; travels with each item.

    Attributes:
        patch_size: side of one patch (14 for Qwen2-VL).
        temporal_patch_size: frames per patch; an image is repeated to fill them (2).
        merge_size: patches merged into one token along each side (2).
        rescale_factor: pixels are multiplied by it first (``1 / 255``).
        image_mean: per channel, subtracted after rescaling.
        image_std: per channel, divided by after that.
    """

    patch_size: int
    temporal_patch_size: int
    merge_size: int
    rescale_factor: float
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]

    def as_dict(self) -> dict[str, Any]:
        """The spec as the item's [`ITEM_KEY`][mmsched.pixels.ITEM_KEY] value (plain JSON)."""
        return {
            "patch_size": self.patch_size,
            "temporal_patch_size": self.temporal_patch_size,
            "merge_size": self.merge_size,
            "rescale_factor": self.rescale_factor,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
        }

    @classmethod
    def from_dict(cls, raw: Any, where: str = ITEM_KEY) -> PatchSpec:
        """A spec from an item's dict, checked.

        Raises:
            InvalidMultimodalInput: naming ``where`` and the field that is wrong.
        """
        if not isinstance(raw, Mapping):
            raise InvalidMultimodalInput(where, f"expected an object, got {type(raw).__name__}")
        names = ("patch_size", "temporal_patch_size", "merge_size", "rescale_factor")
        expected = {*names, "image_mean", "image_std"}
        if set(raw) != expected:
            raise InvalidMultimodalInput(
                where, f"expected the fields {', '.join(sorted(expected))}, got {sorted(raw)}"
            )
        sizes = []
        for name in names[:3]:
            value = raw[name]
            if type(value) is not int or not 1 <= value <= 4096:
                raise InvalidMultimodalInput(
                    f"{where}.{name}", f"expected an int in [1, 4096], got {value!r}"
                )
            sizes.append(value)
        rescale = _number(f"{where}.rescale_factor", raw["rescale_factor"], positive=True)
        mean = _numbers(f"{where}.image_mean", raw["image_mean"], positive=False)
        std = _numbers(f"{where}.image_std", raw["image_std"], positive=True)
        if len(mean) != len(std):
            raise InvalidMultimodalInput(
                f"{where}.image_std", f"{len(std)} values for {len(mean)} in image_mean"
            )
        return cls(sizes[0], sizes[1], sizes[2], rescale, mean, std)


def specs_of(processor: Any) -> tuple[ResizeSpec, PatchSpec]:
    """The resize (front end) and patch (rank) settings of a Qwen2-VL image processor.

    Reads its attributes as ``transformers`` (4.45 and later) names them: ``size`` with
    ``shortest_edge`` / ``longest_edge`` (or ``min_pixels`` / ``max_pixels``),
    ``patch_size``, ``temporal_patch_size``, ``merge_size``, ``resample``,
    ``rescale_factor``, ``image_mean``, ``image_std``; the backend from its ``backend``
    (transformers 5), else from its class name (``...Fast`` is torchvision's).

    Raises:
        ConfigError: a processor that does not resize, rescale and normalize RGB images as
            Qwen2-VL's does by default (only that is reproduced here), or that is not one.
    """
    try:
        for flag in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
            if getattr(processor, flag, True) is not True:
                raise ConfigError(f"uint8 pixels need an image processor with {flag}=True")
        size = processor.size
        min_pixels = _size(size, "shortest_edge", "min_pixels") or processor.min_pixels
        max_pixels = _size(size, "longest_edge", "max_pixels") or processor.max_pixels
        patch, merge = int(processor.patch_size), int(processor.merge_size)
        backend = getattr(processor, "backend", None)
        if backend not in BACKENDS:
            backend = "torchvision" if type(processor).__name__.endswith("Fast") else "pil"
        resize = ResizeSpec(
            int(min_pixels),
            int(max_pixels),
            patch * merge,
            patch,
            int(processor.resample),
            backend,
        )
        spec = PatchSpec(
            patch,
            int(processor.temporal_patch_size),
            merge,
            float(processor.rescale_factor),
            tuple(float(x) for x in processor.image_mean),
            tuple(float(x) for x in processor.image_std),
        )
    except ConfigError:
        raise
    except (AttributeError, TypeError, ValueError) as exc:
        raise ConfigError(
            f"{type(processor).__name__} is not a Qwen2-VL image processor: {exc}"
        ) from None
    PatchSpec.from_dict(spec.as_dict())  # the ranks will check it: fail here, at start, first
    return resize, spec


def _size(size: Any, *names: str) -> Any:
    """The first of ``names`` that ``size`` (a dict, or transformers 5's ``SizeDict``) sets."""
    for name in names:
        value = size.get(name) if isinstance(size, Mapping) else getattr(size, name, None)
        if value:
            return value
    return None


# ----------------------------------------------------------------------------- front end


def resized_pixels(
    image: Image.Image | torch.Tensor, resize: ResizeSpec
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """An RGB image resized as the processor resizes it, uint8, and its patch grid.

    Args:
        image: a PIL image (made RGB here, as the processor would) or a uint8 ``(3, H, W)``
            tensor on the CPU.
        resize: the processor's settings ([`specs_of`][mmsched.pixels.specs_of]).

    Returns:
        The contiguous uint8 ``(3, H', W')`` pixels and the grid ``(1, H' / P, W' / P)``.

    Raises:
        ValueError: an image that is not one of those, or whose size the processor refuses.
        ImportError: the ``torchvision`` backend without torchvision.
    """
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(
                f"expected a uint8 (3, H, W) tensor, got {image.dtype} {tuple(image.shape)}"
            )
        height, width = int(image.shape[1]), int(image.shape[2])
    else:
        if image.mode != "RGB":
            image = image.convert("RGB")
        width, height = image.size
    new_h, new_w = resize.size(height, width)
    if resize.backend == "torchvision":
        pixels = _resize_torchvision(image, new_h, new_w, resize.resample)
    else:
        pixels = _resize_pil(image, new_h, new_w, resize.resample)
    grid = (1, new_h // resize.patch_size, new_w // resize.patch_size)
    return pixels, grid


def resized_batch(
    images: Sequence[Image.Image | torch.Tensor], resize: ResizeSpec
) -> list[tuple[torch.Tensor, tuple[int, int, int]]]:
    """[`resized_pixels`][mmsched.pixels.resized_pixels] of each of ``images``, in order,
    with the tensors of one size (and device) resized together in one call under the
    torchvision backend: on a GPU a resize is a dozen small operations launched from Python,
    so a batch of photos of one camera costs what one of them does. Each result is a tensor
    of its own (not a view of the batch's), so that each is freed when its user is done.

    Raises:
        ValueError: as [`resized_pixels`][mmsched.pixels.resized_pixels].
    """
    out: list[tuple[torch.Tensor, tuple[int, int, int]] | None] = [None] * len(images)
    groups: dict[tuple[Any, ...], list[int]] = {}
    for n, image in enumerate(images):
        if (
            resize.backend == "torchvision"
            and isinstance(image, torch.Tensor)
            and image.dtype == torch.uint8
            and image.dim() == 3
            and image.shape[0] == 3
        ):
            groups.setdefault((tuple(image.shape), image.device), []).append(n)
        else:
            out[n] = resized_pixels(image, resize)
    for (shape, _), members in groups.items():
        if len(members) == 1:
            out[members[0]] = resized_pixels(images[members[0]], resize)
            continue
        new_h, new_w = resize.size(shape[1], shape[2])
        stacked = torch.stack([images[n] for n in members])  # type: ignore[misc]
        together = _resize_torchvision(stacked, new_h, new_w, resize.resample)
        grid = (1, new_h // resize.patch_size, new_w // resize.patch_size)
        for n, pixels in zip(members, together.unbind(0), strict=True):
            out[n] = (pixels.clone(), grid)
    return [o for o in out if o is not None]


def _resize_pil(
    image: Image.Image | torch.Tensor, height: int, width: int, resample: int
) -> torch.Tensor:
    from PIL import Image

    if isinstance(image, torch.Tensor):
        image = Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())
    # transformers' Pillow backend: Image.resize((w, h), resample, reducing_gap=None).
    resized = image.resize((width, height), resample=Image.Resampling(resample))
    hwc = np.asarray(resized)
    return torch.from_numpy(np.ascontiguousarray(hwc.transpose(2, 0, 1)))


def _resize_torchvision(
    image: Image.Image | torch.Tensor, height: int, width: int, resample: int
) -> torch.Tensor:
    from PIL import Image

    # Optional (the torchvision backend only), and typed by nothing mypy may find installed.
    from torchvision.transforms import (  # type: ignore[import-not-found, unused-ignore]
        InterpolationMode,
    )
    from torchvision.transforms.v2 import (  # type: ignore[import-not-found, unused-ignore]
        functional as tvF,
    )

    if not isinstance(image, torch.Tensor):
        image = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # a copy torch may write
    # The same filter by name (BICUBIC is BICUBIC in both enums), antialiased, on uint8:
    # transformers' torchvision backend resizes the uint8 tensor itself, then normalizes.
    mode = InterpolationMode[Image.Resampling(resample).name]
    resized: torch.Tensor = tvF.resize(
        image.contiguous(), [height, width], interpolation=mode, antialias=True
    )
    return resized.contiguous()


@cache
def _smart_resize() -> Any:
    """transformers' own ``smart_resize`` (its module moved between versions)."""
    try:  # transformers 5: the Pillow backend's module needs no torchvision
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
    except ImportError:  # transformers 4
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize
    return smart_resize


# ----------------------------------------------------------------------------- rank side


def pixel_values(
    pixels: torch.Tensor, spec: PatchSpec, device: torch.device | str | None = None
) -> torch.Tensor:
    """Qwen2-VL's ``pixel_values`` of one image from its uint8 pixels, on ``device``.

    Rescale, normalize, repeat to ``temporal_patch_size`` frames and patchify, in the order
    of ``transformers``' ``Qwen2VLImageProcessor.patchify``: rows are patches, merged
    ``merge_size x merge_size`` blocks one after another; a row is ``(C, T, P, P)``.
    The uint8 pixels move to ``device`` first (a quarter of the bytes of float32).

    Args:
        pixels: uint8 ``(C, H, W)``, ``H`` and ``W`` multiples of ``patch_size *
            merge_size``.
        spec: the item's [`PatchSpec`][mmsched.pixels.PatchSpec].
        device: where to compute (default: where ``pixels`` are).

    Returns:
        float32 ``(H / P * W / P, C * T * P * P)``.

    Raises:
        InvalidMultimodalInput: pixels whose dtype or shape the spec does not admit.
    """
    check_pixels("feature", pixels, spec)
    if device is not None:
        pixels = pixels.to(device, non_blocking=True)
    channels, height, width = (int(n) for n in pixels.shape)
    p, m, t = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    mean, std = _per_channel(spec, pixels.device)
    # As the processors compute it: rescale, then (x - mean) / std, in float32.
    image = (pixels.to(torch.float32) * spec.rescale_factor - mean) / std
    grid_h, grid_w = height // p, width // p
    patches = image.reshape(channels, grid_h // m, m, p, grid_w // m, m, p)
    # (grid_h/m, grid_w/m, m, m, C, P, P): transformers' permute (0, 2, 5, 3, 6, 1, 4, 7)
    # without its batch dimension.
    patches = patches.permute(1, 4, 2, 5, 0, 3, 6)
    frames = patches.unsqueeze(5).expand(-1, -1, -1, -1, -1, t, -1, -1)
    return frames.reshape(grid_h * grid_w, channels * t * p * p)


def item_pixel_values(
    feature: torch.Tensor, model_specific_data: Mapping[str, Any], device: torch.device
) -> torch.Tensor:
    """An image item's ``pixel_values`` on ``device``: made from its uint8 pixels where the
    item carries [`ITEM_KEY`][mmsched.pixels.ITEM_KEY], else its feature as float32.

    Raises:
        InvalidMultimodalInput: a spec or pixels that are not valid.
    """
    raw = model_specific_data.get(ITEM_KEY)
    if raw is None:
        return feature.to(device, torch.float32)
    return pixel_values(feature, PatchSpec.from_dict(raw), device)


@cache
def _per_channel_cpu(values: tuple[float, ...]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).reshape(-1, 1, 1)


def _per_channel(spec: PatchSpec, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = _per_channel_cpu(spec.image_mean), _per_channel_cpu(spec.image_std)
    return mean.to(device), std.to(device)


# ----------------------------------------------------------------------------- boundary


def check_pixels(where: str, pixels: torch.Tensor, spec: PatchSpec) -> None:
    """Pixels a spec can patchify: uint8 ``(C, H, W)``, ``C`` the spec's channels, ``H``
    and ``W`` positive multiples of ``patch_size * merge_size``.

    Raises:
        InvalidMultimodalInput: naming ``where``.
    """
    unit = spec.patch_size * spec.merge_size
    channels = len(spec.image_mean)
    if pixels.dtype != torch.uint8 or pixels.dim() != 3 or pixels.shape[0] != channels:
        raise InvalidMultimodalInput(
            where,
            f"uint8 pixels must be a uint8 ({channels}, H, W) tensor, got {pixels.dtype} "
            f"{tuple(pixels.shape)}",
        )
    height, width = int(pixels.shape[1]), int(pixels.shape[2])
    if height % unit or width % unit or not height or not width:
        raise InvalidMultimodalInput(
            where, f"{height}x{width} pixels: both sides must be multiples of {unit}"
        )


def check_item(where: str, feature: torch.Tensor, grid: Any, raw_spec: Any) -> PatchSpec:
    """An image item whose feature is uint8 pixels: its spec, pixels and grid agree.

    ``grid`` is the item's ``image_grid_thw`` (an ``(n, 3)`` integer tensor, already
    checked as such), or ``None`` where the item has none.

    Raises:
        InvalidMultimodalInput: naming the field at fault under ``where``.
    """
    spec = PatchSpec.from_dict(raw_spec, f"{where}.{ITEM_KEY}")
    check_pixels(f"{where}.feature", feature, spec)
    if not isinstance(grid, torch.Tensor):
        raise InvalidMultimodalInput(f"{where}.image_grid_thw", "missing: uint8 pixels need it")
    rows = grid.tolist()
    expected = [1, feature.shape[1] // spec.patch_size, feature.shape[2] // spec.patch_size]
    if rows != [expected]:
        raise InvalidMultimodalInput(
            f"{where}.image_grid_thw",
            f"{rows} does not match {tuple(feature.shape)} pixels: expected [{expected}]",
        )
    return spec


def _number(where: str, value: Any, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidMultimodalInput(where, f"expected a finite number, got {value!r}")
    if positive and value <= 0:
        raise InvalidMultimodalInput(where, f"must be positive, got {value!r}")
    return float(value)


def _numbers(where: str, values: Any, *, positive: bool) -> tuple[float, ...]:
    if not isinstance(values, list | tuple) or not 1 <= len(values) <= 16:
        raise InvalidMultimodalInput(where, "expected a list of 1 to 16 numbers (one a channel)")
    return tuple(_number(f"{where}[{i}]", v, positive=positive) for i, v in enumerate(values))
