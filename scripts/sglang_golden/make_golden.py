"""Write SGLang 0.5.23's own hashes, pad values and padded ids as golden vectors.

    .venv/bin/python scripts/sglang_golden/make_golden.py --download

downloads the pinned wheel without its dependencies into ``.whl/`` (ignored by git; skip
``--download`` once it is there), loads SGLang's own functions from it unchanged (see
``sglang_wheel.py`` for exactly which, and what is stubbed), and writes
``tests/data/sglang_0_5_23_golden.json``. For every case it builds the feature from its
recipe (``tests/sglang_recipes.py``), makes SGLang's ``MultimodalDataItem``s and
``MultimodalProcessorOutput`` from it, runs ``MultimodalInputs.from_processor_output`` (which
calls each item's ``set_pad_value``: ``hash_feature`` and ``_compute_pad_values``) and
``pad_mm_tokens`` (Qwen2-VL's ``pad_input_ids``), and records the item hashes, all pad values
and the padded ids; where SGLang raises, it records the exception's type. It also records the
field layout of SGLang's ``MultimodalDataItem`` and ``MultimodalProcessorOutput`` structs and
a msgpack encoding of one item, so that a test without the wheel can build an equivalent
struct and check it against what SGLang's class encodes.

The parity tests read the JSON; nothing is downloaded in CI.
"""

from __future__ import annotations

import argparse
import enum
import json
import sys
import typing
from array import array
from pathlib import Path
from typing import Any

import msgspec

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1] / "tests"))

import sglang_wheel  # noqa: E402

from sglang_recipes import build, input_digest, leaf  # noqa: E402

OUT = HERE.parents[1] / "tests" / "data" / "sglang_0_5_23_golden.json"
TOKEN_IDS = {"im_token_id": 151655, "video_token_id": 151656, "audio_token_id": 151646}
TOKEN_OF = {"IMAGE": "im_token_id", "VIDEO": "video_token_id", "AUDIO": "audio_token_id"}
# Two spans, so that the golden ids show where SGLang restarts the cycle of pad values: at
# each span's first token. Lengths 5 and 3 exercise a span longer and shorter than the four
# values.
SPANS = [(2, 6), (8, 10)]


def _case(
    name: str,
    feature: dict[str, Any],
    modality: str = "IMAGE",
    spans: list[tuple[int, int]] | None = None,
) -> dict[str, Any]:
    return {
        "name": name,
        "items": [{"modality": modality, "feature": feature, "offsets": spans or SPANS}],
    }


