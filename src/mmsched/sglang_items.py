"""SGLang's processor-output layout, turned into the dict that mmsched validates.

A server that already runs SGLang's multimodal processors gets, per request, a
``MultimodalInputs``-like object whose ``mm_items`` are ``MultimodalDataItem``s: each with
``modality`` (an enum such as ``Modality.IMAGE``, or its name), ``feature`` (a tensor, an
array or a list of tensors), ``offsets`` and a ``model_specific_data`` dict holding
``image_grid_thw`` and the like; ``hash`` and ``pad_value`` still unset.
[`from_sglang`][mmsched.sglang_items.from_sglang] accepts that layout, as dicts or as the
objects themselves (dataclasses or anything with those attributes), and returns the plain
dict that [`MultimodalInputs.from_dict`][mmsched.inputs.MultimodalInputs.from_dict] and
``Pipeline.generate`` take. With ``hasher="sglang-0.5"`` the hashes and pad values are then
the ones SGLang itself would compute.

What mmsched does not carry is refused here, naming the field: precomputed embeddings, and
a hash or pad value set by the caller (mmsched computes them once, from the bytes).
Scheduler-side bookkeeping that SGLang fills in later (``image_pad_len``,
``num_image_tokens``, ``data_offsets``) is dropped, and so is any field left ``None``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from mmsched.errors import InvalidMultimodalInput

# SGLang's Modality enum names, as mmsched's modality values.
_MODALITY_OF = {
    "IMAGE": "image",
    "MULTI_IMAGES": "image",
    "VIDEO": "video",
    "AUDIO": "audio",
}
# Filled in by SGLang's scheduler, not by a processor: nothing for mmsched to carry.
_SCHEDULER_FIELDS = frozenset({"image_pad_len", "num_image_tokens", "data_offsets"})
_ITEM_FIELDS = ("modality", "feature", "offsets")


def from_sglang(processor_output: Any) -> dict[str, Any]:
    """SGLang's ``MultimodalInputs`` layout (a dict or an object) as mmsched's processor dict.

    Raises:
        InvalidMultimodalInput: naming the field that cannot be carried (precomputed
            embeddings, a caller-supplied hash or pad value, an unknown modality, a
            ``model_specific_data`` key that shadows an item field, a value of the wrong
            type).
    """
    try:
        top = _fields("mm_inputs", processor_output)
        raw_items = top.pop("mm_items", None)
        if not isinstance(raw_items, list | tuple):
            raise InvalidMultimodalInput(
                "mm_items", f"expected a list of items, got {type(raw_items).__name__}"
            )
        out: dict[str, Any] = {
            key: value
            for key, value in top.items()
            if value is not None and key not in _SCHEDULER_FIELDS
        }
        out["mm_items"] = [_item(f"mm_items[{i}]", raw) for i, raw in enumerate(raw_items)]
        return out
    except InvalidMultimodalInput:
        raise
    except Exception as exc:  # foreign objects: whatever reading them raises is this input's
        raise InvalidMultimodalInput(
            "mm_inputs", f"unreadable SGLang layout: {type(exc).__name__}: {exc}"
        ) from exc


def _item(where: str, raw: Any) -> dict[str, Any]:
    fields = _fields(where, raw)
    for key in ("hash", "pad_value"):
        if fields.pop(key, None) is not None:
            raise InvalidMultimodalInput(
                f"{where}.{key}", "computed by mmsched from the bytes; leave it unset"
            )
    if fields.pop("precomputed_embeddings", None) is not None:
        raise InvalidMultimodalInput(
            f"{where}.precomputed_embeddings", "not carried by mmsched; send the feature"
        )
    specific = fields.pop("model_specific_data", None) or {}
    if not isinstance(specific, Mapping):
        raise InvalidMultimodalInput(
            f"{where}.model_specific_data", f"expected a dict, got {type(specific).__name__}"
        )
    item = {key: value for key, value in fields.items() if value is not None}
    item["modality"] = _modality(f"{where}.modality", fields.get("modality"))
    for key, value in specific.items():
        if key in _ITEM_FIELDS:
            raise InvalidMultimodalInput(
                f"{where}.model_specific_data.{key}", "shadows the item's own field"
            )
        if value is not None:
            item[key] = value
    return item


def _modality(where: str, value: Any) -> str:
    name = getattr(value, "name", value)  # an enum member, or already its name / value
    if isinstance(name, str) and name.upper() in _MODALITY_OF:
        return _MODALITY_OF[name.upper()]
    known = ", ".join(sorted(_MODALITY_OF))
    raise InvalidMultimodalInput(where, f"unknown modality {value!r}; known: {known}")


def _fields(where: str, obj: Any) -> dict[str, Any]:
    if isinstance(obj, Mapping):
        return dict(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        # Not dataclasses.asdict: it deep-copies every tensor.
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return {k: v for k, v in vars(obj).items() if not k.startswith("_")}
    raise InvalidMultimodalInput(
        where, f"expected a dict or an SGLang object, got {type(obj).__name__}"
    )
