"""Which device each rank's features land on, and moving them there.

``Config.device`` names it: ``cpu`` (features stay host tensors, as they resolve), ``cuda``
(rank ``r`` gets ``cuda:{r % device_count}``), ``cuda:N`` (every rank on GPU ``N``) or a
comma-separated list with one device per rank.

On a GPU, a rank's [`DevicePlacer`][mmsched.devices.DevicePlacer] copies each feature that is
not on its device yet on a side stream of its own, and waits for that copy's event (off the
event loop) before the request goes on: the server's callback gets tensors whose copy is
complete, usable on any stream. The host tensor is dropped as soon as its copy is done, so
a payload store gets its room back then, not when the callback ends.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable

import torch

from mmsched.errors import ConfigError
from mmsched.inputs import MultimodalInputs

_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


def _settings(setting: str) -> list[str]:
    return [part.strip() for part in setting.split(",")]


def check_device_setting(setting: str, tp_size: int) -> None:
    """Check ``setting``'s form (not whether the devices exist: that is a rank's start).

    Raises:
        ConfigError: not ``cpu``, ``cuda``, ``cuda:N`` or a list of one per rank.
    """
    parts = _settings(setting)
    if not all(_DEVICE.fullmatch(part) for part in parts):
        raise ConfigError(
            f"device must be cpu, cuda, cuda:N or one device per rank separated by commas, "
            f"got {setting!r}"
        )
    if len(parts) > 1 and len(parts) != tp_size:
        raise ConfigError(f"device lists {len(parts)} devices for {tp_size} ranks: {setting!r}")


def rank_device(setting: str, rank: int) -> torch.device:
    """The device rank ``rank`` uses under ``setting``.

    Raises:
        ConfigError: the setting names a GPU and this process sees none, or not that one.
    """
    parts = _settings(setting)
    name = parts[rank] if len(parts) > 1 else parts[0]
    if name == "cpu":
        return torch.device("cpu")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ConfigError(f"device={setting!r} asks for a GPU and this process sees none")
    index = rank % count if name == "cuda" else int(name.split(":")[1])
    if index >= count:
        raise ConfigError(f"device {name} does not exist: this process sees {count} GPU(s)")
    return torch.device("cuda", index)


class DevicePlacer:
    """Moves one rank's features onto its device (module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._stream: torch.cuda.Stream | None = None
        if device.type == "cuda":
            self._stream = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]

    async def place(
        self,
        inputs: MultimodalInputs,
        borrowed: Callable[[torch.Tensor], bool] | None = None,
    ) -> MultimodalInputs:
        """``inputs`` with every feature on this rank's device, copies complete.

        A feature ``borrowed`` says is a store's memory (a GPU pool's slice) is copied even
        when it is on this device already, and the store gets it back once copied.

        Raises:
            RuntimeError: the copy failed (out of device memory, say); torch's own error.
        """
        moves = [
            item
            for item in inputs.mm_items
            if item.feature.device != self.device or (borrowed and borrowed(item.feature))
        ]
        if not moves:
            return inputs
        if self._stream is None:  # to the host: a plain, synchronous copy
            for item in moves:
                item.feature = item.feature.to(self.device)
            return inputs
        with torch.cuda.stream(self._stream):
            copies = [
                item.feature.clone()
                if item.feature.device == self.device
                else item.feature.to(self.device, non_blocking=True)
                for item in moves
            ]
        done = torch.cuda.Event()  # type: ignore[no-untyped-call]
        done.record(self._stream)
        # The sources must outlive their copies: they are dropped only after the event.
        await asyncio.to_thread(done.synchronize)
        consumer = torch.cuda.current_stream(self.device)
        for item, copy in zip(moves, copies, strict=True):
            # Allocated on the side stream, used on the callback's: the allocator must not
            # hand the block out again before that stream's work on it is done.
            copy.record_stream(consumer)
            item.feature = copy
        return inputs
