"""SGLang's processor-output layout, turned into the dict that mmsched validates.

A server that already runs SGLang's multimodal processors gets, per request, a
``MultimodalProcessorOutput`` (SGLang 0.5.23; a ``MultimodalInputs`` in older releases)
whose ``mm_items`` are ``MultimodalDataItem``s: each with ``modality`` (an enum such as
``Modality.IMAGE``, or its name), ``feature`` (a tensor, an array or a list of tensors),
``offsets`` and a ``model_specific_data`` dict holding ``image_grid_thw`` and the like;
``hash`` and the pad values still unset. In SGLang 0.5.23 both are msgspec ``Struct``s
(``schedule_batch.py``), whose fields are listed by ``__struct_fields__`` and which keep no
``__dict__`` of their own fields. [`from_sglang`][mmsched.sglang_items.from_sglang] accepts
that layout as msgspec structs, dataclasses, plain objects or dicts, and returns the plain
dict that [`MultimodalInputs.from_dict`][mmsched.inputs.MultimodalInputs.from_dict] and
``Pipeline.generate`` take. With ``hasher="sglang-0.5.23"`` the hashes, pad values and
padded ids are then the ones SGLang 0.5.23 itself computes.

What mmsched does not carry is refused here, naming the field: precomputed embeddings (and
an item whose ``format`` says it holds them, or raw processor output), and a hash, pad
value(s) or identity digest set by the caller (mmsched computes them once, from the bytes).
Bookkeeping that SGLang fills in elsewhere is dropped: the scheduler's (``image_pad_len``,
``num_image_tokens``, ``data_offsets``, ``token_modalities``), the request's own ids
(``input_ids``, ``padded_input_ids``: mmsched pads them itself) and
``keep_device_embedding``, which only concerns precomputed embeddings; so is any field left
``None``.
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
# Filled in by SGLang's scheduler, or the request's own ids: nothing for mmsched to carry.
_DROPPED_FIELDS = frozenset(
    {
        "image_pad_len",
        "num_image_tokens",
        "data_offsets",
        "token_modalities",
        "input_ids",
        "padded_input_ids",
    }
)
_ITEM_FIELDS = ("modality", "feature", "offsets")
# Set by mmsched from the bytes, never by a caller.
_COMPUTED_FIELDS = ("hash", "pad_value", "pad_values", "identity")


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
            if value is not None and key not in _DROPPED_FIELDS
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
    for key in _COMPUTED_FIELDS:
        if fields.pop(key, None) is not None:
            raise InvalidMultimodalInput(
                f"{where}.{key}", "computed by mmsched from the bytes; leave it unset"
            )
    if fields.pop("precomputed_embeddings", None) is not None:
        raise InvalidMultimodalInput(
            f"{where}.precomputed_embeddings", "not carried by mmsched; send the feature"
        )
    form = fields.pop("format", None)
    form_name = getattr(form, "name", form)
    if form is not None and form_name != "NORMAL":
        # PRECOMPUTED_EMBEDDING and PROCESSOR_OUTPUT items hold something else than a feature.
        raise InvalidMultimodalInput(
            f"{where}.format", f"{form_name!r}: only NORMAL items (a raw feature) are carried"
        )
    fields.pop("keep_device_embedding", None)
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
    struct_fields = getattr(type(obj), "__struct_fields__", None)
    if isinstance(struct_fields, tuple) and not isinstance(obj, type):
        # A msgspec Struct (SGLang 0.5.23's items): its fields are slots, not in vars(); a
        # struct made with dict=True may hold further attributes in its __dict__.
        extra = getattr(obj, "__dict__", None) or {}
        fields = {k: v for k, v in extra.items() if not k.startswith("_")}
        fields.update({name: getattr(obj, name) for name in struct_fields})
        return fields
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        # Not dataclasses.asdict: it deep-copies every tensor.
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return {k: v for k, v in vars(obj).items() if not k.startswith("_")}
    raise InvalidMultimodalInput(
        where, f"expected a dict or an SGLang object, got {type(obj).__name__}"
    )
