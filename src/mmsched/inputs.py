"""The typed multimodal inputs of one request, built once from a processor's raw dict.

A model's processor (in the tokenizer process) emits a plain dict: ``mm_items`` with one
entry per media item (``modality``, ``feature`` tensor, token ``offsets`` and model-specific
data such as ``image_grid_thw``), special token ids and M-RoPE positions.
[`MultimodalInputs.from_dict`][] validates that dict, hashes each item's feature exactly
once and sets its ``pad_value``. The result is what every scheduler rank uses; building it
again on each rank is the cost this library exists to avoid.

Offsets follow SGLang: ``(start, end)`` token index pairs with ``end`` *inclusive*.

This is where foreign data enters: whatever a processor hands over,
[`from_dict`][mmsched.inputs.MultimodalInputs.from_dict] either
returns a valid object or raises [`InvalidMultimodalInput`][] naming the field. A failure
the checks below did not foresee is still turned into that error (field ``mm_inputs``), so
no other exception type ever escapes to the tokenizer's or a rank's loop. Numpy arrays of
non-native byte order or with negative strides are accepted and copied once into a native,
contiguous tensor, so every rank reads the same values. The hash is taken before that copy
and before a list is joined, so that a hasher that matches another system's values
(``sglang-0.5.23``) sees the feature as the processor gave it.

An item may carry its own content hash, ``content_hash``: an int in ``[0, 2**64)``, or
bytes of 8 to 64 (a digest, say BLAKE3's 32; its first 8 bytes, big-endian, are the hash).
It is then the item's hash, and its feature is not hashed at all: a front end that keyed the
media by its encoded bytes (as ``mmsched serve`` does, [`mmsched.preprocess.keys`][])
passes that key, and the features, on a GPU maybe, are never read to hash them. It is
*trusted* input, as SGLang's ``content_hash`` and vLLM's ``multi_modal_uuids`` are: the
hash names the media for the ranks' feature cache and the prefix cache, so a caller that
passes the same hash for other media gets the other media's cached features and pad
values. Pass it only from code that computed it, never from a client. Such items are
counted in [`hash_stats`][mmsched.hashing.hash_stats]' ``supplied``, not in its ``count``.

Each item has one or more pad values: a media span of the input ids cycles through them from
its first token ([`pad_input_ids`][mmsched.inputs.MultimodalInputs.pad_input_ids]). They lie
above every vocabulary and may need all 63 bits of an int64 id (see
[`mmsched.hashing`][mmsched.hashing]): padded ids are int64, as every frame of ids is.
"""

from __future__ import annotations

import enum
import itertools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import blake3
import numpy as np
import torch

from mmsched.errors import InvalidMultimodalInput, MmschedError
from mmsched.frames import INT_FRAME_MIN, Int64List
from mmsched.hashing import (
    DEFAULT_HASHER,
    get_hasher,
    padding_sequence,
    record_supplied_hash,
    tensor_bytes,
)
from mmsched.pixels import ITEM_KEY as UINT8_PIXELS
from mmsched.pixels import check_item as check_uint8_pixels


class Modality(enum.StrEnum):
    """Kind of media an item carries."""

    IMAGE = "image"
    VIDEO = "video"
    AUDIO = "audio"


_MODALITY_OF: dict[object, Modality] = {m.value: m for m in Modality}

# Feature dtypes a vision or audio encoder consumes: float pixel/feature values, or raw
# uint8 frames for processors that defer normalisation to the model.
ALLOWED_FEATURE_DTYPES = frozenset(
    {torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.uint8}
)

# Token positions are int32 in every model runtime mmsched serves: an offset or an input
# length beyond this is malformed whether or not the caller says how long the input is.
MAX_INPUT_LEN = 2**31
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
# Model-specific data nests a few levels at most; deeper is hostile (or a cycle).
_MAX_NESTING = 32

_GRID_KEY_OF = {Modality.IMAGE: "image_grid_thw", Modality.VIDEO: "video_grid_thw"}
_ITEM_KEYS = {"modality", "feature", "offsets", "content_hash"}
# A caller-supplied content hash: an int of 64 bits, or a digest of this many bytes.
CONTENT_HASH_BYTES = (8, 64)
_TOP_LEVEL_KEYS = {"mm_items", "mrope_positions", "mrope_position_delta"}


