"""The ``cuda-ipc`` payload store: features that are already on a GPU stay on GPUs.

For a processor that runs on a GPU, sending its output through host memory costs two bus
crossings. Here the tokenizer allocates one pool on rank 0's device at start
(``cuda_pool_mb``) and exports its CUDA IPC handle once; every rank opens the handle once
when it attaches and keeps it. Per feature the tokenizer copies the tensor device-to-device
into a slice of the pool and waits for that copy, and only the slice's offset, length,
dtype and shape travel. A rank copies the slice to its own device (device-to-device, on a
side stream, [`mmsched.devices`][]) and lets the slice go once that copy is done; the
server's callback never sees pool memory, so nothing it keeps can pin the pool.

Which slices are free is decided as in the ``shm`` arena ([`mmsched.stores.arena`][]): a
ring of offsets whose bookkeeping (one watermark per rank) lives in a small shared-memory
segment, so a slice is reused only after every rank has its copy. A full pool waits for
room up to ``timeout_s`` (or not at all under ``backpressure="reject"``), then raises
[`ArenaFull`][mmsched.errors.ArenaFull], an [`Overloaded`][mmsched.errors.Overloaded].

Trust: an IPC handle gives any process that holds it read and write access to the whole
pool. The handle reaches the ranks through their spawn pipe only, like the run's token.
One host only; every rank needs a GPU (``device``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mmsched import cudart
from mmsched.errors import ArenaFull, CodecError, ConfigError, TransportError
from mmsched.frames import DTYPES, checked_shape, dtype_name
from mmsched.stores import arena
from mmsched.stores.base import PayloadRef, PayloadStore, Placement, StoreOptions

_HEADER = arena.HEADER_BYTES  # ring offsets count from the end of the bookkeeping header


class CudaIpcStore(PayloadStore):
    name = "cuda-ipc"
    shares_across_processes = True
    device = "cuda"
    capacity_setting = "cuda_pool_mb"

    def __init__(
        self,
        options: StoreOptions,
        pool: cudart.DeviceBuffer,
        address: str,
        writer: arena.ArenaWriter | None,
        reader: arena.ArenaReader | None,
    ) -> None:
        super().__init__(options)
        self._pool = pool.tensor()
        self._address = address
        self._writer = writer
        self._reader = reader

    @classmethod
    def create(cls, options: StoreOptions) -> CudaIpcStore:
        device = torch.device(options.device)
        if device.type != "cuda":
            raise ConfigError(f"the cuda-ipc store keeps its pool on a GPU, not on {device}")
        pool = cudart.allocate(options.capacity_bytes, device)
        writer = arena.ArenaWriter(
            options.capacity_bytes,
            options.consumers,
            timeout_s=0.0 if options.reject_when_full else options.timeout_s,
            backed=False,
        )
        handle = cudart.export_handle(pool)
        address = f"{writer.name}/{device.index}/{options.capacity_bytes}/{handle.hex()}"
        return cls(options, pool, address, writer, None)

    @classmethod
    def attach(cls, address: str | None, consumer: int, options: StoreOptions) -> CudaIpcStore:
        try:
            ring, index, nbytes, handle = (address or "").split("/")
            device, size, raw = torch.device("cuda", int(index)), int(nbytes), bytes.fromhex(handle)
        except ValueError:
            raise TransportError(f"not a cuda-ipc pool address: {address!r}") from None
        reader = arena.ArenaReader(ring, consumer, wait_s=options.timeout_s)
        try:
            pool = cudart.open_handle(raw, size, device)  # once per rank, kept
        except BaseException:
            reader.close()
            raise
        return cls(options, pool, address or "", None, reader)

    @property
    def address(self) -> str | None:
        return self._address

    def consumers_attached(self) -> None:
        if self._writer is not None:
            self._writer.unlink()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._reader is not None:
            self._reader.close()
        # The pool (or this rank's mapping of it) goes with the last tensor on it.
        self._pool = torch.empty(0, dtype=torch.uint8)

    @classmethod
    def remove_leftovers(cls, address: str | None) -> None:
        if address is not None:
            arena.unlink_segment(address.split("/", 1)[0])

    def put(self, tensor: torch.Tensor) -> PayloadRef | None:
        return self._place(tensor, None, wait=True)

    def placement(self, *, wait: bool = True) -> Placement:
        if self._writer is None:  # a consumer places nothing of its own
            return super().placement(wait=wait)
        return _CudaIpcPlacement(self, wait=wait)

    def _place(
        self, tensor: torch.Tensor, placed: list[Any] | None, *, wait: bool
    ) -> PayloadRef | None:
        if dtype_name(tensor.dtype) not in DTYPES:
            return None
        nbytes = tensor.numel() * tensor.element_size()
        if self._writer is None:
            return self._forward(tensor, nbytes)
        if nbytes > self._writer.capacity:
            return None  # can never fit: it travels inline
        try:
            # Holding slices of this request already, it must not wait for more: requests
            # doing so could wait on each other forever. Without room now, it goes inline.
            ref, _ = self._writer.reserve(nbytes, hold=placed is not None, wait=wait and not placed)
        except ArenaFull:
            if not placed:
                raise
            return None
        if placed is not None:
            placed.append(ref.seq)
        start = ref.offset - _HEADER
        source = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        with torch.cuda.device(self._pool.device):
            self._pool[start : start + nbytes].copy_(source)
            # The ranks read the slice as soon as they hold the reference: the copy must be
            # complete on the device, not only queued.
            torch.cuda.current_stream().synchronize()
        return self._ref(tensor, ref)

    def settle(self, placed: Sequence[Any], *, sent: bool = True) -> None:
        if self._writer is not None:
            for seq in placed:
                (self._writer.release if sent else self._writer.abandon)(seq)

    def _forward(self, tensor: torch.Tensor, nbytes: int) -> PayloadRef | None:
        # The entry rank passes on a slice it resolved and still holds, as the same ref.
        if self._reader is None or tensor.device != self._pool.device or nbytes == 0:
            return None
        offset = tensor.data_ptr() - self._pool.data_ptr() + _HEADER
        ref = self._reader.held(offset, nbytes)
        return None if ref is None else self._ref(tensor, ref)

    def _ref(self, tensor: torch.Tensor, ref: arena.Ref) -> PayloadRef:
        return PayloadRef(
            self.name,
            dtype_name(tensor.dtype),
            tuple(tensor.shape),
            str(self._pool.device),
            (ref.arena, ref.seq, ref.offset, ref.nbytes),
        )

    def resolve(self, ref: PayloadRef) -> torch.Tensor:
        if self._reader is None:
            raise TransportError("only a rank that opened the pool resolves its references")
        location = ref.location
        if ref.store != self.name or len(location) != 4:
            raise TransportError(f"not a reference of this cuda-ipc store: {ref}")
        name, seq, offset, nbytes = location
        if not isinstance(name, str) or not all(type(v) is int for v in (seq, offset, nbytes)):
            raise TransportError(f"malformed cuda-ipc location {location}")
        start = int(offset) - _HEADER
        if name != self._reader.name or start < 0 or start + int(nbytes) > self._pool.numel():
            raise TransportError(f"{ref} is not a slice of this pool")
        dtype = DTYPES.get(ref.dtype)
        if dtype is None:
            raise CodecError(f"unknown tensor dtype {ref.dtype!r}")
        itemsize = torch.empty((), dtype=dtype).element_size()
        dims = checked_shape(list(ref.shape), itemsize, int(nbytes))
        view = self._pool[start : start + int(nbytes)].view(dtype).reshape(dims)
        # Held until this view is collected: the rank's placer copies it to the rank's own
        # memory and drops it (mmsched.devices), so the slice goes back once that copy is done.
        self._reader.hold(arena.Ref(name, int(seq), int(offset), int(nbytes)), view)
        return view

    def borrowed(self, tensor: torch.Tensor) -> bool:
        start, size = self._pool.data_ptr(), self._pool.numel()
        return tensor.device == self._pool.device and start <= tensor.data_ptr() < start + size


class _CudaIpcPlacement(Placement):
    """One request's slices of the pool, held until settled."""

    def __init__(self, store: CudaIpcStore, *, wait: bool) -> None:
        super().__init__(store, wait=wait)
        self._cuda = store

    def put(self, tensor: torch.Tensor) -> PayloadRef | None:
        return self._cuda._place(tensor, self.placed, wait=self.wait)
