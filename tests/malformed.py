"""The catalogue of malformed processor outputs, shared by the unit and the pipeline tests.

Each entry: (name, edit applied to a valid sample's mm_inputs, the field the error must
name, a fragment of the problem it must state). Checked with ``input_len=200``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from mmsched.bench.workloads import Sample, audio_sample, image_sample, video_sample


def base_sample() -> Sample:
    """A valid image request of 16 prompt ids, 2 image tokens, 16 ids after."""
    return image_sample(2, 4)


def _set_item(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(raw: dict[str, Any]) -> None:
        raw["mm_items"][0][key] = value

    return edit


def _del_item(key: str) -> Callable[[dict[str, Any]], None]:
    def edit(raw: dict[str, Any]) -> None:
        del raw["mm_items"][0][key]

    return edit


def _top(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(raw: dict[str, Any]) -> None:
        raw[key] = value

    return edit


def _second_item(offsets: Any) -> Callable[[dict[str, Any]], None]:
    def edit(raw: dict[str, Any]) -> None:
        extra = dict(raw["mm_items"][0])
        extra["offsets"] = offsets
        raw["mm_items"].append(extra)

    return edit


def _video_item(**changes: Any) -> Callable[[dict[str, Any]], None]:
    def edit(raw: dict[str, Any]) -> None:
        video = video_sample(frames=2, grid_h=2, grid_w=2).mm_inputs["mm_items"][0]
        video.update(changes)
        video["offsets"] = [(100, 100)]
        raw["mm_items"].append(video)

    return edit


def _audio_item(**changes: Any) -> Callable[[dict[str, Any]], None]:
    def edit(raw: dict[str, Any]) -> None:
        audio = audio_sample(clips=2, seconds=0.1).mm_inputs["mm_items"][0]
        audio.update(changes)
        audio["offsets"] = [(100, 100)]
        raw["mm_items"].append(audio)

    return edit


CATALOGUE: list[tuple[str, Callable[[dict[str, Any]], None], str, str]] = [
    ("missing mm_items", lambda r: r.pop("mm_items"), "mm_items", "missing"),
    ("mm_items not a list", _top("mm_items", {"a": 1}), "mm_items", "expected a list"),
    ("no items", _top("mm_items", []), "mm_items", "empty"),
    ("item not a dict", _top("mm_items", [7]), "mm_items[0]", "expected a dict"),
    ("empty item", _top("mm_items", [{}]), "mm_items[0]", "empty item"),
    ("missing modality", _del_item("modality"), "mm_items[0].modality", "missing"),
    ("unknown modality", _set_item("modality", "smell"), "mm_items[0].modality", "unknown"),
    ("missing feature", _del_item("feature"), "mm_items[0].feature", "missing"),
    (
        "feature a list of non-tensors",
        _set_item("feature", [[1.0]]),
        "mm_items[0].feature[0]",
        "expected a tensor",
    ),
    (
        "feature a string",
        _set_item("feature", "pixels"),
        "mm_items[0].feature",
        "expected a tensor",
    ),
    ("object array", _set_item("feature", np.array([object()])), "mm_items[0].feature", "objects"),
    (
        "int64 feature",
        _set_item("feature", torch.zeros(8, 1176, dtype=torch.int64)),
        "mm_items[0].feature",
        "not allowed",
    ),
    (
        "complex feature",
        _set_item("feature", torch.zeros(8, 3, dtype=torch.complex64)),
        "mm_items[0].feature",
        "not allowed",
    ),
    ("empty feature", _set_item("feature", torch.zeros(0, 1176)), "mm_items[0].feature", "empty"),
    ("scalar feature", _set_item("feature", torch.tensor(1.0)), "mm_items[0].feature", "empty"),
    ("missing offsets", _del_item("offsets"), "mm_items[0].offsets", "missing"),
    ("offsets empty", _set_item("offsets", []), "mm_items[0].offsets", "non-empty"),
    (
        "offset not a pair",
        _set_item("offsets", [(1, 2, 3)]),
        "mm_items[0].offsets[0]",
        "(start, end)",
    ),
    ("offset floats", _set_item("offsets", [(1.0, 2.0)]), "mm_items[0].offsets[0]", "(start, end)"),
    ("offset negative", _set_item("offsets", [(-1, 2)]), "mm_items[0].offsets[0]", "negative"),
    ("offset reversed", _set_item("offsets", [(5, 2)]), "mm_items[0].offsets[0]", "before start"),
    ("offsets overlap", _second_item([(17, 18)]), "mm_items[1].offsets", "overlaps"),
    ("offset past input", _set_item("offsets", [(10, 5000)]), "mm_items[0].offsets", "past input"),
    (
        "grid contradicts",
        _set_item("image_grid_thw", torch.tensor([[1, 2, 3]])),
        "mm_items[0].image_grid_thw",
        "patches",
    ),
    (
        "grid wrong shape",
        _set_item("image_grid_thw", torch.tensor([1, 2, 4])),
        "mm_items[0].image_grid_thw",
        "(n, 3)",
    ),
    (
        "grid float",
        _set_item("image_grid_thw", torch.tensor([[1.0, 2.0, 4.0]])),
        "mm_items[0].image_grid_thw",
        "integer",
    ),
    (
        "grid zero",
        _set_item("image_grid_thw", torch.tensor([[0, 2, 4]])),
        "mm_items[0].image_grid_thw",
        "positive",
    ),
    (
        "video grid on image",
        _set_item("video_grid_thw", torch.tensor([[1, 2, 4]])),
        "mm_items[0].video_grid_thw",
        "not allowed on a image",
    ),
    (
        "video timing count",
        _video_item(second_per_grid_ts=[1.0, 2.0]),
        "mm_items[1].second_per_grid_ts",
        "1 videos",
    ),
    (
        "video timing negative",
        _video_item(second_per_grid_ts=[-1.0]),
        "mm_items[1].second_per_grid_ts",
        "positive",
    ),
    (
        "audio lens count",
        _audio_item(audio_feature_lens=torch.tensor([10])),
        "mm_items[1].audio_feature_lens",
        "2 clips",
    ),
    (
        "audio lens too long",
        _audio_item(audio_feature_lens=torch.tensor([10, 99999])),
        "mm_items[1].audio_feature_lens",
        "lengths",
    ),
    ("hash supplied", _set_item("hash", 1), "mm_items[0].hash", "computed by mmsched"),
    ("token id negative", _top("im_token_id", -3), "im_token_id", "non-negative"),
    ("token id string", _top("im_token_id", "151655"), "im_token_id", "expected an int"),
    ("unknown top-level field", _top("pixel_values", 1), "pixel_values", "unknown field"),
    (
        "mrope wrong rows",
        _top("mrope_positions", torch.zeros(2, 50, dtype=torch.int64)),
        "mrope_positions",
        "must be 3",
    ),
    ("mrope float", _top("mrope_positions", torch.zeros(3, 50)), "mrope_positions", "integer"),
    (
        "mrope length",
        _top("mrope_positions", torch.zeros(3, 7, dtype=torch.int64)),
        "mrope_positions",
        "covers 7",
    ),
    # Found by an adversarial review: each used to escape as an untyped error, kill the
    # ranks, or be accepted.
    (
        "mrope delta beyond int64",
        _top("mrope_position_delta", 2**63 + 1),
        "mrope_position_delta",
        "does not fit in int64",
    ),
    (
        "grid overflowing int64",
        _set_item("image_grid_thw", torch.tensor([[1, 2**62 + 1, 64]])),
        "mm_items[0].image_grid_thw",
        "patches",
    ),
    (
        "complex grid",
        _set_item("image_grid_thw", torch.tensor([[1, 2, 4]], dtype=torch.complex64)),
        "mm_items[0].image_grid_thw",
        "integer",
    ),
    (
        "offset beyond any input",
        _set_item("offsets", [(10, 2**40)]),
        "mm_items[0].offsets[0]",
        "2**31",
    ),
    ("token id beyond int32", _top("im_token_id", 2**40), "im_token_id", "below 2**31"),
    ("NaN in model data", _set_item("scale", float("nan")), "mm_items[0].scale", "finite"),
    (
        "int beyond 64 bits in model data",
        _set_item("scale", [2**63 + 5]),
        "mm_items[0].scale[0]",
        "int64",
    ),
    (
        "mrope delta float",
        _top("mrope_position_delta", torch.tensor([0.5])),
        "mrope_position_delta",
        "integer",
    ),
]