@dataclass(eq=False)
class MultimodalDataItem:
    """One media item: its feature tensor, where its tokens sit, and its content hash.

    ``model_specific_data`` holds what only some models need, validated where its meaning is
    known: ``image_grid_thw`` / ``video_grid_thw`` (int ``(n, 3)``; rows of a 2-D feature
    equal ``sum(t*h*w)``), ``second_per_grid_ts`` (one per video), ``audio_feature_lens``
    (one per audio clip), ``uint8_pixels`` (an image whose feature is its resized uint8
    ``(3, H, W)`` pixels, and how each rank makes ``pixel_values`` of them: see
    [`mmsched.pixels`][mmsched.pixels]; the pixels must match the spec and the grid). Other
    keys pass through untouched.
    """

    modality: Modality
    feature: torch.Tensor
    offsets: list[tuple[int, int]]
    hash: int
    pad_value: int
    model_specific_data: dict[str, Any] = field(default_factory=dict)
    # Every pad value, in the order a span cycles through them; pad_value is the first.
    # Empty means the one pad_value (what an item built before there were several carries).
    pad_values: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        # A decoder hands back plain strings and lists; restore the declared types (by a
        # table: an enum's own lookup costs more than the rest of the item's decode).
        self.modality = _MODALITY_OF.get(self.modality) or Modality(self.modality)
        self.offsets = [(int(s), int(e)) for s, e in self.offsets]
        self.pad_values = tuple(int(v) for v in self.pad_values) or (int(self.pad_value),)
        if self.pad_values[0] != self.pad_value:
            raise InvalidMultimodalInput(
                "pad_values", f"first value {self.pad_values[0]} is not pad_value {self.pad_value}"
            )

    @property
    def nbytes(self) -> int:
        return self.feature.numel() * self.feature.element_size()


