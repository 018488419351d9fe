"""The vocabulary shared by the codec, the transports and the payload stores.

A message is a list of frames: the codec produces them, a transport moves them, and neither
needs the other's insides. A tensor is a dtype, a shape and bytes: [`tensor_from_frame`][]
turns bytes back into a tensor (no copy), for the codec and for stores alike. Token ids
travel as one int64 frame, which an [`Int64List`][mmsched.frames.Int64List] keeps for as
long as the ids are unchanged.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, TypeAlias

import torch

from mmsched.errors import CodecError

Buffer: TypeAlias = bytes | bytearray | memoryview
"""One frame: any contiguous byte buffer."""

Frames: TypeAlias = list[Buffer]
"""One message as it travels."""


def frames_nbytes(frames: Sequence[Buffer]) -> int:
    """Total bytes of a message's frames."""
    return sum(memoryview(f).nbytes for f in frames)


DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    )
}
"""The tensor dtypes that travel as raw bytes, by name (``float32``, ``bfloat16``, ...)."""

_ITEMSIZE: dict[str, int] = {name: dtype.itemsize for name, dtype in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``float32``."""
    return str(dtype).removeprefix("torch.")


def checked_shape(shape: Any, itemsize: int, nbytes: int) -> list[int]:
    """``shape`` if it is a list of non-negative ints whose product (in Python ints, which
    cannot overflow) times ``itemsize`` is exactly ``nbytes``; else [`CodecError`][]."""
    if not isinstance(shape, list | tuple) or not all(
        type(x) is int and 0 <= x < 2**63 for x in shape
    ):
        raise CodecError(f"malformed shape {shape!r}: expected a list of non-negative ints")
    expected = math.prod(shape) * itemsize
    if nbytes != expected:
        raise CodecError(f"frame holds {nbytes} bytes, dtype and shape need {expected}")
    return list(shape)


def tensor_from_frame(buf: Buffer, dtype: str, shape: Any) -> torch.Tensor:
    """A tensor viewing ``buf`` (no copy): it shares the frame's memory and keeps it alive.

    Raises:
        CodecError: an unknown dtype, or a shape that does not match the frame's size.
    """
    torch_dtype = DTYPES.get(dtype)
    if torch_dtype is None:
        raise CodecError(f"unknown tensor dtype {dtype!r}")
    view = memoryview(buf)
    nbytes = view.nbytes
    dims = checked_shape(shape, _ITEMSIZE[dtype], nbytes)
    if nbytes == 0:
        return torch.empty(dims, dtype=torch_dtype)
    # Read as its dtype at once (the size is a whole number of elements: checked above),
    # and shaped by view(*dims): the cheapest of torch's ways, a few microseconds less
    # per tensor than a uint8 view cast and reshaped.
    flat = torch.frombuffer(buf, dtype=torch_dtype)  # a read-only one: the filter below
    return flat.view(*dims) if dims else flat.reshape(())


# A read-only frame (``bytes``) gives a tensor torch warns could write it; sharing the
# frame's memory is the point. Set once, for the process: warnings.catch_warnings around
# each call would swap the process's filters from several threads at once, which is not
# safe (and setting them up cost more than the tensor).
warnings.filterwarnings("ignore", "The given buffer is not writable", UserWarning)


INT_FRAME_MIN = 64
"""Lists of this many ints or more (token ids) travel as one int64 frame; shorter ones as
JSON numbers in the header, which cost less than a frame to make and read."""


class Int64List(list[int]):
    """Token ids with the int64 frame they travel in, made once.

    The tokenizer checks a request's ids into this frame, and a rank decodes ids from one:
    converting and checking every id again would cost a few ms for the 21,000 ids of a
    large image. Encoding an unchanged ``Int64List`` sends its frame as it is; any change to
    the list forgets the frame. (The entry rank forwards each request's frames as they came,
    so its ids are not encoded again there at all.)
    """

    __slots__ = ("frame",)

    def __init__(self, values: list[int], frame: Buffer) -> None:
        super().__init__(values)
        self.frame: Buffer | None = frame

    def __reduce__(self) -> tuple[Any, ...]:
        return (list, (list(self),))  # a copy or a pickle is a plain list


def _forgets_frame(name: str) -> Any:
    method = getattr(list, name)

    def changed(self: Int64List, *args: Any, **kwargs: Any) -> Any:
        self.frame = None
        return method(self, *args, **kwargs)

    return changed


for _name in (
    "__setitem__",
    "__delitem__",
    "__iadd__",
    "__imul__",
    "append",
    "extend",
    "insert",
    "pop",
    "remove",
    "clear",
    "sort",
    "reverse",
):
    setattr(Int64List, _name, _forgets_frame(_name))
