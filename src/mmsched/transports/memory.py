"""In-process transport for tests: every rank is a coroutine in one event loop.

Guarantees: ordered, lossless, unbounded. Frames are delivered by reference (no copy), so
receivers must not mutate them. Cannot cross processes: a pipeline over it runs its ranks as
tasks of the caller's event loop. Peers cannot die independently, so it never raises
``PeerLost``.
A pending ``recv()`` can be cancelled without losing a message.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Sequence
from pathlib import Path

from mmsched.transports.base import Buffer, Frames, GroupSpec, Transport

_END = object()


class _Hub:
    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        # Every receiver's queue exists from the start, so nothing sent before a receiver
        # joins is lost.
        self.queues: dict[int, asyncio.Queue[Frames | object]] = {
            r: asyncio.Queue() for r in range(1, world_size)
        }
        self.members = 0


_hubs: dict[str, _Hub] = {}
_hubs_lock = threading.Lock()
_names = itertools.count()


class MemoryTransport(Transport):
    name = "memory"
    cross_process = False

    def __init__(self, rank: int, world_size: int, hub: _Hub, address: str) -> None:
        super().__init__(rank, world_size)
        self._hub = hub
        self._address = address

    @classmethod
    def new_address(cls, workdir: Path) -> str:
        return f"memory-{next(_names)}"

    @classmethod
    async def open(cls, spec: GroupSpec) -> MemoryTransport:
        with _hubs_lock:
            hub = _hubs.setdefault(spec.address, _Hub(spec.world_size))
            hub.members += 1
        return cls(spec.rank, spec.world_size, hub, spec.address)

    @classmethod
    async def group(cls, world_size: int) -> list[MemoryTransport]:
        """Open every rank of a new group at once (the usual way in tests)."""
        address = cls.new_address(Path("."))
        return [await cls.open(GroupSpec(r, world_size, address)) for r in range(world_size)]

    async def send(self, frames: Sequence[Buffer]) -> None:
        self._check_send()
        message = list(frames)
        for rank in range(1, self.world_size):
            queue = self._hub.queues.get(rank)
            if queue is not None:  # a receiver that already closed drops its messages
                queue.put_nowait(message)
        self._count_sent(message)

    async def recv(self) -> Frames:
        self._check_recv()
        item = await self._hub.queues[self.rank].get()
        if item is _END:
            raise self._end_of_stream()
        assert isinstance(item, list)
        self._count_received(item)
        return item

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.is_sender:
            for queue in self._hub.queues.values():
                queue.put_nowait(_END)
        else:
            self._hub.queues.pop(self.rank, None)
        with _hubs_lock:
            self._hub.members -= 1
            if self._hub.members == 0:
                _hubs.pop(self._address, None)