@dataclass(eq=False)
class MultimodalInputs:
    """All multimodal inputs of one request, validated and hashed (see [`from_dict`][])."""

    mm_items: list[MultimodalDataItem]
    hasher: str = DEFAULT_HASHER
    special_token_ids: dict[str, int] = field(default_factory=dict)
    mrope_positions: torch.Tensor | None = None
    mrope_position_delta: torch.Tensor | None = None
    # The feature cache's operations for this request, as the tokenizer planned them
    # (mmsched.cache.CacheOps.to_tree); None where no cache is configured.
    cache: list[Any] | None = None

    @classmethod
    def from_dict(
        cls,
        raw: Mapping[str, Any],
        *,
        hasher: str = DEFAULT_HASHER,
        input_len: int | None = None,
        max_bytes: int | None = None,
        on_valid: Callable[[list[torch.Tensor]], None] | None = None,
    ) -> MultimodalInputs:
        """Validate a processor's output and hash each item once.

        Args:
            raw: the processor output (see the module docstring for its shape).
            hasher: name of a registered hasher (``blake3``, ``sha256``,
                ``sglang-0.5.23``, ``xxh3``).
            input_len: length of the request's input ids; when given, offsets and M-RoPE
                positions are checked against it.
            max_bytes: largest total feature size accepted, or ``None`` for no limit.
            on_valid: called with the item features as they will be carried, once all of
                ``raw`` is validated and before any is hashed (the tokenizer starts their
                copy into a payload store there, so that it overlaps the hash).

        Raises:
            InvalidMultimodalInput: naming the first offending field.
            UnknownNameError: if ``hasher`` is not registered.
        """
        hash_fn = get_hasher(hasher)  # resolve first: a bad name is a config error, not input
        try:
            parsed = _parse(raw, input_len=input_len, max_bytes=max_bytes)
            if on_valid is not None:
                on_valid([feature for _, feature, _, _, _ in parsed.items])
            items = []
            for i, (modality, feature, given, offsets, extra) in enumerate(parsed.items):
                supplied = parsed.content_hashes[i]
                try:
                    if supplied is not None:
                        h = supplied  # trusted (module docstring): no hash of the feature
                        record_supplied_hash()
                    else:
                        h = hash_fn.hash_feature(modality.value, feature, given)
                except InvalidMultimodalInput as exc:  # a form this hasher cannot hash
                    raise InvalidMultimodalInput(
                        f"mm_items[{i}].{exc.field}", exc.problem
                    ) from None
                pads = hash_fn.pad_values(h)
                items.append(
                    MultimodalDataItem(
                        modality=modality,
                        feature=feature,
                        offsets=offsets,
                        hash=h,
                        pad_value=pads[0],
                        model_specific_data=extra,
                        pad_values=pads,
                    )
                )
        except MmschedError:
            raise
        except Exception as exc:
            # A case the checks did not foresee (a tensor type torch refuses to read, say):
            # still this request's error, never an exception that escapes a serving loop.
            raise InvalidMultimodalInput(
                "mm_inputs", f"unusable processor output: {type(exc).__name__}: {exc}"
            ) from exc
        return cls(
            mm_items=items,
            hasher=hasher,
            special_token_ids=parsed.special_token_ids,
            mrope_positions=parsed.mrope_positions,
            mrope_position_delta=parsed.mrope_position_delta,
        )

    @property
    def im_token_id(self) -> int | None:
        return self.special_token_ids.get("im_token_id")

    @property
    def video_token_id(self) -> int | None:
        return self.special_token_ids.get("video_token_id")

    @property
    def audio_token_id(self) -> int | None:
        return self.special_token_ids.get("audio_token_id")

    @property
    def nbytes(self) -> int:
        """Total size of the feature tensors."""
        return sum(item.nbytes for item in self.mm_items)

    def pad_input_ids(self, input_ids: Sequence[int]) -> list[int]:
        """Input ids with each item's placeholder spans replaced by its pad values.

        Each span (an ``offsets`` pair) cycles through the item's ``pad_values`` from its
        first token, as SGLang's ``pad_mm_tokens`` does; with one pad value, the span is
        that value throughout. Equal media then give equal token ids, which is what lets a
        prefix cache hit. The ids may exceed int32 (see [`mmsched.hashing`][]).

        Two differences from SGLang's function, both where its input would be malformed
        here: a span past the end of the ids is an error (SGLang pads the part that is
        left), and every item's spans are padded (SGLang skips a modality whose token id,
        ``im_token_id`` say, is unset).
        """
        out = list(input_ids)
        for item in self.mm_items:
            for start, end in item.offsets:
                if end >= len(out):
                    raise InvalidMultimodalInput(
                        "offsets", f"span ({start}, {end}) past input of length {len(out)}"
                    )
                out[start : end + 1] = padding_sequence(item.pad_values, end - start + 1)
        return out

    def fingerprint(self) -> tuple[Any, ...]:
        """Hashes, pad values and offsets: cheap to compare across ranks."""
        return (
            self.hasher,
            tuple(
                (i.modality.value, i.hash, i.pad_values, tuple(i.offsets)) for i in self.mm_items
            ),
        )

    def content_digest(self) -> str:
        """A BLAKE3 digest of every tensor's dtype, shape and bytes, and the fingerprint.

        Two ranks with equal digests hold bitwise-equal inputs. Used to *check* that ranks
        agree; it is not a media hash and is not counted in
        [`hash_stats`][mmsched.hashing.hash_stats].
        """
        h = blake3.blake3(repr(self.fingerprint()).encode())
        for tensor in self._tensors():
            h.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
            h.update(tensor_bytes(tensor))
        return h.hexdigest()

    def _tensors(self) -> Iterator[torch.Tensor]:
        for item in self.mm_items:
            yield item.feature
            for value in item.model_specific_data.values():
                if isinstance(value, torch.Tensor):
                    yield value
        for opt in (self.mrope_positions, self.mrope_position_delta):
            if opt is not None:
                yield opt


