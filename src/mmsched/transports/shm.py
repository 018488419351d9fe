"""Shared memory for payloads, ZMQ pub-sub for control: each payload is written once, never sent.

The sender (rank 0) owns a [`shm` payload store][mmsched.stores.shm] of its own, an arena
every receiver maps. A message's frames of at least ``inline_max_bytes`` are copied into the
arena once; only a small header (their references, and the small frames) crosses the
control channel, a [`zmq` transport][mmsched.transports.zmq_pubsub]. Receivers get
``memoryview``s of shared memory. (Tensors a request already carries by reference, under the
``shm`` payload store, are small headers by then: this transport copies nothing of them.)

Guarantees and limits:

- one host only (shared memory); ordered and lossless, as the control channel;
- the sender blocks only when the arena is full, until every receiver has released old
  payloads (their views were collected), up to ``timeout_s``: then
  [`ArenaFull`][mmsched.errors.ArenaFull] names the reader watermarks. A dead receiver
  therefore stalls the sender for at most ``timeout_s``, never forever;
- a payload larger than the whole arena travels inline over the control channel;
- the segment's name is unlinked as soon as every receiver has mapped it: a crash of any
  process leaves nothing in /dev/shm.

Options ([`TransportOptions`][mmsched.transports.base.TransportOptions]): ``arena_bytes``
(default 256 MiB), ``inline_max_bytes`` (default 64 KiB), and ``token``, which the control
channel's receivers present as over ``zmq``.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson
import torch

from mmsched.errors import TransportError
from mmsched.stores.base import PayloadRef, StoreOptions
from mmsched.stores.shm import ShmStore
from mmsched.transports.base import Buffer, Frames, GroupSpec, Transport
from mmsched.transports.zmq_pubsub import ZmqTransport

_SEPARATOR = "#"
_PACKED_MAGIC = b"MMSHM2"


class ShmTransport(Transport):
    name = "shm"

    def __init__(self, control: ZmqTransport, store: ShmStore, inline_max_bytes: int) -> None:
        super().__init__(control.rank, control.world_size)
        self._control = control
        self._store = store
        self._inline_max = inline_max_bytes
        # Copies into the arena, and waits for room, run here: off the loop, in send order.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmsched-shm")

    @classmethod
    def new_address(cls, workdir: Path) -> str:
        return f"{ZmqTransport.new_address(workdir)}{_SEPARATOR}{ShmStore.new_segment_name()}"

    @classmethod
    def remove_leftovers(cls, address: str) -> None:
        # The sender unlinks the segment once every receiver mapped it; a sender killed
        # before then leaves the name behind.
        ShmStore.remove_leftovers(address.rpartition(_SEPARATOR)[2])

    @classmethod
    async def open(cls, spec: GroupSpec) -> ShmTransport:
        control_address, _, segment = spec.address.rpartition(_SEPARATOR)
        settings = spec.settings
        inline_max = settings.inline_max_bytes
        options = StoreOptions(
            capacity_bytes=settings.arena_bytes,
            consumers=spec.world_size - 1,
            timeout_s=spec.timeout_s,
            min_bytes=inline_max,
        )
        # The same options: the control channel is where the run's token is presented.
        control_spec = dataclasses.replace(spec, address=control_address)
        if spec.rank == 0:
            ShmStore.sweep_stale()
            store = await asyncio.to_thread(ShmStore.create, options, name=segment)
            try:
                # Returns once every receiver subscribed, which each does after mapping.
                control = await ZmqTransport.open(control_spec)
            except BaseException:
                store.close()
                raise
            store.consumers_attached()
            return cls(control, store, inline_max)
        store = await asyncio.to_thread(ShmStore.attach, segment, spec.rank - 1, options)
        control = await ZmqTransport.open(control_spec)
        return cls(control, store, inline_max)

    async def send(self, frames: Sequence[Buffer]) -> None:
        self._check_send()
        loop = asyncio.get_running_loop()
        packed = await loop.run_in_executor(self._executor, self._pack, list(frames))
        await self._control.send(packed)
        self._count_sent(frames)

    async def recv(self) -> Frames:
        self._check_recv()
        frames = self._unpack(await self._control.recv())
        self._count_received(frames)
        return frames

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._control.aclose()
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self.is_sender:
            self._store.close()
        # A receiver keeps its mapping: tensors decoded from it may outlive the transport.

    def _pack(self, frames: list[Buffer]) -> Frames:
        """Frames for the control channel: large ones by reference, the rest inline."""
        descriptors: list[object] = []
        inline: Frames = []
        for frame in frames:
            ref = None
            if memoryview(frame).nbytes >= self._inline_max:
                ref = self._store.put(torch.frombuffer(_flat_bytes(frame), dtype=torch.uint8))
            if ref is None:
                descriptors.append(len(inline))
                inline.append(frame)
            else:
                descriptors.append(ref.to_tree())
        return [_PACKED_MAGIC + orjson.dumps(descriptors), *inline]

    def _unpack(self, frames: Sequence[Buffer]) -> Frames:
        """The original frames: references turned into views of the mapped arena."""
        if not frames or bytes(memoryview(frames[0])[: len(_PACKED_MAGIC)]) != _PACKED_MAGIC:
            raise TransportError("a message without the shm transport's header")
        try:
            descriptors = orjson.loads(bytes(frames[0])[len(_PACKED_MAGIC) :])
        except orjson.JSONDecodeError as exc:
            raise TransportError(f"packed header is not JSON: {exc}") from exc
        if not isinstance(descriptors, list):
            raise TransportError("packed header is not a list of descriptors")
        out: Frames = []
        for d in descriptors:
            if type(d) is int and 0 <= d < len(frames) - 1:
                out.append(frames[1 + d])
                continue
            try:
                tensor = self._store.resolve(PayloadRef.from_tree(d))
            except Exception as exc:
                raise TransportError(f"bad frame descriptor {str(d)[:200]}: {exc}") from exc
            out.append(tensor.numpy().data)
        return out


def _flat_bytes(frame: Buffer) -> memoryview:
    # A flat byte view for torch.frombuffer; only read (the store copies it into the arena).
    view = memoryview(frame)
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view
