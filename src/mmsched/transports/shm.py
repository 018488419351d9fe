"""Shared memory for payloads, ZMQ pub-sub for control: each payload is written once, never sent.

The sender (rank 0) owns an arena ([`mmsched.shm`][]) that every receiver maps. A message's
frames of at least ``inline_max_bytes`` are copied into the arena once; frames that already
live in an arena this process has open (a tensor the tokenizer wrote into its own arena, say)
go by reference with no copy at all. Only a small header (the refs and the small frames)
crosses the control channel, a [`zmq` transport][mmsched.transports.zmq_pubsub].
Receivers get ``memoryview``s of shared memory.

Guarantees and limits:

- one host only (shared memory); ordered and lossless, as the control channel;
- the sender blocks only when the arena is full, until every receiver has released old
  payloads (their views were collected), up to ``timeout_s``: then
  [`ArenaFull`][mmsched.shm.ArenaFull] names the reader watermarks. A dead receiver therefore
  stalls the sender for at most ``timeout_s``, never forever;
- a payload larger than the whole arena travels inline over the control channel;
- the segment's name is unlinked as soon as every receiver has mapped it: a crash of any
  process leaves nothing in /dev/shm.

Options (``GroupSpec.options``): ``arena_bytes`` (default 256 MiB), ``inline_max_bytes``
(default 64 KiB).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mmsched import shm
from mmsched.transports.base import Buffer, Frames, GroupSpec, Transport
from mmsched.transports.zmq_pubsub import ZmqTransport

DEFAULT_ARENA_BYTES = 256 << 20
DEFAULT_INLINE_MAX_BYTES = 64 << 10
_SEPARATOR = "#"


class ShmTransport(Transport):
    name = "shm"

    def __init__(
        self,
        control: ZmqTransport,
        writer: shm.ArenaWriter | None,
        reader: shm.ArenaReader | None,
        inline_max_bytes: int,
    ) -> None:
        super().__init__(control.rank, control.world_size)
        self._control = control
        self._writer = writer
        self._reader = reader
        self._inline_max = inline_max_bytes
        # Copies into the arena, and waits for room, run here: off the loop, in send order.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmsched-shm")

    @classmethod
    def new_address(cls, workdir: Path) -> str:
        return f"{ZmqTransport.new_address(workdir)}{_SEPARATOR}{shm.new_segment_name()}"

    @classmethod
    def remove_leftovers(cls, address: str) -> None:
        # The sender unlinks the segment once every receiver mapped it; a sender killed
        # before then leaves the name behind.
        shm.unlink_segment(address.rpartition(_SEPARATOR)[2])

    @classmethod
    async def open(cls, spec: GroupSpec) -> ShmTransport:
        control_address, _, segment = spec.address.rpartition(_SEPARATOR)
        inline_max = int(spec.options.get("inline_max_bytes", DEFAULT_INLINE_MAX_BYTES))
        control_spec = GroupSpec(spec.rank, spec.world_size, control_address, spec.timeout_s)
        if spec.rank == 0:
            shm.sweep_stale_segments()
            writer = await asyncio.to_thread(
                shm.ArenaWriter,
                int(spec.options.get("arena_bytes", DEFAULT_ARENA_BYTES)),
                spec.world_size - 1,
                name=segment,
                timeout_s=spec.timeout_s,
            )
            try:
                # Returns once every receiver subscribed, which each does after mapping.
                control = await ZmqTransport.open(control_spec)
            finally:
                writer.unlink()
            shm.register_writer(writer)
            return cls(control, writer, None, inline_max)
        reader = await asyncio.to_thread(
            shm.open_reader, segment, spec.rank - 1, wait_s=spec.timeout_s
        )
        control = await ZmqTransport.open(control_spec)
        return cls(control, None, reader, inline_max)

    async def send(self, frames: Sequence[Buffer]) -> None:
        self._check_send()
        loop = asyncio.get_running_loop()
        packed = await loop.run_in_executor(
            self._executor, shm.pack, list(frames), self._writer, self._inline_max
        )
        await self._control.send(packed)
        self._count_sent(frames)

    async def recv(self) -> Frames:
        self._check_recv()
        frames = shm.unpack(await self._control.recv())
        self._count_received(frames)
        return frames

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._control.aclose()
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._writer is not None:
            shm.unregister_writer(self._writer)
            self._writer.close()
        # A receiver keeps its mapping: tensors decoded from it may outlive the transport.