def materialize(
    mm_inputs: MultimodalInputs | Mapping[str, Any] | None,
    *,
    hasher: str = DEFAULT_HASHER,
    input_len: int | None = None,
    max_bytes: int | None = None,
    on_valid: Callable[[list[torch.Tensor]], None] | None = None,
) -> MultimodalInputs | None:
    """``mm_inputs`` as a [`MultimodalInputs`][]: built from a dict, passed through if built
    (``on_valid``: see [`from_dict`][mmsched.inputs.MultimodalInputs.from_dict]).

    Raises:
        InvalidMultimodalInput: the dict fails validation (the message names the field).
        UnknownNameError: no hasher of that name.
    """
    if mm_inputs is None or isinstance(mm_inputs, MultimodalInputs):
        return mm_inputs
    return MultimodalInputs.from_dict(
        mm_inputs, hasher=hasher, input_len=input_len, max_bytes=max_bytes, on_valid=on_valid
    )


# ----------------------------------------------------------------------------- validation


@dataclass
class _Parsed:
    # (modality, the feature as carried, the feature as given, offsets, model-specific data)
    items: list[tuple[Modality, torch.Tensor, Any, list[tuple[int, int]], dict[str, Any]]]
    content_hashes: list[int | None]  # each item's caller-supplied hash, if any
    special_token_ids: dict[str, int]
    mrope_positions: torch.Tensor | None
    mrope_position_delta: torch.Tensor | None


def _parse(raw: Any, *, input_len: int | None, max_bytes: int | None) -> _Parsed:
    if not isinstance(raw, Mapping):
        raise InvalidMultimodalInput("mm_inputs", f"expected a dict, got {type(raw).__name__}")
    for key in raw:
        if not isinstance(key, str):
            raise InvalidMultimodalInput("mm_inputs", f"field names must be strings, got {key!r}")
        _check_text("mm_inputs", key)
        if key not in _TOP_LEVEL_KEYS and not key.endswith("_id"):
            raise InvalidMultimodalInput(
                key,
                "unknown field; expected mm_items, mrope_positions, mrope_position_delta "
                "or special token ids named *_id",
            )
    if "mm_items" not in raw:
        raise InvalidMultimodalInput("mm_items", "missing")
    raw_items = raw["mm_items"]
    if not isinstance(raw_items, (list, tuple)):
        raise InvalidMultimodalInput("mm_items", f"expected a list, got {type(raw_items).__name__}")
    if not raw_items:
        raise InvalidMultimodalInput("mm_items", "empty; omit mm_inputs for a text-only request")

    special = {k: _token_id(k, v) for k, v in raw.items() if k.endswith("_id")}
    items = [_parse_item(f"mm_items[{i}]", it) for i, it in enumerate(raw_items)]
    content_hashes = [
        _content_hash(f"mm_items[{i}].content_hash", it["content_hash"])
        if "content_hash" in it
        else None
        for i, it in enumerate(raw_items)
    ]
    _check_spans(items, input_len)

    total = sum(feature.numel() * feature.element_size() for _, feature, _, _, _ in items)
    if max_bytes is not None and total > max_bytes:
        raise InvalidMultimodalInput(
            "mm_items", f"features total {total} bytes, over the limit of {max_bytes}"
        )

    mrope_positions = raw.get("mrope_positions")
    if mrope_positions is not None:
        mrope_positions = _tensor("mrope_positions", mrope_positions)
        if not _is_integer(mrope_positions.dtype) or mrope_positions.dim() != 2:
            raise InvalidMultimodalInput(
                "mrope_positions",
                f"expected an integer tensor of shape (3, L), got {mrope_positions.dtype} "
                f"{tuple(mrope_positions.shape)}",
            )
        if mrope_positions.shape[0] != 3:
            raise InvalidMultimodalInput(
                "mrope_positions", f"first dimension must be 3, got {mrope_positions.shape[0]}"
            )
        if input_len is not None and mrope_positions.shape[1] != input_len:
            raise InvalidMultimodalInput(
                "mrope_positions",
                f"covers {mrope_positions.shape[1]} positions, input has {input_len}",
            )
    delta = raw.get("mrope_position_delta")
    if delta is not None:
        if isinstance(delta, (int, np.integer)) and not isinstance(delta, bool):
            delta = torch.tensor(_int64("mrope_position_delta", delta))
        delta = _tensor("mrope_position_delta", delta)
        if not _is_integer(delta.dtype):
            raise InvalidMultimodalInput(
                "mrope_position_delta", f"must be integer, got {delta.dtype}"
            )
    return _Parsed(items, content_hashes, special, mrope_positions, delta)


