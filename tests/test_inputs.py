"""MultimodalInputs.from_dict: image, video, audio, and every way a processor output is wrong."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from malformed import CATALOGUE, base_sample
from mmsched import InvalidMultimodalInput, Modality, MultimodalInputs, hash_stats, materialize
from mmsched.bench.workloads import audio_sample, image_sample, qwen2vl_image, video_sample


def test_image_from_qwen2vl_shapes() -> None:
    sample = qwen2vl_image()
    assert sample.mm_inputs["mm_items"][0]["feature"].shape == (4000, 1176)
    before = hash_stats()
    mm = MultimodalInputs.from_dict(sample.mm_inputs, input_len=len(sample.input_ids))
    assert (hash_stats() - before).count == 1  # hashed exactly once
    (item,) = mm.mm_items
    assert item.modality is Modality.IMAGE
    assert item.pad_value == item.hash % 2**30
    assert item.offsets == [(16, 16 + 1000 - 1)]
    assert torch.equal(item.model_specific_data["image_grid_thw"], torch.tensor([[1, 50, 80]]))
    assert mm.im_token_id == 151655
    assert mm.nbytes == 4000 * 1176 * 4


def test_video_with_timing() -> None:
    sample = video_sample(frames=4, grid_h=4, grid_w=6)
    mm = MultimodalInputs.from_dict(sample.mm_inputs, input_len=len(sample.input_ids))
    (item,) = mm.mm_items
    assert item.modality is Modality.VIDEO
    assert item.model_specific_data["second_per_grid_ts"] == [1.0]
    assert mm.video_token_id is not None


def test_audio_with_lengths() -> None:
    sample = audio_sample(clips=2, seconds=1.0)
    mm = MultimodalInputs.from_dict(sample.mm_inputs, input_len=len(sample.input_ids))
    (item,) = mm.mm_items
    assert item.modality is Modality.AUDIO
    assert item.feature.shape == (2, 128, 100)
    assert mm.audio_token_id is not None


def test_several_items_and_mrope() -> None:
    a, b = image_sample(2, 2, seed=1).mm_inputs, image_sample(2, 2, seed=2).mm_inputs
    item_a, item_b = dict(a["mm_items"][0]), dict(b["mm_items"][0])
    item_a["offsets"], item_b["offsets"] = [(1, 1)], [(3, 3)]
    raw = {
        "mm_items": [item_a, item_b],
        "im_token_id": 5,
        "mrope_positions": torch.zeros(3, 6, dtype=torch.int64),
        "mrope_position_delta": torch.tensor([[-2]]),
    }
    mm = MultimodalInputs.from_dict(raw, input_len=6)
    assert mm.mm_items[0].hash != mm.mm_items[1].hash
    assert mm.pad_input_ids([0, 5, 0, 5, 0, 0]) == [
        0,
        mm.mm_items[0].pad_value,
        0,
        mm.mm_items[1].pad_value,
        0,
        0,
    ]


def test_equal_media_equal_pad_values() -> None:
    one = MultimodalInputs.from_dict(image_sample(2, 4, seed=7).mm_inputs)
    two = MultimodalInputs.from_dict(image_sample(2, 4, seed=7).mm_inputs)
    assert one.fingerprint() == two.fingerprint()
    assert one.content_digest() == two.content_digest()


def test_numpy_feature_is_accepted_without_copy() -> None:
    raw = image_sample(2, 2).mm_inputs
    arr = raw["mm_items"][0]["feature"].numpy()
    raw["mm_items"][0]["feature"] = arr
    mm = MultimodalInputs.from_dict(raw)
    assert mm.mm_items[0].feature.data_ptr() == arr.ctypes.data


def test_materialize_passes_built_objects_through() -> None:
    mm = MultimodalInputs.from_dict(image_sample(2, 2).mm_inputs)
    assert materialize(mm) is mm
    assert materialize(None) is None


# ------------------------------------------------------------------ the invalid-input catalogue


@pytest.mark.parametrize(
    ("edit", "field", "problem"),
    [pytest.param(edit, field, problem, id=name) for name, edit, field, problem in CATALOGUE],
)
def test_invalid_input_names_the_field(
    edit: Callable[[dict[str, Any]], None], field: str, problem: str
) -> None:
    raw = base_sample().mm_inputs
    edit(raw)
    with pytest.raises(InvalidMultimodalInput) as info:
        MultimodalInputs.from_dict(raw, input_len=200)
    assert info.value.field == field
    assert problem in str(info.value)
    assert isinstance(info.value, ValueError)


def test_not_a_dict() -> None:
    with pytest.raises(InvalidMultimodalInput, match="mm_inputs: expected a dict"):
        MultimodalInputs.from_dict([1, 2])  # type: ignore[arg-type]


def test_payload_over_limit() -> None:
    with pytest.raises(InvalidMultimodalInput, match="over the limit of 1000"):
        MultimodalInputs.from_dict(base_sample().mm_inputs, max_bytes=1000)


def test_invalid_input_hashes_nothing() -> None:
    raw = base_sample().mm_inputs
    raw["mm_items"][0]["offsets"] = [(-1, 0)]
    before = hash_stats()
    with pytest.raises(InvalidMultimodalInput):
        MultimodalInputs.from_dict(raw)
    assert (hash_stats() - before).count == 0
