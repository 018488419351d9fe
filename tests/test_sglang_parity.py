"""SGLang parity: the ``sglang-0.5.23`` hasher gives SGLang 0.5.23's hash, all its pad values
and its padded ids, and ``from_sglang`` reads SGLang's own item objects.

The expected values are not written here: ``tests/data/sglang_0_5_23_golden.json`` holds
what SGLang's own functions computed, loaded unchanged from the PyPI wheel by
``scripts/sglang_golden/make_golden.py``, for features rebuilt here from their recipes
(``sglang_recipes.py``). Where the wheel is cached in ``.whl/`` (the script's ``--download``
puts it there), the tests at the end also run SGLang's functions and class live; elsewhere
(CI) they skip, saying so, and the golden file stands in for them.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib.util
import json
import logging
import sys
import typing
from array import array
from pathlib import Path
from types import ModuleType
from typing import Any

import msgspec
import numpy as np
import pytest
import torch

from mmsched import InvalidMultimodalInput, MultimodalInputs, get_hasher
from mmsched.hashing import (
    HASHERS,
    PAD_VALUE_MASK,
    PAD_VALUE_SHIFT,
    SglangHasher,
    pad_values_of,
    padding_sequence,
)
from mmsched.sglang_items import from_sglang
from sglang_recipes import build, input_digest, leaf

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = json.loads((ROOT / "tests" / "data" / "sglang_0_5_23_golden.json").read_text())
CASES = {case["name"]: case for case in GOLDEN["cases"]}
MODALITY = {"IMAGE": "image", "VIDEO": "video", "AUDIO": "audio"}
TOKEN_KEYS = ("im_token_id", "video_token_id", "audio_token_id")
HASHER = "sglang-0.5.23"


def features_of(case: dict[str, Any]) -> list[Any]:
    features = [build(item["feature"]) for item in case["items"]]
    # The recipe rebuilds the very input SGLang hashed (or the comparison would mean nothing).
    assert [input_digest(f) for f in features] == case["input_digests"], "recipe drifted"
    return features


def raw_of(case: dict[str, Any], features: list[Any]) -> dict[str, Any]:
    items = [
        {
            "modality": MODALITY[item["modality"]],
            "feature": feature,
            "offsets": [tuple(o) for o in item["offsets"]],
        }
        for item, feature in zip(case["items"], features, strict=True)
    ]
    return {"mm_items": items, **{k: case[k] for k in TOKEN_KEYS}}


def joinable(feature: Any) -> bool:
    parts = list(feature) if isinstance(feature, list) else [feature]
    flat: list[Any] = []
    while parts:
        part = parts.pop(0)
        if isinstance(part, list):
            parts[:0] = part
        else:
            flat.append(part)
    return all(p.dtype == flat[0].dtype and p.shape[1:] == flat[0].shape[1:] for p in flat)


def test_the_golden_file_comes_from_sglang_0_5_23s_wheel() -> None:
    assert GOLDEN["sglang"] == "0.5.23"
    assert GOLDEN["wheel"].startswith("sglang-0.5.23-")
    assert len(GOLDEN["wheel_sha256"]) == 64
    assert (
        "_compute_pad_values" in GOLDEN["sglang_functions"]["sglang/srt/managers/schedule_batch.py"]
    )
    assert GOLDEN["constants"]["MM_PAD_SHIFT_VALUE"] == SglangHasher.MM_PAD_SHIFT_VALUE
    assert GOLDEN["constants"]["_MM_WIDE_PAD_TAG"].encode() == SglangHasher.WIDE_PAD_TAG
    assert GOLDEN["constants"]["_MM_WIDE_PAD_MASK"] == SglangHasher.WIDE_PAD_MASK
    # Every form the acceptance names is among the cases.
    for name in (
        "torch fp32",
        "torch bf16",
        "torch fp16",
        "numpy uint8",
        "numpy big-endian fp32",
        "torch non-contiguous (transposed)",
        "list of tensors",
        "nested list",
        "ragged list",
        "mixed-dtype list",
        "qwen2-vl 4000x1176 image",
        "several items and spans",
    ):
        assert name in CASES


HASHED = [name for name, case in CASES.items() if "sglang_error" not in case]
REFUSED = [name for name, case in CASES.items() if "sglang_error" in case]


@pytest.mark.parametrize("name", HASHED)
def test_hash_and_every_pad_value_are_sglangs(name: str) -> None:
    case = CASES[name]
    hasher = get_hasher(HASHER)
    for feature, expected_hash, expected_pads in zip(
        features_of(case), case["hashes"], case["pad_values"], strict=True
    ):
        value = hasher.hash_given(feature)
        assert value == expected_hash
        assert list(hasher.pad_values(value)) == expected_pads
        assert len(expected_pads) == 4
        assert hasher.pad_value(value) == expected_pads[0]


@pytest.mark.parametrize("name", HASHED)
def test_inputs_built_from_the_feature_carry_sglangs_values_and_padded_ids(name: str) -> None:
    case = CASES[name]
    features = features_of(case)
    raw = raw_of(case, features)
    if not all(joinable(f) for f in features):
        # mmsched carries one tensor per item: a ragged or mixed-dtype list is refused by
        # name (its hash is SGLang's all the same, above), and the padded ids follow from
        # the pad values exactly as for any other item.
        with pytest.raises(InvalidMultimodalInput, match=r"mm_items\[0\]\.feature\[1\]"):
            MultimodalInputs.from_dict(raw, hasher=HASHER)
        ids = list(case["input_ids"])
        for item, pads in zip(case["items"], case["pad_values"], strict=True):
            for start, end in item["offsets"]:
                ids[start : end + 1] = padding_sequence(pads, end - start + 1)
        assert ids == case["padded_ids"]
        return
    mm = MultimodalInputs.from_dict(raw, hasher=HASHER, input_len=len(case["input_ids"]))
    assert [i.hash for i in mm.mm_items] == case["hashes"]
    assert [list(i.pad_values) for i in mm.mm_items] == case["pad_values"]
    assert [i.pad_value for i in mm.mm_items] == case["pad_value"]
    padded = mm.pad_input_ids(case["input_ids"])
    assert padded == case["padded_ids"]
    # Wider than int32, and an int64 frame holds them unchanged.
    assert max(padded) >= 2**31
    assert np.asarray(padded, dtype=np.int64).tolist() == padded


def test_a_span_restarts_the_cycle_at_its_first_token() -> None:
    case = CASES["torch fp32"]
    (pads,) = case["pad_values"]
    (first, second) = case["items"][0]["offsets"]
    padded = case["padded_ids"]
    assert padded[first[0] : first[1] + 1] == [*pads, pads[0]]  # five tokens
    assert padded[second[0] : second[1] + 1] == pads[:3]  # three, from the first value


@pytest.mark.parametrize("name", REFUSED)
def test_what_sglang_cannot_hash_is_refused_by_name(name: str) -> None:
    case = CASES[name]
    (feature,) = features_of(case)
    with pytest.raises(InvalidMultimodalInput, match=r"SGLang 0\.5\.23 cannot hash"):
        get_hasher(HASHER).hash_given(feature)
    with pytest.raises(InvalidMultimodalInput, match=r"mm_items\[0\]\.feature"):
        MultimodalInputs.from_dict(raw_of(case, [feature]), hasher=HASHER)


def test_a_big_endian_array_is_hashed_as_stored_and_carried_native() -> None:
    case = CASES["numpy big-endian fp32"]
    (feature,) = features_of(case)
    assert feature.dtype.byteorder == ">"
    mm = MultimodalInputs.from_dict(raw_of(case, [feature]), hasher=HASHER)
    (item,) = mm.mm_items
    assert item.hash == case["hashes"][0]
    assert torch.equal(item.feature, torch.from_numpy(feature.astype("<f4")))
    # mmsched's own hashers hash what they carry: native order, equal to a native array's.
    native = MultimodalInputs.from_dict(raw_of(case, [feature.astype("<f4")]))
    assert MultimodalInputs.from_dict(raw_of(case, [feature])).mm_items[0].hash == (
        native.mm_items[0].hash
    )


def test_the_old_name_is_a_deprecated_alias(caplog: pytest.LogCaptureFixture) -> None:
    import mmsched.hashing as hashing

    hashing._warned_names.discard("sglang-0.5")
    with caplog.at_level(logging.WARNING, logger="mmsched"):
        assert get_hasher("sglang-0.5") is get_hasher(HASHER)
    assert "deprecated" in caplog.text
    assert "sglang-0.5" not in HASHERS  # not listed as a hasher of its own
    case = CASES["torch bf16"]
    mm = MultimodalInputs.from_dict(raw_of(case, features_of(case)), hasher="sglang-0.5")
    assert [list(i.pad_values) for i in mm.mm_items] == case["pad_values"]


@pytest.mark.parametrize("name", ["blake3", "sha256", "xxh3"])
def test_mmschemds_own_pad_value_is_one_wide_value_below_int64(name: str) -> None:
    raw = {"mm_items": [{"modality": "image", "feature": torch.randn(4, 4), "offsets": [(0, 2)]}]}
    item = MultimodalInputs.from_dict(raw, hasher=name).mm_items[0]
    assert item.pad_values == (item.pad_value,)
    assert item.pad_value == PAD_VALUE_SHIFT + (item.hash & PAD_VALUE_MASK)
    assert PAD_VALUE_SHIFT <= item.pad_value < PAD_VALUE_SHIFT + 2**62 < 2**63
    assert pad_values_of(2**64 - 1, name) == (PAD_VALUE_SHIFT + 2**62 - 1,)


# ------------------------------------------------- SGLang's struct, rebuilt from its layout


def rebuilt_structs() -> dict[str, Any]:
    """SGLang's Modality, MultimodalInputFormat, MultimodalDataItem and
    MultimodalProcessorOutput as msgspec defines them from the recorded layout: the same
    field names, order, types, defaults and struct options (no methods of SGLang's)."""
    layout = GOLDEN["structs"]
    ns: dict[str, Any] = {
        name: enum.Enum(name, members) for name, members in layout["enums"].items()
    }
    ns.update(
        Optional=typing.Optional,
        List=typing.List,  # noqa: UP006 (the recorded names)
        Tuple=typing.Tuple,  # noqa: UP006
        Dict=typing.Dict,  # noqa: UP006
        Tensor=torch.Tensor,
    )
    for cls_name in ("MultimodalDataItem", "MultimodalProcessorOutput"):
        spec = layout[cls_name]
        fields: list[Any] = []
        for f in spec["fields"]:
            tp = eval(
                f["type"],
                {
                    "__builtins__": {
                        "int": int,
                        "bool": bool,
                        "bytes": bytes,
                        "str": str,
                        "object": object,
                    }
                },
                ns,
            )
            if "default_factory" in f:
                assert f["default_factory"] == "dict"
                fields.append((f["name"], tp, msgspec.field(default_factory=dict)))
            elif "default_enum" in f:
                fields.append((f["name"], tp, ns[f["type"]][f["default_enum"]]))
            elif "default" in f:
                fields.append((f["name"], tp, f["default"]))
            else:
                fields.append((f["name"], tp))
        config = {k: v for k, v in spec["config"].items() if k not in ("tag", "tag_field")}
        assert spec["config"]["tag"] is None
        ns[cls_name] = msgspec.defstruct(
            cls_name, fields, kw_only=spec["kw_only"], module=__name__, **config
        )
    return ns


def test_the_rebuilt_struct_encodes_as_sglangs_own_class_did() -> None:
    ns = rebuilt_structs()
    sample = GOLDEN["structs"]["item_sample"]
    fields = dict(sample["fields"])
    item = ns["MultimodalDataItem"](
        modality=ns["Modality"][fields.pop("modality")],
        offsets=[tuple(o) for o in fields.pop("offsets")],
        **fields,
    )
    assert msgspec.msgpack.encode(item).hex() == sample["msgpack_hex"]
    assert not vars(item)  # as with SGLang's: fields are not in __dict__


def sglang_request(ns: dict[str, Any], feature: Any) -> Any:
    item = ns["MultimodalDataItem"](
        modality=ns["Modality"].IMAGE,
        feature=feature,
        offsets=[(1, 4)],
        model_specific_data={"image_grid_thw": torch.tensor([[1, 4, 4]])},
    )
    return ns["MultimodalProcessorOutput"](
        mm_items=[item], input_ids=[0, 7, 7, 7, 7, 0], im_token_id=7
    )


def test_from_sglang_reads_the_struct_layout() -> None:
    ns = rebuilt_structs()
    case = CASES["torch fp32"]
    (feature,) = features_of(case)
    mm = MultimodalInputs.from_dict(
        from_sglang(sglang_request(ns, feature)), hasher=HASHER, input_len=6
    )
    (item,) = mm.mm_items
    assert item.modality.value == "image"
    assert (item.hash, list(item.pad_values)) == (case["hashes"][0], case["pad_values"][0])
    assert torch.equal(item.model_specific_data["image_grid_thw"], torch.tensor([[1, 4, 4]]))
    assert mm.im_token_id == 7
    assert item.feature.data_ptr() == feature.data_ptr()  # no copy on the way


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("hash", 12, r"mm_items\[0\]\.hash"),
        ("pad_value", 12, r"mm_items\[0\]\.pad_value"),
        ("pad_values", (1, 2, 3, 4), r"mm_items\[0\]\.pad_values"),
        ("identity", b"x" * 32, r"mm_items\[0\]\.identity"),
        ("precomputed_embeddings", torch.ones(2), "precomputed_embeddings"),
        ("format", "PRECOMPUTED_EMBEDDING", r"mm_items\[0\]\.format"),
    ],
)
def test_what_mmsched_cannot_carry_in_a_struct_is_refused(
    field: str, value: Any, match: str
) -> None:
    ns = rebuilt_structs()
    request = sglang_request(ns, torch.randn(16, 8))
    if field == "format":
        value = ns["MultimodalInputFormat"][value]
    setattr(request.mm_items[0], field, value)
    with pytest.raises(InvalidMultimodalInput, match=match):
        from_sglang(request)