def _content_hash(where: str, value: Any) -> int:
    """A caller-supplied content hash as the item's 64-bit hash (module docstring)."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer | bytes):
        raise InvalidMultimodalInput(
            where, f"expected an int or bytes, got {type(value).__name__}"
        )
    if isinstance(value, bytes):
        low, high = CONTENT_HASH_BYTES
        if not low <= len(value) <= high:
            raise InvalidMultimodalInput(
                where, f"expected {low} to {high} bytes, got {len(value)}"
            )
        return int.from_bytes(value[:8], "big")
    if not 0 <= int(value) < 2**64:
        raise InvalidMultimodalInput(where, f"must lie in [0, 2**64), got {value}")
    return int(value)


def _token_id(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidMultimodalInput(name, f"expected an int token id, got {type(value).__name__}")
    if value < 0:
        raise InvalidMultimodalInput(name, f"token id must be non-negative, got {value}")
    if value >= MAX_INPUT_LEN:
        raise InvalidMultimodalInput(name, f"token id must be below 2**31, got {value}")
    return int(value)


def validate_input_ids(input_ids: Any) -> list[int]:
    """A request's token ids as a list of Python ints, or [`InvalidMultimodalInput`][].

    Accepts a list or tuple of ints (numpy integers too, as tokenizers return them), or a
    1-D integer tensor or array; every id must lie in ``[0, 2**31)`` and there may be at most
    ``MAX_INPUT_LEN`` of them.
    """
    if isinstance(input_ids, torch.Tensor | np.ndarray):
        integer = (
            input_ids.dtype.kind in "iu"
            if isinstance(input_ids, np.ndarray)
            else _is_integer(input_ids.dtype)
        )
        if input_ids.ndim != 1 or not integer:
            raise InvalidMultimodalInput(
                "input_ids",
                f"expected a 1-D integer array, got {input_ids.dtype} "
                f"of shape {tuple(input_ids.shape)}",
            )
        input_ids = input_ids.tolist()
    if not isinstance(input_ids, list | tuple):
        raise InvalidMultimodalInput(
            "input_ids", f"expected a list of ints, got {type(input_ids).__name__}"
        )
    if len(input_ids) > MAX_INPUT_LEN:
        raise InvalidMultimodalInput("input_ids", f"{len(input_ids)} ids, over 2**31")
    # The common case at C speed; the loop below only runs to name what is wrong. The int64
    # array made for the range check is the frame the ids will travel in; ids too few for
    # a frame of their own travel as JSON numbers, and are checked without numpy.
    if set(map(type, input_ids)) <= {int}:
        if len(input_ids) < INT_FRAME_MIN and (
            not input_ids or (min(input_ids) >= 0 and max(input_ids) < MAX_INPUT_LEN)
        ):
            return list(input_ids)
        try:
            array = np.asarray(input_ids, dtype=np.int64)
        except OverflowError:
            array = None
        if array is not None and (
            not array.size or (int(array.min()) >= 0 and int(array.max()) < MAX_INPUT_LEN)
        ):
            return Int64List(list(input_ids), array.data)
    out = []
    for i, value in enumerate(input_ids):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise InvalidMultimodalInput(
                f"input_ids[{i}]", f"expected an int token id, got {type(value).__name__}"
            )
        if not 0 <= value < MAX_INPUT_LEN:
            raise InvalidMultimodalInput(
                f"input_ids[{i}]", f"token id must lie in [0, 2**31), got {value}"
            )
        out.append(int(value))
    return out


def _is_integer(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def _int64(name: str, value: int | np.integer[Any]) -> int:
    if not _INT64_MIN <= int(value) <= _INT64_MAX:
        raise InvalidMultimodalInput(name, f"{value} does not fit in int64")
    return int(value)


def _check_text(name: str, text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidMultimodalInput(name, f"{text!r} is not valid UTF-8 text") from None


def _tensor(name: str, value: Any) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        return _from_numpy(name, value)
    if not isinstance(value, torch.Tensor):
        raise InvalidMultimodalInput(name, f"expected a tensor, got {type(value).__name__}")
    if value.layout != torch.strided:
        raise InvalidMultimodalInput(
            name, f"{value.layout} tensors are not accepted; use a dense one"
        )
    if value.device.type == "meta":
        raise InvalidMultimodalInput(name, "a meta tensor holds no data")
    if value.is_quantized:
        raise InvalidMultimodalInput(name, "quantized tensors are not accepted")
    return value


def _from_numpy(name: str, value: np.ndarray[Any, Any]) -> torch.Tensor:
    if value.dtype.hasobject:
        raise InvalidMultimodalInput(name, "numpy array of Python objects is not a tensor")
    if not value.dtype.isnative:
        # Big-endian data from some file formats: one copy into native order, which torch
        # needs and every rank then reads. (Hashed before: see the module docstring.)
        value = value.astype(value.dtype.newbyteorder("="))
    if any(stride < 0 for stride in value.strides):
        value = np.ascontiguousarray(value)  # a reversed view (arr[::-1]): one copy
    try:
        return torch.from_numpy(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InvalidMultimodalInput(
            name, f"numpy {value.dtype} is not a tensor type: {exc}"
        ) from exc


def _feature(name: str, value: Any) -> torch.Tensor:
    """One tensor, or a (nested) list of tensors given as one feature (as SGLang accepts):
    nested lists flattened, then joined along the first dimension, so that its bytes are the
    list's bytes one after another. The parts must share a dtype and their other dimensions:
    mmsched carries one tensor per item. (SGLang also hashes ragged and mixed-dtype lists;
    the ``sglang-0.5.23`` hasher gives their hash, ``SglangHasher.hash_given``, but such a
    feature cannot be carried as one tensor: send one item per part.)"""
    if not isinstance(value, list | tuple):
        return _tensor(name, value)
    flat = list(_flatten(value, depth=0))
    if not flat:
        raise InvalidMultimodalInput(name, "an empty list of tensors")
    parts = [_tensor(f"{name}[{i}]", part) for i, part in enumerate(flat)]
    first = parts[0]
    for i, part in enumerate(parts[1:], start=1):
        if part.dtype != first.dtype or part.dim() == 0 or part.shape[1:] != first.shape[1:]:
            raise InvalidMultimodalInput(
                f"{name}[{i}]",
                f"{part.dtype} {tuple(part.shape)} cannot join {first.dtype} "
                f"{tuple(first.shape)}: list parts share a dtype and all but the first dimension",
            )
    if first.dim() == 0:
        raise InvalidMultimodalInput(f"{name}[0]", "a 0-d tensor cannot be joined")
    devices = {part.device for part in parts}
    if len(devices) > 1:
        raise InvalidMultimodalInput(
            name, f"list parts on several devices: {sorted(map(str, devices))}"
        )
    return parts[0].contiguous() if len(parts) == 1 else torch.cat(parts)


def _flatten(value: Any, *, depth: int) -> Iterator[Any]:
    if depth >= _MAX_NESTING:
        raise InvalidMultimodalInput("feature", f"lists nested over {_MAX_NESTING} levels")
    for part in value:
        if isinstance(part, list | tuple):
            yield from _flatten(part, depth=depth + 1)
        else:
            yield part


def _parse_item(
    where: str, raw: Any
) -> tuple[Modality, torch.Tensor, Any, list[tuple[int, int]], dict[str, Any]]:
    if not isinstance(raw, Mapping):
        raise InvalidMultimodalInput(where, f"expected a dict, got {type(raw).__name__}")
    if not raw:
        raise InvalidMultimodalInput(where, "empty item")
    for key in ("modality", "feature", "offsets"):
        if key not in raw:
            raise InvalidMultimodalInput(f"{where}.{key}", "missing")

    try:
        modality = Modality(raw["modality"])
    except ValueError:
        known = ", ".join(m.value for m in Modality)
        raise InvalidMultimodalInput(
            f"{where}.modality", f"unknown modality {raw['modality']!r}; known: {known}"
        ) from None

    feature = _feature(f"{where}.feature", raw["feature"])
    if feature.dtype not in ALLOWED_FEATURE_DTYPES:
        allowed = ", ".join(sorted(str(d).removeprefix("torch.") for d in ALLOWED_FEATURE_DTYPES))
        raise InvalidMultimodalInput(
            f"{where}.feature", f"dtype {feature.dtype} not allowed; allowed: {allowed}"
        )
    if feature.dim() == 0 or feature.numel() == 0:
        raise InvalidMultimodalInput(
            f"{where}.feature", f"empty tensor of shape {tuple(feature.shape)}"
        )

    offsets = _parse_offsets(f"{where}.offsets", raw["offsets"])
    extra = {k: v for k, v in raw.items() if k not in _ITEM_KEYS}
    for key in ("hash", "pad_value"):
        if key in extra:
            raise InvalidMultimodalInput(
                f"{where}.{key}", "computed by mmsched; the processor must not supply it"
            )
    for key, value in extra.items():
        _check_value(f"{where}.{key}", value, depth=0, seen=set())
    _check_model_specific(where, modality, feature, extra)
    return modality, feature, raw["feature"], offsets, extra


def _check_value(where: str, value: Any, *, depth: int, seen: set[int]) -> None:
    """Model-specific data must survive the codec as it is: no NaN turned into null, no text
    that is not UTF-8, no int wider than 64 bits, no cycle, no unbounded nesting."""
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidMultimodalInput(where, f"{value} is not a finite number; use a tensor")
    if isinstance(value, int) and not isinstance(value, bool):
        _int64(where, value)
    elif isinstance(value, str):
        _check_text(where, value)
    elif isinstance(value, torch.Tensor | np.ndarray):
        _tensor(where, value)
    elif isinstance(value, list | tuple | dict):
        if depth >= _MAX_NESTING or id(value) in seen:
            raise InvalidMultimodalInput(where, f"nested over {_MAX_NESTING} levels, or a cycle")
        seen.add(id(value))
        pairs = value.items() if isinstance(value, dict) else enumerate(value)
        for key, inner in pairs:
            if isinstance(value, dict):
                _check_value(f"{where}.<key>", key, depth=depth + 1, seen=seen)
            _check_value(f"{where}[{key!r}]", inner, depth=depth + 1, seen=seen)
        seen.discard(id(value))


def _parse_offsets(where: str, raw: Any) -> list[tuple[int, int]]:
    if isinstance(raw, torch.Tensor):
        raw = raw.tolist()
    if not isinstance(raw, (list, tuple)) or not raw:
        raise InvalidMultimodalInput(where, "expected a non-empty list of (start, end) pairs")
    spans = []
    for i, pair in enumerate(raw):
        ok = (
            isinstance(pair, (list, tuple))
            and len(pair) == 2
            and all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in pair)
        )
        if not ok:
            raise InvalidMultimodalInput(
                f"{where}[{i}]", f"expected (start, end) ints, got {pair!r}"
            )
        start, end = int(pair[0]), int(pair[1])
        if start < 0:
            raise InvalidMultimodalInput(f"{where}[{i}]", f"negative start {start}")
        if end < start:
            raise InvalidMultimodalInput(f"{where}[{i}]", f"end {end} before start {start}")
        if end >= MAX_INPUT_LEN:
            raise InvalidMultimodalInput(f"{where}[{i}]", f"end {end} past any input (2**31)")
        spans.append((start, end))
    return spans


def _check_spans(
    items: list[tuple[Any, Any, Any, list[tuple[int, int]], Any]], input_len: int | None
) -> None:
    # Spans of all items together must be disjoint: one token cannot stand for two media.
    spans = sorted((s, e, i) for i, (_, _, _, offsets, _) in enumerate(items) for s, e in offsets)
    for (s0, e0, i0), (s1, e1, i1) in itertools.pairwise(spans):
        if s1 <= e0:
            raise InvalidMultimodalInput(
                f"mm_items[{i1}].offsets",
                f"span ({s1}, {e1}) overlaps span ({s0}, {e0}) of mm_items[{i0}]",
            )
    if input_len is not None and spans and spans[-1][1] >= input_len:
        s, e, i = spans[-1]
        raise InvalidMultimodalInput(
            f"mm_items[{i}].offsets", f"span ({s}, {e}) past input of length {input_len}"
        )


def _check_model_specific(
    where: str, modality: Modality, feature: torch.Tensor, extra: dict[str, Any]
) -> None:
    for grid_modality, grid_key in _GRID_KEY_OF.items():
        if grid_key not in extra:
            continue
        name = f"{where}.{grid_key}"
        if modality is not grid_modality:
            raise InvalidMultimodalInput(name, f"not allowed on a {modality.value} item")
        grid = _tensor(name, extra[grid_key])
        if not _is_integer(grid.dtype) or grid.dim() != 2 or grid.shape[1] != 3:
            raise InvalidMultimodalInput(
                name,
                f"expected an integer tensor of shape (n, 3), got {grid.dtype} {tuple(grid.shape)}",
            )
        # Python ints, read once (a torch comparison costs more than the few rows of a
        # grid): a product in int64 can overflow into a plausible count.
        rows = grid.tolist()
        if any(v <= 0 for row in rows for v in row):
            raise InvalidMultimodalInput(name, "every t, h, w must be positive")
        # Qwen2-VL-style processors emit one feature row per patch: rows == sum(t*h*w).
        patches = sum(t * h * w for t, h, w in rows)
        if feature.dim() == 2 and feature.shape[0] != patches:
            raise InvalidMultimodalInput(
                name, f"grid has {patches} patches but feature has {feature.shape[0]} rows"
            )
        extra[grid_key] = grid

    if UINT8_PIXELS in extra:  # uint8 pixels that each rank patchifies (mmsched.pixels)
        if modality is not Modality.IMAGE:
            raise InvalidMultimodalInput(
                f"{where}.{UINT8_PIXELS}", f"not allowed on a {modality.value} item"
            )
        check_uint8_pixels(where, feature, extra.get("image_grid_thw"), extra[UINT8_PIXELS])

    if "second_per_grid_ts" in extra:
        name = f"{where}.second_per_grid_ts"
        if modality is not Modality.VIDEO:
            raise InvalidMultimodalInput(name, f"not allowed on a {modality.value} item")
        values = extra["second_per_grid_ts"]
        seq = values.tolist() if isinstance(values, torch.Tensor) else values
        if not isinstance(seq, (list, tuple)) or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and 0 < x < math.inf
            for x in seq
        ):
            raise InvalidMultimodalInput(name, "expected a list of positive numbers")
        videos = extra.get("video_grid_thw")
        if isinstance(videos, torch.Tensor) and len(seq) != videos.shape[0]:
            raise InvalidMultimodalInput(
                name, f"{len(seq)} values for {videos.shape[0]} videos in video_grid_thw"
            )

    if "audio_feature_lens" in extra:
        name = f"{where}.audio_feature_lens"
        if modality is not Modality.AUDIO:
            raise InvalidMultimodalInput(name, f"not allowed on a {modality.value} item")
        lens = _tensor(name, extra["audio_feature_lens"])
        if not _is_integer(lens.dtype) or lens.dim() != 1:
            raise InvalidMultimodalInput(name, "expected a 1-D integer tensor")
        if lens.shape[0] != feature.shape[0]:
            raise InvalidMultimodalInput(
                name, f"{lens.shape[0]} lengths for {feature.shape[0]} clips in feature"
            )
        if bool((lens < 0).any()) or (
            feature.dim() >= 2 and bool((lens > feature.shape[-1]).any())
        ):
            raise InvalidMultimodalInput(name, "lengths must lie in [0, feature frames]")
        extra["audio_feature_lens"] = lens
