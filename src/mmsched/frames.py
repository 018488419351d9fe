"""The vocabulary shared by the codec and the transports: a message is a list of frames.

The codec produces frames; a transport moves them. Neither needs the other's insides.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeAlias

Buffer: TypeAlias = bytes | bytearray | memoryview
"""One frame: any contiguous byte buffer."""

Frames: TypeAlias = list[Buffer]
"""One message as it travels."""


def frames_nbytes(frames: Sequence[Buffer]) -> int:
    """Total bytes of a message's frames."""
    return sum(memoryview(f).nbytes for f in frames)