# ---------------------------------------------------------------- SGLang's layout as dicts


class OldModality(enum.Enum):  # the enum of releases before 0.5.23, MULTI_IMAGES included
    IMAGE = enum.auto()
    MULTI_IMAGES = enum.auto()
    VIDEO = enum.auto()
    AUDIO = enum.auto()


@dataclasses.dataclass
class OldItem:  # MultimodalDataItem as a dataclass, as older releases defined it
    modality: OldModality
    feature: Any = None
    offsets: Any = None
    hash: int | None = None
    pad_value: int | None = None
    precomputed_embeddings: Any = None
    model_specific_data: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class OldInputs:  # and MultimodalInputs, the fields a processor fills
    mm_items: list[OldItem]
    im_token_id: int | None = None
    image_pad_len: list[int] | None = None


def test_older_releases_dataclasses_are_read_too() -> None:
    case = CASES["torch bf16"]
    (feature,) = features_of(case)
    item = OldItem(OldModality.MULTI_IMAGES, feature, [(0, 4)])
    raw = from_sglang(OldInputs([item], im_token_id=5, image_pad_len=[5]))
    mm = MultimodalInputs.from_dict(raw, hasher=HASHER, input_len=5)
    assert mm.mm_items[0].modality.value == "image"
    assert mm.mm_items[0].hash == case["hashes"][0]
    assert mm.pad_input_ids([5] * 5) == padding_sequence(case["pad_values"][0], 5)


