"""Typed messages to frames and back: a small orjson header, tensors as raw frames.

An encoded message is a list of frames:

```text
frames[0]   orjson header: {"v": 1, "n": <buffer count>, "msg": <tree>}
frames[1:]  raw buffers: tensor bytes, bytes values, pickled opaque values
```

In the tree a dataclass becomes ``{"$t": KIND, ...fields}``; a tensor becomes
``{"$tensor": i, "dtype": ..., "shape": [...]}`` where ``i`` indexes the buffers; a float
that JSON cannot hold becomes ``{"$float": "nan"}`` (or ``"inf"``, ``"-inf"``); a numpy
scalar (an index a processor took from its arrays, ``np.int64(3)``) becomes
``{"$npscalar": dtype, "hex": its bytes}`` and comes back the same numpy scalar; a list of
64 or more ints (token ids) becomes ``{"$ints": i}``, one int64 frame; a message forwarded
as it was received becomes ``{"$msg": [i, n]}``, its own ``n`` frames (header first) from
buffer ``i`` on, decoded as a message of its own. Tensor
bytes are never pickled and never copied on encode: the frame is a view of the tensor's
storage. On decode a tensor is a view of its frame (no copy either), so it shares the
frame's memory and must be treated as read-only when the frame is.

A value the tree cannot express (an object a model put in its model-specific data) is
pickled with cloudpickle into its own frame, as a last resort. Unpickling runs arbitrary
code, so a [`Decoder`][] refuses such frames unless built with ``allow_pickle=True``.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, cast

import cloudpickle
import numpy as np
import orjson
import torch

from mmsched.errors import CodecError, MmschedError, PickleRefused
from mmsched.frames import (
    DTYPES,
    INT_FRAME_MIN,
    Buffer,
    Frames,
    Int64List,
    checked_shape,
    frames_nbytes,
    tensor_from_frame,
)
from mmsched.hashing import tensor_bytes
from mmsched.inputs import MultimodalDataItem, MultimodalInputs
from mmsched.messages import MESSAGE_TYPES, Message
from mmsched.stores.base import PayloadRef, PayloadStore

CODEC_VERSION = 1

# Dataclasses the tree may hold, by tag: the messages plus the structs nested in them.
_STRUCTS: dict[str, type[Any]] = {cls.KIND: cls for cls in MESSAGE_TYPES}
_STRUCTS["mm_inputs"] = MultimodalInputs
_STRUCTS["mm_item"] = MultimodalDataItem
_TAG_OF: dict[type[Any], str] = {cls: tag for tag, cls in _STRUCTS.items()}


class Placer(Protocol):
    """Where ``encode`` places tensors that go by reference: a payload store, or one
    request's [placement][mmsched.stores.base.Placement] in it."""

    def wants(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` is large enough to go by reference."""
        ...

    def put(self, tensor: torch.Tensor) -> PayloadRef | None:
        """A reference to ``tensor``'s bytes, or ``None``: it travels inline."""
        ...


def encode(
    message: Message,
    store: Placer | None = None,
    *,
    allow_pickle: bool = True,
    forward: Mapping[int, Sequence[Buffer]] | None = None,
) -> Frames:
    """Encode a message into frames; tensor frames are views of the tensors' storage.

    With a ``store`` (or a placement in one), each tensor large enough for it is placed
    there and only its [`PayloadRef`][mmsched.stores.base.PayloadRef] travels
    (``{"$ref": [...]}``).

    ``forward`` maps messages held inside ``message`` (by ``id``) to the frames they were
    received in: each goes as those frames, unchanged (``{"$msg": [first, count]}``), and is
    neither walked nor encoded again. The entry rank passes requests on to its peers so.

    Raises:
        CodecError: the message holds a value the codec cannot carry (an int wider than 64
            bits, text that is not UTF-8, a cycle, a tensor without data, ...).
        PickleRefused: ``allow_pickle`` is off and a value would have to be pickled (a
            sender that knows its receivers refuse pickles finds out here, not they).
        ArenaFull: the store had no room for a tensor within its timeout.
    """
    if not isinstance(message, MESSAGE_TYPES):
        raise CodecError(f"not a message: {type(message).__name__}")
    buffers: list[Buffer] = []
    try:
        tree = _to_tree(message, buffers, store, forward)
        header = orjson.dumps({"v": CODEC_VERSION, "n": len(buffers), "msg": tree})
    except MmschedError:
        raise  # the store's own verdict (ArenaFull: backpressure), not a codec fault
    except Exception as exc:
        raise CodecError(f"cannot encode {message.KIND}: {type(exc).__name__}: {exc}") from exc
    if not allow_pickle and any(isinstance(b, _PickleFrame) for b in buffers):
        raise PickleRefused(
            f"{message.KIND}: a value is neither JSON nor a tensor and would be pickled, "
            "which the receivers refuse (allow_pickle is off)"
        )
    return [header, *buffers]


def encoded_size(frames: Sequence[Buffer]) -> int:
    """Total bytes of a list of frames."""
    return frames_nbytes(frames)


class Decoder:
    """Decodes frames into messages.

    Args:
        allow_pickle: unpickle opaque values (runs code chosen by the sender). Off by default:
            turn it on only where every sender is trusted.
        store: the payload store that resolves ``$ref`` tensors; without one, a message
            holding a reference does not decode.
    """

    def __init__(self, *, allow_pickle: bool = False, store: PayloadStore | None = None) -> None:
        self.allow_pickle = allow_pickle
        self.store = store

    def decode(self, frames: Sequence[Buffer]) -> Message:
        """The message ``frames`` encode.

        Frames come from another process and are not trusted: whatever they hold, the
        outcome is a message or a [`CodecError`][] (never another exception type).

        Raises:
            CodecError: what is wrong with the frames, named (a bad payload reference too).
            PickleRefused: a frame needs unpickling and ``allow_pickle`` is off.
        """
        try:
            return self._decode(frames)
        except CodecError:
            raise
        except Exception as exc:
            # Deep nesting (RecursionError), absurd shapes, a constructor's own checks:
            # one error type for the caller, who answers or drops that message alone.
            raise CodecError(f"malformed message: {type(exc).__name__}: {exc}") from exc

    def _decode(self, frames: Sequence[Buffer]) -> Message:
        if not frames:
            raise CodecError("no frames")
        try:
            header = orjson.loads(
                bytes(frames[0]) if isinstance(frames[0], memoryview) else frames[0]
            )
        except orjson.JSONDecodeError as exc:
            raise CodecError(f"header is not JSON: {exc}") from exc
        if not isinstance(header, dict) or header.get("v") != CODEC_VERSION:
            raise CodecError(f"unsupported header (codec version {CODEC_VERSION} expected)")
        if header.get("n") != len(frames) - 1:
            raise CodecError(f"header announces {header.get('n')} buffers, got {len(frames) - 1}")
        message = self._from_tree(header.get("msg"), frames[1:])
        if not isinstance(message, MESSAGE_TYPES):
            raise CodecError(f"top-level value is not a message: {type(message).__name__}")
        return cast(Message, message)

    @staticmethod
    def peek_rid(frames: Sequence[Buffer]) -> str | None:
        """The request id in frames that fail to decode, if the header still names one.

        Lets a receiver answer a request it cannot decode instead of dropping it.
        """
        try:
            tree = orjson.loads(bytes(frames[0]))["msg"]
            rid = tree.get("rid") if isinstance(tree, dict) else None
        except Exception:  # foreign bytes: anything may fail, and the answer is "no id"
            return None
        return rid if isinstance(rid, str) else None

    def _from_tree(self, node: Any, buffers: Sequence[Buffer]) -> Any:
        # orjson makes exact lists and dicts only; scalars are returned without a call.
        kind = type(node)
        if kind is list:
            return [x if type(x) not in _NESTED else self._from_tree(x, buffers) for x in node]
        if kind is not dict:
            return node
        if "$t" in node:
            cls = _STRUCTS.get(node["$t"])
            if cls is None:
                raise CodecError(f"unknown message kind {node['$t']!r}")
            kwargs = {
                k: v if type(v) not in _NESTED else self._from_tree(v, buffers)
                for k, v in node.items()
                if k != "$t"
            }
            try:
                return cls(**kwargs)
            except (TypeError, ValueError) as exc:
                raise CodecError(f"bad fields for {node['$t']}: {exc}") from exc
        if not node.keys() & _MARKERS:  # a plain dict (the common case): one set operation
            return {
                k: v if type(v) not in _NESTED else self._from_tree(v, buffers)
                for k, v in node.items()
            }
        return self._marked(node, buffers)

    def _marked(self, node: dict[str, Any], buffers: Sequence[Buffer]) -> Any:
        if "$tensor" in node:
            buf = _buffer(buffers, node["$tensor"])
            return tensor_from_frame(buf, str(node.get("dtype")), node.get("shape"))
        if "$ref" in node:
            ref = PayloadRef.from_tree(node["$ref"])
            if self.store is None or ref.store != self.store.name:
                raise CodecError(f"a {ref.store!r} payload reference, and no such store here")
            return self.store.resolve(ref)
        if "$msg" in node:
            # A message forwarded as the frames it came in (see encode's ``forward``): each
            # nesting takes at least its own header frame, so the depth is bounded.
            span = node["$msg"]
            if not (
                type(span) is list
                and len(span) == 2
                and all(type(x) is int for x in span)
                and span[0] >= 0
                and 1 <= span[1] <= len(buffers) - span[0]
            ):
                raise CodecError(f"bad forwarded message span {str(span)[:100]}")
            return self._decode(list(buffers[span[0] : span[0] + span[1]]))
        if "$ndarray" in node:
            buf = _buffer(buffers, node["$ndarray"])
            dtype = np.dtype(node["dtype"])
            if dtype.hasobject:
                raise CodecError("an array of Python objects cannot come as raw bytes")
            shape = checked_shape(node.get("shape"), dtype.itemsize, memoryview(buf).nbytes)
            return np.frombuffer(buf, dtype=dtype).reshape(shape)
        if "$npscalar" in node:
            dtype = np.dtype(str(node["$npscalar"]))
            raw = node.get("hex")
            data = bytes.fromhex(raw) if isinstance(raw, str) else b""
            if dtype.kind not in _NUMPY_SCALAR_KINDS or len(data) != dtype.itemsize:
                raise CodecError(f"bad numpy scalar {str(node)[:100]}")
            return np.frombuffer(data, dtype=dtype)[0]
        if "$ints" in node:
            buf = _buffer(buffers, node["$ints"])
            if memoryview(buf).nbytes % 8:
                raise CodecError("an int list frame is not a whole number of int64 values")
            return Int64List(np.frombuffer(buf, dtype=np.int64).tolist(), buf)
        if "$float" in node:
            if node["$float"] not in _NON_FINITE:
                raise CodecError(f"bad non-finite float {node['$float']!r}")
            return float(node["$float"])
        if "$bytes" in node:
            return bytes(_buffer(buffers, node["$bytes"]))
        if "$tuple" in node:
            return tuple(self._from_tree(x, buffers) for x in node["$tuple"])
        if "$dict" in node:
            return {
                self._from_tree(k, buffers): self._from_tree(v, buffers) for k, v in node["$dict"]
            }
        if "$pickle" in node:
            if not self.allow_pickle:
                raise PickleRefused(
                    "message holds a pickled value and unpickling is off; build the Decoder "
                    "with allow_pickle=True (config: allow_pickle) only if every sender is trusted"
                )
            return cloudpickle.loads(_buffer(buffers, node["$pickle"]))
        return {k: self._from_tree(v, buffers) for k, v in node.items()}


def decode(frames: Sequence[Buffer], *, allow_pickle: bool = False) -> Message:
    """Decode frames with a one-off [`Decoder`][]."""
    return Decoder(allow_pickle=allow_pickle).decode(frames)


# ----------------------------------------------------------------------------- internals


def _to_tree(value: Any, buffers: list[Buffer], store: Placer | None, forward: _Forward) -> Any:
    # Exact builtins and the messages' own classes first, by type (one dict lookup each):
    # they are nearly every value of a request. Anything else takes the general path.
    kind = type(value)
    if kind in _SCALARS:
        if kind is float and not math.isfinite(value):
            return {"$float": str(value)}  # JSON has no NaN: it would arrive as null
        return value
    tag = _TAG_OF.get(kind)
    if tag is not None:
        if forward is not None:
            frames = forward.get(id(value))
            if frames is not None:  # sent on as it came: no walk, no copy
                buffers.extend(frames)
                return {"$msg": [len(buffers) - len(frames), len(frames)]}
        tree: dict[str, Any] = {"$t": tag}
        for name in _FIELDS[kind]:
            field_value = getattr(value, name)
            tree[name] = (
                field_value
                if type(field_value) in _PLAIN
                else _to_tree(field_value, buffers, store, forward)
            )
        return tree
    if kind is dict and all(type(k) is str and k[:1] != "$" for k in value):
        return {
            k: v if type(v) in _PLAIN else _to_tree(v, buffers, store, forward)
            for k, v in value.items()
        }
    if kind is list and len(value) < _INT_RUN_MIN:
        return [x if type(x) in _PLAIN else _to_tree(x, buffers, store, forward) for x in value]
    return _to_tree_general(value, buffers, store, forward)


def _to_tree_general(
    value: Any, buffers: list[Buffer], store: Placer | None, forward: _Forward
) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        if isinstance(value, enum.Enum):
            return value.value
        if isinstance(value, float) and not math.isfinite(value):
            return {"$float": str(value)}  # JSON has no NaN: it would arrive as null
        return value
    if isinstance(value, np.generic) and value.dtype.kind in _NUMPY_SCALAR_KINDS:
        # Exact and small, so that a processor's numpy ints reach every rank as they left
        # (a pickle would be refused there, and an int would change their type).
        return {"$npscalar": value.dtype.str, "hex": value.tobytes().hex()}
    if isinstance(value, torch.Tensor):
        dtype = _DTYPE_NAMES.get(value.dtype)
        if dtype is None:
            return _pickled(value, buffers)
        if store is not None and store.wants(value):
            ref = store.put(value)
            if ref is not None:
                return {"$ref": ref.to_tree()}
        buffers.append(tensor_bytes(value))
        return {"$tensor": len(buffers) - 1, "dtype": dtype, "shape": list(value.shape)}
    if isinstance(value, np.ndarray) and value.dtype != object:
        buffers.append(np.ascontiguousarray(value).data.cast("B"))
        return {"$ndarray": len(buffers) - 1, "dtype": value.dtype.str, "shape": list(value.shape)}
    if isinstance(value, (bytes, bytearray)):
        buffers.append(value)
        return {"$bytes": len(buffers) - 1}
    if isinstance(value, list):
        frame = _int64_frame(value) if len(value) >= _INT_RUN_MIN else None
        if frame is not None:
            # Token ids: one raw int64 frame instead of thousands of JSON numbers, so headers
            # stay small and a shared-memory transport can carry the ids by reference.
            buffers.append(frame)
            return {"$ints": len(buffers) - 1}
        return [_to_tree(x, buffers, store, forward) for x in value]
    if isinstance(value, tuple):
        return {"$tuple": [_to_tree(x, buffers, store, forward) for x in value]}
    if isinstance(value, dict):
        # Keys starting with "$" are reserved for the markers above: such a dict goes as pairs.
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: _to_tree(v, buffers, store, forward) for k, v in value.items()}
        return {
            "$dict": [
                [_to_tree(k, buffers, store, forward), _to_tree(v, buffers, store, forward)]
                for k, v in value.items()
            ]
        }
    return _pickled(value, buffers)


# Values that are their own tree (``float`` is not: NaN and infinities are not JSON).
_PLAIN = frozenset({str, int, bool, type(None)})
_SCALARS = frozenset({str, int, bool, float, type(None)})
# What a decoded tree holds that needs a walk (anything else is returned as it is).
_NESTED = frozenset({list, dict})
_MARKERS = frozenset(
    {
        "$tensor",
        "$ref",
        "$msg",
        "$ndarray",
        "$npscalar",
        "$ints",
        "$float",
        "$bytes",
        "$tuple",
        "$dict",
        "$pickle",
    }
)
_FIELDS: dict[type[Any], tuple[str, ...]] = {
    cls: tuple(f.name for f in dataclasses.fields(cls)) for cls in _TAG_OF
}
_DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}
_Forward = Mapping[int, Sequence[Buffer]] | None

_INT_RUN_MIN = INT_FRAME_MIN
_NUMPY_SCALAR_KINDS = frozenset("biufc")  # bool, ints, floats, complex: fixed-size bytes
_NON_FINITE = frozenset({"nan", "inf", "-inf"})


def _int64_frame(values: list[Any]) -> Buffer | None:
    """``values`` as one int64 frame, or None if one is not an int or does not fit."""
    if isinstance(values, Int64List) and values.frame is not None:
        return values.frame  # forwarded as it came: nothing to convert or check again
    if not set(map(type, values)) <= {int}:  # builtins at C speed: bools and floats excluded
        return None
    try:
        return np.asarray(values, dtype=np.int64).data
    except OverflowError:
        return None


class _PickleFrame(bytes):
    """A frame holding a pickled value (so that ``encode`` can tell it from the others)."""


def _pickled(value: Any, buffers: list[Buffer]) -> dict[str, int]:
    buffers.append(_PickleFrame(cloudpickle.dumps(value)))
    return {"$pickle": len(buffers) - 1}


def _buffer(buffers: Sequence[Buffer], index: Any) -> Buffer:
    if not isinstance(index, int) or not 0 <= index < len(buffers):
        raise CodecError(f"buffer index {index!r} out of range ({len(buffers)} buffers)")
    return buffers[index]
