"""Synthetic processor outputs shaped like a real model's, for benchmarks and tests.

No model weights or data sets are needed: tensors are random, shapes and side data follow a
Qwen2-VL-style processor (14x14 patches, 3 channels x 2 frames x 14 x 14 = 1176 values per
patch row, 2x2 patch merge per token) and a Whisper-style audio front end (128 mel bins).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mmsched.stores.copying import shared_copier

PATCH_DIM = 1176  # 3 channels * temporal patch 2 * 14 * 14, Qwen2-VL's pixel_values width
MERGE = 4  # 2x2 patches merge into one token
IMAGE_TOKEN_ID = 151655
VIDEO_TOKEN_ID = 151656
AUDIO_TOKEN_ID = 151646


@dataclass
class Sample:
    """One request's input ids and the processor output for it."""

    input_ids: list[int]
    mm_inputs: dict[str, Any]

    @property
    def nbytes(self) -> int:
        return sum(
            i["feature"].numel() * i["feature"].element_size() for i in self.mm_inputs["mm_items"]
        )


def _ids_around(
    n_media_tokens: int, token_id: int, prompt: int = 16
) -> tuple[list[int], tuple[int, int]]:
    ids = list(range(1, prompt + 1)) + [token_id] * n_media_tokens + list(range(prompt))
    return ids, (prompt, prompt + n_media_tokens - 1)


def image_sample(
    grid_h: int, grid_w: int, *, seed: int = 0, dtype: torch.dtype = torch.float32
) -> Sample:
    """One image of ``grid_h x grid_w`` patches (a 1120x700 image is 50 x 80)."""
    rows = grid_h * grid_w
    gen = torch.Generator().manual_seed(seed)
    feature = torch.randn(rows, PATCH_DIM, generator=gen).to(dtype)
    ids, span = _ids_around(rows // MERGE, IMAGE_TOKEN_ID)
    item = {
        "modality": "image",
        "feature": feature,
        "offsets": [span],
        "image_grid_thw": torch.tensor([[1, grid_h, grid_w]]),
    }
    return Sample(ids, {"mm_items": [item], "im_token_id": IMAGE_TOKEN_ID})


def qwen2vl_image(width: int = 1120, height: int = 700, *, seed: int = 0) -> Sample:
    """What a Qwen2-VL processor emits for one ``width x height`` image: (4000, 1176) f32."""
    return image_sample(height // 14, width // 14, seed=seed)


def image_of_size(size_mb: float, *, seed: int = 0) -> Sample:
    """One float32 image whose pixel_values take about ``size_mb`` megabytes (10**6 bytes)."""
    rows = max(4, round(size_mb * 1e6 / (PATCH_DIM * 4)))
    rows -= rows % 4  # an even grid on both axes, as the 2x2 merge needs
    return image_sample(2, rows // 2, seed=seed)


def video_sample(frames: int = 20, grid_h: int = 40, grid_w: int = 72, *, seed: int = 0) -> Sample:
    """A video: ``frames`` frames (pairs of frames form one temporal patch).

    The default, 20 frames resized to 560x1008 (10 s of 720p video at 2 fps), is 135 MB of
    float32 pixel values, the size the field reports for such a clip.
    """
    t = frames // 2
    rows = t * grid_h * grid_w
    gen = torch.Generator().manual_seed(seed)
    feature = torch.randn(rows, PATCH_DIM, generator=gen)
    ids, span = _ids_around(rows // MERGE, VIDEO_TOKEN_ID)
    item = {
        "modality": "video",
        "feature": feature,
        "offsets": [span],
        "video_grid_thw": torch.tensor([[t, grid_h, grid_w]]),
        "second_per_grid_ts": [1.0],
    }
    return Sample(ids, {"mm_items": [item], "video_token_id": VIDEO_TOKEN_ID})


def audio_sample(clips: int = 1, seconds: float = 30.0, *, seed: int = 0) -> Sample:
    """Log-mel features of ``clips`` audio clips: (clips, 128, 100 frames per second)."""
    frames = int(seconds * 100)
    gen = torch.Generator().manual_seed(seed)
    feature = torch.randn(clips, 128, frames, generator=gen)
    n_tokens = clips * (frames // 4)
    ids, span = _ids_around(n_tokens, AUDIO_TOKEN_ID)
    item = {
        "modality": "audio",
        "feature": feature,
        "offsets": [span],
        "audio_feature_lens": torch.full((clips,), frames, dtype=torch.int64),
    }
    return Sample(ids, {"mm_items": [item], "audio_token_id": AUDIO_TOKEN_ID})


def restamped(
    base: Sample, stamp: int, allocate: Callable[[Sequence[int], torch.dtype], torch.Tensor]
) -> Sample:
    """A copy of ``base`` in memory from ``allocate`` whose bytes differ from every other stamp.

    The features are copied on several threads, then one value in every 4 KiB is set to
    ``stamp`` (a float, so the pixels stay finite): distinct bytes and hashes for the price of
    one copy, where drawing fresh random pixels would cost many times that.
    """
    items = []
    for item in base.mm_inputs["mm_items"]:
        source = item["feature"]
        feature = allocate(source.shape, source.dtype)
        shared_copier().copy(
            feature.data_ptr(), source.data_ptr(), source.numel() * source.element_size()
        )
        # numpy, not torch: a torch op would leave its OpenMP team spinning on every core.
        feature.numpy().reshape(-1)[:: 4096 // source.element_size()] = float(stamp)
        items.append({**item, "feature": feature})
    return Sample(base.input_ids, {**base.mm_inputs, "mm_items": items})


class FreshPayloads:
    """A new, distinct payload of about ``size_mb`` for every request.

    Two random images are drawn once; each call to ``next`` copies one into memory from
    ``allocate`` (a new tensor, or the pipeline's arena) and stamps it with a request count.
    """

    def __init__(self, size_mb: float, *, seed: int = 0) -> None:
        self._bases = [image_of_size(size_mb, seed=seed + k) for k in range(2)]
        self._count = 0

    def next(self, allocate: Callable[[Sequence[int], torch.dtype], torch.Tensor]) -> Sample:
        """The next request's sample (its bytes made now, before any clock starts)."""
        self._count += 1
        return restamped(self._bases[self._count % 2], self._count, allocate)

    def again(self, allocate: Callable[[Sequence[int], torch.dtype], torch.Tensor]) -> Sample:
        """A new copy of the same bytes every time: a client resending an image, which the
        processor turns into a new tensor holding what it held before."""
        return restamped(self._bases[0], 0, allocate)


def distinct_pool(
    make: Callable[[int], Sample], n: int, *, bases: int = 4, first_stamp: int = 1
) -> list[Sample]:
    """``n`` samples with distinct bytes, in ordinary memory, from ``bases`` random draws
    (pools with first stamps ``n`` apart share no bytes)."""
    drawn = [make(seed) for seed in range(min(bases, n))]
    return [restamped(drawn[i % len(drawn)], first_stamp + i, ordinary_memory) for i in range(n)]


def ordinary_memory(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """A new tensor in ordinary memory, where a Hugging Face processor's output lives."""
    return torch.empty(tuple(shape), dtype=dtype)