def test_each_item_is_hashed_once_and_counted() -> None:
    from mmsched import hash_stats

    case = CASES["several items and spans"]
    features = features_of(case)
    before = hash_stats()
    MultimodalInputs.from_dict(raw_of(case, features), hasher=HASHER)
    delta = hash_stats() - before
    assert delta.count == len(features)
    assert delta.nbytes == sum(
        f.nbytes if isinstance(f, np.ndarray) else f.numel() * f.element_size() for f in features
    )


def test_sglang_dicts_are_accepted_too() -> None:
    case = CASES["list of tensors"]
    (feature,) = features_of(case)
    as_dict = {
        "mm_items": [
            {
                "modality": "IMAGE",
                "feature": feature,
                "offsets": [(0, 3)],
                "hash": None,
                "format": "NORMAL",
                "keep_device_embedding": False,
                "model_specific_data": {"image_grid_thw": torch.tensor([[1, 2, 5], [1, 2, 3]])},
            }
        ],
        "im_token_id": 5,
        "num_image_tokens": None,
        "input_ids": [5, 5, 5, 5, 0, 0],
    }
    mm = MultimodalInputs.from_dict(from_sglang(as_dict), hasher=HASHER, input_len=6)
    assert mm.mm_items[0].hash == case["hashes"][0]
    assert mm.pad_input_ids([5, 5, 5, 5, 0, 0]) == [*case["pad_values"][0], 0, 0]