def _cases() -> list[dict[str, Any]]:
    r = leaf
    cases = [
        _case("torch fp32", r("torch", "float32", [16, 1176], 1)),
        _case("torch bf16", r("torch", "bfloat16", [16, 1176], 2)),
        _case("torch fp16", r("torch", "float16", [16, 1176], 3)),
        _case("torch fp64", r("torch", "float64", [8, 64], 4)),
        _case("torch uint8", r("torch", "uint8", [16, 588], 5)),
        _case(
            "torch non-contiguous (transposed)",
            r("torch", "float32", [16, 1176], 6, layout="transposed"),
        ),
        _case(
            "torch non-contiguous (strided)", r("torch", "bfloat16", [16, 64], 7, layout="strided")
        ),
        _case("numpy fp32", r("numpy", "float32", [16, 1176], 8)),
        _case("numpy uint8", r("numpy", "uint8", [16, 588], 9)),
        _case("numpy big-endian fp32", r("numpy", "float32", [16, 64], 10, byteorder=">")),
        _case("numpy big-endian fp16", r("numpy", "float16", [16, 64], 11, byteorder=">")),
        _case("numpy transposed", r("numpy", "float32", [16, 64], 12, layout="transposed")),
        _case(
            "numpy reversed (negative strides)",
            r("numpy", "float32", [16, 64], 13, layout="reversed"),
        ),
        _case(
            "list of tensors",
            {"list": [r("torch", "float32", [10, 1176], 14), r("torch", "float32", [6, 1176], 15)]},
        ),
        _case("list of one tensor", {"list": [r("torch", "float32", [16, 64], 16)]}),
        _case(
            "list, one part non-contiguous",
            {
                "list": [
                    r("torch", "float32", [4, 1176], 17, layout="transposed"),
                    r("torch", "float32", [12, 1176], 18),
                ]
            },
        ),
        _case(
            "nested list",
            {
                "list": [
                    r("torch", "float32", [4, 64], 19),
                    {
                        "list": [
                            r("torch", "float32", [6, 64], 20),
                            r("torch", "float32", [6, 64], 21),
                        ]
                    },
                ]
            },
        ),
        _case(
            "ragged list",
            {"list": [r("torch", "float32", [4, 64], 22), r("torch", "float32", [3, 40], 23)]},
        ),
        _case(
            "mixed-dtype list",
            {"list": [r("torch", "float32", [4, 64], 24), r("torch", "float16", [4, 64], 25)]},
        ),
        _case("bf16 video", r("torch", "bfloat16", [32, 1176], 26), modality="VIDEO"),
        _case("fp32 audio", r("torch", "float32", [1, 128, 300], 27), modality="AUDIO"),
        # SGLang refuses these (hash_feature takes a list whose first part is not a torch
        # tensor for plain data and sha256 rejects it); the golden file says so.
        _case(
            "nested list, first part a list",
            {
                "list": [
                    {"list": [r("torch", "float32", [4, 64], 28)]},
                    r("torch", "float32", [4, 64], 29),
                ]
            },
        ),
        _case(
            "list of numpy arrays",
            {"list": [r("numpy", "float32", [4, 64], 30), r("numpy", "float32", [4, 64], 31)]},
        ),
        _case(
            "list, tensor then numpy",
            {"list": [r("torch", "float32", [4, 64], 32), r("numpy", "float32", [4, 64], 33)]},
        ),
        # A Qwen2-VL 1120x700 image: 4000 patches of 1176 values, 1000 tokens after merging.
        _case(
            "qwen2-vl 4000x1176 image", r("torch", "float32", [4000, 1176], 34), spans=[(2, 1001)]
        ),
    ]
    cases.append(
        {
            "name": "several items and spans",
            "items": [
                {
                    "modality": "IMAGE",
                    "feature": r("torch", "float32", [16, 64], 40),
                    "offsets": [(1, 1)],
                },
                {
                    "modality": "IMAGE",
                    "feature": r("torch", "bfloat16", [16, 64], 41),
                    "offsets": [(3, 4), (6, 14)],
                },
                {
                    "modality": "VIDEO",
                    "feature": r("torch", "float32", [32, 64], 42),
                    "offsets": [(16, 22)],
                },
                {
                    "modality": "AUDIO",
                    "feature": r("numpy", "float32", [1, 16, 30], 43),
                    "offsets": [(24, 27)],
                },
            ],
        }
    )
    return cases


def _input_ids(items: list[dict[str, Any]]) -> list[int]:
    end = max(e for item in items for _, e in item["offsets"])
    ids = [1000 + i for i in range(end + 3)]  # text tokens, each its own id
    for item in items:
        token = TOKEN_IDS[TOKEN_OF[item["modality"]]]
        for s, e in item["offsets"]:
            ids[s : e + 1] = [token] * (e - s + 1)
    return ids


def _run_case(sg: Any, case: dict[str, Any]) -> dict[str, Any]:
    features = [build(item["feature"]) for item in case["items"]]
    ids = _input_ids(case["items"])
    out: dict[str, Any] = {
        "name": case["name"],
        "items": case["items"],
        "input_digests": [input_digest(f) for f in features],
        "input_ids": ids,
        **TOKEN_IDS,
    }
    sg_items = [
        sg.MultimodalDataItem(
            modality=sg.Modality[item["modality"]],
            feature=feature,
            offsets=[tuple(o) for o in item["offsets"]],
        )
        for item, feature in zip(case["items"], features, strict=True)
    ]
    output = sg.MultimodalProcessorOutput(mm_items=sg_items, input_ids=ids, **TOKEN_IDS)
    try:
        mm_inputs = sg.MultimodalInputs.from_processor_output(output)
    except Exception as exc:  # SGLang refuses this form: record how
        out["sglang_error"] = type(exc).__name__
        return out
    padded = list(sg.pad_mm_tokens(array("q", ids), mm_inputs))
    # The processor-side padding (build_padded_input_ids) must agree with the model's.
    assert padded == sg.MultimodalProcessorOutput.build_padded_input_ids(ids, mm_inputs.mm_items)
    out["hashes"] = [item.hash for item in mm_inputs.mm_items]
    out["pad_values"] = [list(item.pad_values) for item in mm_inputs.mm_items]
    out["pad_value"] = [item.pad_value for item in mm_inputs.mm_items]
    out["padded_ids"] = padded
    return out


