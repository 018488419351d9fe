"""SGLang parity: the ``sglang-0.5`` hasher gives SGLang's hash and pad value, and
``from_sglang`` accepts SGLang's item layout.

The reference below is SGLang's published formula, written out independently: SHA-256 over
the feature's raw bytes in C order (a list of tensors: each part's bytes in turn; bf16 as
stored), the first 8 digest bytes read big-endian, and ``pad_value = 1_000_000 + hash %
2**30``. Pinned values guard against both sides drifting together.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
from typing import Any

import numpy as np
import pytest
import torch

from mmsched import InvalidMultimodalInput, MultimodalInputs
from mmsched.sglang_items import from_sglang

SHIFT = 1_000_000


def raw_bytes(part: Any) -> bytes:
    if isinstance(part, np.ndarray):
        return np.ascontiguousarray(part).tobytes()
    flat = part.detach().flatten()  # C order, a copy when non-contiguous
    if flat.dtype in (torch.bfloat16, torch.float16):
        return flat.view(torch.int16).numpy().tobytes()
    return flat.numpy().tobytes()


def sglang_hash(feature: Any) -> tuple[int, int]:
    parts = feature if isinstance(feature, list) else [feature]
    digest = hashlib.sha256()
    for part in parts:
        digest.update(raw_bytes(part))
    value = int.from_bytes(digest.digest()[:8], "big")
    return value, SHIFT + value % (1 << 30)


def build(feature: Any, rows: int) -> MultimodalInputs:
    raw = {
        "mm_items": [{"modality": "image", "feature": feature, "offsets": [(0, rows - 1)]}],
        "im_token_id": 7,
    }
    return MultimodalInputs.from_dict(raw, hasher="sglang-0.5", input_len=rows)


FEATURES = {
    "fp32": lambda: torch.randn(16, 1176),
    "bf16": lambda: torch.randn(16, 1176).to(torch.bfloat16),
    "fp16": lambda: torch.randn(16, 1176).to(torch.float16),
    "uint8 numpy": lambda: np.random.default_rng(0).integers(0, 255, (16, 588), dtype=np.uint8),
    "non-contiguous": lambda: torch.randn(1176, 16).t(),
    "list of tensors": lambda: [torch.randn(10, 1176), torch.randn(6, 1176)],
    "list, one non-contiguous": lambda: [torch.randn(1176, 4).t(), torch.randn(12, 1176)],
}


@pytest.mark.parametrize("kind", FEATURES)
def test_hash_and_pad_value_match_sglangs_formula(kind: str) -> None:
    feature = FEATURES[kind]()
    item = build(feature, 16).mm_items[0]
    assert (item.hash, item.pad_value) == sglang_hash(feature)
    assert item.pad_value >= SHIFT


@pytest.mark.parametrize(
    ("feature", "expected"),
    [
        (torch.arange(12, dtype=torch.float32).reshape(3, 4), (3017843382285002014, 619423582)),
        (torch.arange(12, dtype=torch.bfloat16).reshape(3, 4), (13222436701366343344, 437688560)),
        (np.arange(12, dtype=np.uint8).reshape(3, 4), (18443271527642641981, 491157629)),
    ],
    ids=["fp32", "bf16", "uint8"],
)
def test_pinned_vectors(feature: Any, expected: tuple[int, int]) -> None:
    item = build(feature, 3).mm_items[0]
    assert (item.hash, item.pad_value) == expected == sglang_hash(feature)


def test_a_list_hashes_as_its_parts_joined() -> None:
    parts = [torch.randn(3, 8), torch.randn(5, 8)]
    joined = build(parts, 8).mm_items[0]
    assert joined.feature.shape == (8, 8)
    assert torch.equal(joined.feature, torch.cat(parts))
    assert joined.hash == build(torch.cat(parts), 8).mm_items[0].hash


def test_list_parts_that_cannot_join_are_refused_by_name() -> None:
    with pytest.raises(InvalidMultimodalInput, match=r"feature\[1\]"):
        build([torch.randn(3, 8), torch.randn(3, 9)], 6)
    with pytest.raises(InvalidMultimodalInput, match=r"feature\[1\]"):
        build([torch.randn(3, 8), torch.randn(3, 8).half()], 6)
    with pytest.raises(InvalidMultimodalInput, match="empty list"):
        build([], 6)


def test_other_hashers_keep_pad_values_above_any_vocabulary() -> None:
    for hasher in ("blake3", "sha256", "xxh3"):
        raw = {
            "mm_items": [{"modality": "image", "feature": torch.randn(4, 4), "offsets": [(0, 0)]}]
        }
        item = MultimodalInputs.from_dict(raw, hasher=hasher).mm_items[0]
        assert SHIFT <= item.pad_value < SHIFT + 2**30 < 2**31


# ---------------------------------------------------------------- SGLang's item layout


class Modality(enum.Enum):  # the shape of SGLang's enum: members named IMAGE, VIDEO, ...
    IMAGE = enum.auto()
    MULTI_IMAGES = enum.auto()
    VIDEO = enum.auto()
    AUDIO = enum.auto()


@dataclasses.dataclass
class Item:  # SGLang's MultimodalDataItem fields, as a processor leaves them
    modality: Modality
    feature: Any = None
    offsets: Any = None
    hash: int | None = None
    pad_value: int | None = None
    precomputed_embeddings: Any = None
    model_specific_data: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Inputs:  # SGLang's MultimodalInputs, the fields a processor fills
    mm_items: list[Item]
    im_token_id: int | None = None
    video_token_id: int | None = None
    image_pad_len: list[int] | None = None
    mrope_positions: torch.Tensor | None = None


def sglang_output(feature: torch.Tensor) -> Inputs:
    grid = torch.tensor([[1, 4, 4]])
    item = Item(Modality.IMAGE, feature, [(1, 4)], model_specific_data={"image_grid_thw": grid})
    return Inputs([item], im_token_id=151655, image_pad_len=[4])


def test_sglang_objects_become_mmsched_inputs_with_sglangs_values() -> None:
    feature = torch.randn(16, 1176)
    raw = from_sglang(sglang_output(feature))
    mm = MultimodalInputs.from_dict(raw, hasher="sglang-0.5", input_len=6)
    item = mm.mm_items[0]
    assert item.modality.value == "image"
    assert torch.equal(item.model_specific_data["image_grid_thw"], torch.tensor([[1, 4, 4]]))
    assert (item.hash, item.pad_value) == sglang_hash(feature)
    assert mm.im_token_id == 151655
    assert item.feature.data_ptr() == feature.data_ptr()  # no copy on the way


def test_sglang_dicts_are_accepted_too() -> None:
    feature = torch.randn(16, 1176)
    as_dict = {
        "mm_items": [
            {
                "modality": "MULTI_IMAGES",
                "feature": [feature[:8], feature[8:]],
                "offsets": [(0, 3)],
                "hash": None,
                "model_specific_data": {"image_grid_thw": torch.tensor([[1, 2, 4], [1, 2, 4]])},
            }
        ],
        "im_token_id": 5,
        "num_image_tokens": None,
    }
    mm = MultimodalInputs.from_dict(from_sglang(as_dict), hasher="sglang-0.5", input_len=6)
    assert mm.mm_items[0].hash == sglang_hash(feature)[0]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda i: setattr(i, "hash", 12), r"mm_items\[0\]\.hash"),
        (lambda i: setattr(i, "pad_value", 12), r"mm_items\[0\]\.pad_value"),
        (lambda i: setattr(i, "precomputed_embeddings", torch.ones(2)), "precomputed_embeddings"),
        (lambda i: setattr(i, "modality", "SMELL"), r"mm_items\[0\]\.modality"),
        (lambda i: setattr(i, "model_specific_data", {"feature": 1}), "shadows"),
        (lambda i: setattr(i, "model_specific_data", [1]), "model_specific_data"),
    ],
)
def test_what_mmsched_cannot_carry_is_refused_by_name(change: Any, field: str) -> None:
    output = sglang_output(torch.randn(16, 1176))
    change(output.mm_items[0])
    with pytest.raises(InvalidMultimodalInput, match=field):
        from_sglang(output)


def test_garbage_is_an_input_error_not_a_crash() -> None:
    for garbage in (None, 3, "text", {"mm_items": 3}, {"mm_items": [object()]}):
        with pytest.raises(InvalidMultimodalInput):
            from_sglang(garbage)