def test_an_unknown_modality_and_bad_model_data_are_refused_by_name() -> None:
    base = {"modality": "IMAGE", "feature": torch.randn(4, 4), "offsets": [(0, 0)]}
    for change, match in (
        ({"modality": "SMELL"}, r"mm_items\[0\]\.modality"),
        ({"model_specific_data": {"feature": 1}}, "shadows"),
        ({"model_specific_data": [1]}, "model_specific_data"),
    ):
        with pytest.raises(InvalidMultimodalInput, match=match):
            from_sglang({"mm_items": [{**base, **change}]})


def test_garbage_is_an_input_error_not_a_crash() -> None:
    for garbage in (None, 3, "text", {"mm_items": 3}, {"mm_items": [object()]}):
        with pytest.raises(InvalidMultimodalInput):
            from_sglang(garbage)


# ------------------------------------------- SGLang's own code, live (where the wheel is)


def _wheel_module() -> ModuleType:
    path = ROOT / "scripts" / "sglang_golden" / "sglang_wheel.py"
    spec = importlib.util.spec_from_file_location("sglang_wheel", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("sglang_wheel", module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sglang() -> Any:
    wheel = _wheel_module()
    if not wheel.wheel_path().exists():
        pytest.skip(
            f"SGLang's wheel is not in {wheel.WHEEL_DIR} (run scripts/sglang_golden/"
            "make_golden.py --download); the golden file stands in for it"
        )
    return wheel.load()


LIVE_FEATURES = {
    "fp32": leaf("torch", "float32", [7, 33], 101),
    "bf16 transposed": leaf("torch", "bfloat16", [9, 20], 102, layout="transposed"),
    "big-endian fp16": leaf("numpy", "float16", [5, 12], 103, byteorder=">"),
    "uint8 strided": leaf("numpy", "uint8", [6, 30], 104, layout="strided"),
    "nested list": {
        "list": [
            leaf("torch", "float16", [2, 3], 105),
            {"list": [leaf("torch", "float16", [4, 3], 106)]},
        ]
    },
}


@pytest.mark.parametrize("name", LIVE_FEATURES)
def test_live_against_sglangs_functions(sglang: Any, name: str) -> None:
    feature = build(LIVE_FEATURES[name])
    item = sglang.MultimodalDataItem(
        modality=sglang.Modality.IMAGE, feature=feature, offsets=[(1, 6)]
    )
    sg_inputs = sglang.MultimodalInputs.from_processor_output(
        sglang.MultimodalProcessorOutput(mm_items=[item], im_token_id=9)
    )
    ids = [0, 9, 9, 9, 9, 9, 9, 0]
    expected = list(sglang.pad_mm_tokens(array("q", ids), sg_inputs))
    raw = {
        "mm_items": [{"modality": "image", "feature": feature, "offsets": [(1, 6)]}],
        "im_token_id": 9,
    }
    (mine,) = MultimodalInputs.from_dict(raw, hasher=HASHER).mm_items
    assert (mine.hash, mine.pad_values) == (item.hash, item.pad_values)
    assert MultimodalInputs.from_dict(raw, hasher=HASHER).pad_input_ids(ids) == expected


def test_from_sglang_reads_sglangs_own_class(sglang: Any) -> None:
    feature = torch.randn(16, 1176)
    item = sglang.MultimodalDataItem(
        modality=sglang.Modality.IMAGE, feature=feature, offsets=[(1, 4)]
    )
    item.image_grid_thw = torch.tensor([[1, 4, 4]])  # SGLang routes it to model_specific_data
    assert not vars(item)  # what the old adapter read, and found empty
    request = sglang.MultimodalProcessorOutput(
        mm_items=[item], im_token_id=151655, input_ids=[0, 1, 1, 1, 1, 0]
    )
    mm = MultimodalInputs.from_dict(from_sglang(request), hasher=HASHER, input_len=6)
    (mine,) = mm.mm_items
    item.set_pad_value()  # SGLang's own hash and pad values, for comparison
    assert (mine.hash, mine.pad_values) == (item.hash, item.pad_values)
    assert torch.equal(mine.model_specific_data["image_grid_thw"], torch.tensor([[1, 4, 4]]))
    assert mine.feature.data_ptr() == feature.data_ptr()


def test_the_recorded_layout_is_the_wheels(sglang: Any) -> None:
    for cls_name in ("MultimodalDataItem", "MultimodalProcessorOutput"):
        real = [f.name for f in msgspec.structs.fields(getattr(sglang, cls_name))]
        assert real == [f["name"] for f in GOLDEN["structs"][cls_name]["fields"]]