def _type_name(tp: Any) -> str:
    """A field's type as a short expression (``Optional[List[Tuple[int, int]]]``)."""
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tp.__name__
    if isinstance(tp, type):
        return tp.__name__
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union and len(args) == 2 and type(None) in args:
        inner = next(a for a in args if a is not type(None))
        return f"Optional[{_type_name(inner)}]"
    names = {list: "List", tuple: "Tuple", dict: "Dict"}
    if origin in names:
        return (
            f"{names[origin]}[{', '.join('...' if a is Ellipsis else _type_name(a) for a in args)}]"
        )
    raise ValueError(f"no name for type {tp!r}")


def _default(field: Any) -> dict[str, Any]:
    if field.default_factory is not msgspec.NODEFAULT:
        return {"default_factory": field.default_factory.__name__}
    if field.default is msgspec.NODEFAULT:
        return {}
    if isinstance(field.default, enum.Enum):
        return {"default_enum": field.default.name}
    return {"default": field.default}


def _layout(cls: Any) -> dict[str, Any]:
    config = cls.__struct_config__
    return {
        "name": cls.__name__,
        "module": cls.__module__,
        "config": {
            k: getattr(config, k)
            for k in (
                "array_like",
                "dict",
                "weakref",
                "frozen",
                "eq",
                "order",
                "omit_defaults",
                "forbid_unknown_fields",
                "tag",
                "tag_field",
            )
        },
        "kw_only": all(f.name in cls.__struct_fields__ for f in msgspec.structs.fields(cls)),
        "fields": [
            {"name": f.name, "type": _type_name(f.type), **_default(f)}
            for f in msgspec.structs.fields(cls)
        ],
    }


def _structs(sg: Any) -> dict[str, Any]:
    # One item as a processor leaves it, through SGLang's own class and msgpack encoder.
    sample = sg.MultimodalDataItem(
        modality=sg.Modality.IMAGE,
        feature=[[0.5, 1.5]],
        offsets=[(1, 4)],
        model_specific_data={"image_grid_thw": [[1, 2, 2]]},
    )
    return {
        "enums": {
            e.__name__: {m.name: m.value for m in e}
            for e in (sg.Modality, sg.MultimodalInputFormat)
        },
        "MultimodalDataItem": _layout(sg.MultimodalDataItem),
        "MultimodalProcessorOutput": _layout(sg.MultimodalProcessorOutput),
        "item_sample": {
            "fields": {
                "modality": "IMAGE",
                "feature": [[0.5, 1.5]],
                "offsets": [[1, 4]],
                "model_specific_data": {"image_grid_thw": [[1, 2, 2]]},
            },
            "msgpack_hex": msgspec.msgpack.encode(sample).hex(),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--download",
        action="store_true",
        help="fetch the pinned wheel into .whl/ first (pip, no dependencies)",
    )
    args = parser.parse_args()
    if args.download:
        sglang_wheel.download()
    sg = sglang_wheel.load()
    golden = {
        "sglang": sglang_wheel.VERSION,
        "wheel": sglang_wheel.WHEEL_NAME,
        "wheel_sha256": sglang_wheel.WHEEL_SHA256,
        "generated_by": "scripts/sglang_golden/make_golden.py",
        "sglang_functions": {
            path: names or "whole module" for path, names in sglang_wheel.PICKS.items()
        },
        "constants": {
            "MM_PAD_SHIFT_VALUE": sg.MM_PAD_SHIFT_VALUE,
            "_MM_WIDE_PAD_TAG": sg._MM_WIDE_PAD_TAG.decode(),
            "_MM_WIDE_PAD_MASK": sg._MM_WIDE_PAD_MASK,
        },
        "cases": [_run_case(sg, case) for case in _cases()],
        "structs": _structs(sg),
    }
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(golden, indent=1) + "\n")
    print(f"wrote {len(golden['cases'])} cases to {OUT}")


if __name__ == "__main__":
    main()
