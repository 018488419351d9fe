"""MultimodalInputs.from_dict: image, video, audio, and every way a processor output is wrong."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from malformed import CATALOGUE, base_sample
from mmsched import InvalidMultimodalInput, Modality, MultimodalInputs, hash_stats, materialize
from mmsched.bench.workloads import audio_sample, image_sample, qwen2vl_image, video_sample
from mmsched.inputs import validate_input_ids


def test_image_from_qwen2vl_shapes() -> None:
    sample = qwen2vl_image()
    assert sample.mm_inputs["mm_items"][0]["feature"].shape == (4000, 1176)
    before = hash_stats()
    mm = MultimodalInputs.from_dict(sample.mm_inputs, input_len=len(sample.input_ids))
    assert (hash_stats() - before).count == 1  # hashed exactly once
    (item,) = mm.mm_items
    assert item.modality is Modality.IMAGE
    assert item.pad_value == 1_000_000 + (item.hash & (2**62 - 1))  # 62 bits: an int64 id
    assert item.pad_values == (item.pad_value,)
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


def _with_feature(feature: Any) -> dict[str, Any]:
    raw = base_sample().mm_inputs
    raw["mm_items"][0]["feature"] = feature
    return raw


def test_foreign_byte_order_and_reversed_arrays_hash_as_native() -> None:
    # Found by an adversarial review: a big-endian array killed every rank that built it.
    native = base_sample().mm_inputs["mm_items"][0]["feature"].numpy()
    expected = MultimodalInputs.from_dict(_with_feature(native)).mm_items[0]
    big_endian = MultimodalInputs.from_dict(_with_feature(native.astype(">f4"))).mm_items[0]
    assert big_endian.hash == expected.hash
    assert torch.equal(big_endian.feature, expected.feature)
    reversed_rows = native[::-1]
    flipped = MultimodalInputs.from_dict(_with_feature(reversed_rows)).mm_items[0]
    assert torch.equal(flipped.feature, torch.from_numpy(reversed_rows.copy()))


@pytest.mark.parametrize(
    ("feature", "problem"),
    [
        (torch.empty(8, 1176, device="meta"), "meta tensor"),
        (torch.ones(8, 1176).to_sparse(), "sparse"),
        (np.zeros(8, dtype=np.complex256), "not a tensor type"),
    ],
    ids=["meta", "sparse", "complex256"],
)
def test_tensors_without_usable_data_are_refused(feature: Any, problem: str) -> None:
    with pytest.raises(InvalidMultimodalInput, match=problem) as info:
        MultimodalInputs.from_dict(_with_feature(feature))
    assert info.value.field == "mm_items[0].feature"


@pytest.mark.parametrize(
    ("value", "field", "problem"),
    [
        ("\ud800", "mm_items[0].note", "not valid UTF-8"),
        (float("inf"), "mm_items[0].note", "finite"),
        ({"\ud800": 1}, "mm_items[0].note.<key>", "not valid UTF-8"),
    ],
)
def test_model_data_that_the_codec_would_mangle_is_refused(
    value: Any, field: str, problem: str
) -> None:
    raw = base_sample().mm_inputs
    raw["mm_items"][0]["note"] = value
    with pytest.raises(InvalidMultimodalInput, match=problem) as info:
        MultimodalInputs.from_dict(raw)
    assert info.value.field == field


def test_cycles_and_deep_nesting_are_refused() -> None:
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    deep: Any = 1
    for _ in range(100):
        deep = [deep]
    for value in (cyclic, deep):
        raw = base_sample().mm_inputs
        raw["mm_items"][0]["note"] = value
        with pytest.raises(InvalidMultimodalInput, match="nested over 32 levels, or a cycle"):
            MultimodalInputs.from_dict(raw)


def test_offsets_are_bounded_without_input_len() -> None:
    raw = base_sample().mm_inputs
    raw["mm_items"][0]["offsets"] = [(10, 2**40)]
    with pytest.raises(InvalidMultimodalInput, match="past any input"):
        MultimodalInputs.from_dict(raw)  # no input_len given


def test_unforeseen_failures_are_still_invalid_input(monkeypatch: pytest.MonkeyPatch) -> None:
    import mmsched.inputs

    def explode(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("a case nobody foresaw")

    monkeypatch.setattr(mmsched.inputs, "_check_model_specific", explode)
    with pytest.raises(InvalidMultimodalInput, match="RuntimeError: a case nobody foresaw") as info:
        MultimodalInputs.from_dict(base_sample().mm_inputs)
    assert info.value.field == "mm_inputs"


@pytest.mark.parametrize(
    ("ids", "field", "problem"),
    [
        ([1, -1], "input_ids[1]", "[0, 2**31)"),
        ([None], "input_ids[0]", "NoneType"),
        (["7"], "input_ids[0]", "str"),
        ([True], "input_ids[0]", "bool"),
        ("1234", "input_ids", "str"),
        (torch.zeros(3), "input_ids", "1-D integer"),
        ([2**40], "input_ids[0]", "[0, 2**31)"),
    ],
)
def test_input_ids_are_validated(ids: Any, field: str, problem: str) -> None:
    with pytest.raises(InvalidMultimodalInput, match=re.escape(problem)) as info:
        validate_input_ids(ids)
    assert info.value.field == field


def test_input_ids_from_numpy_and_tensors_become_ints() -> None:
    assert validate_input_ids([np.int64(3), np.int32(4)]) == [3, 4]
    assert validate_input_ids(np.arange(3)) == [0, 1, 2]
    assert validate_input_ids(torch.arange(2)) == [0, 1]
    assert all(type(i) is int for i in validate_input_ids(np.arange(3)))
