"""The ``shm`` payload store: tensors live in one shared-memory arena that every rank maps.

The tokenizer owns the arena ([`mmsched.stores.arena`][]); a tensor is copied in once, or
not at all when the processor filled a tensor from
[`allocate`][mmsched.stores.shm.ShmStore.allocate] (it already lives there). The copy is
cut into chunks on a few threads ([`mmsched.stores.copying`][]) and, staged through a
request's [`Placement`][mmsched.stores.base.Placement], runs while the tokenizer hashes the
same bytes. Ranks resolve
a reference to a tensor viewing the mapped arena: no copy, and the bytes stay reserved
until every rank's tensor is gone. The entry rank passes each request on as the frames it
came in, and a tensor it resolved and sends in a message of its own (the
``entry-broadcast`` strategy's built inputs) as the same reference, so a request's bytes are
written once whatever the number of ranks and whatever the transport that carries the
references.

One host only (shared memory); Linux only (``/dev/shm``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmsched.errors import ArenaFull, ConfigError, TransportError
from mmsched.frames import DTYPES, dtype_name, tensor_from_frame
from mmsched.hashing import large_hashes_running
from mmsched.stores import arena
from mmsched.stores.base import PayloadRef, PayloadStore, Placement, StoreOptions
from mmsched.stores.copying import shared_copier, wait
from mmsched.stores.lending import ArenaAccess, ArenaLender


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


@dataclass
class _Staged:
    ref: arena.Ref
    copy: list[Future[int]]
    source: torch.Tensor  # kept alive until its copy is done
    used: bool = False  # put() handed out its ref


class ShmStore(PayloadStore):
    name = "shm"
    shares_across_processes = True
    lends = True
    shares_allocations = True

    def __init__(
        self,
        options: StoreOptions,
        writer: arena.ArenaWriter | None,
        reader: arena.ArenaReader | None,
    ) -> None:
        super().__init__(options)
        self._writer = writer
        self._reader = reader
        self._lender: ArenaLender | None = None

    @classmethod
    def create(cls, options: StoreOptions, *, name: str | None = None) -> ShmStore:
        """The producer's arena, named ``name`` if given (else a fresh name)."""
        writer = arena.ArenaWriter(
            options.capacity_bytes,
            options.consumers,
            name=name,
            timeout_s=0.0 if options.reject_when_full else options.timeout_s,
        )
        return cls(options, writer, None)

    @staticmethod
    def new_segment_name() -> str:
        """A fresh segment name that the stale-segment sweep can attribute to this process."""
        return arena.new_segment_name()

    @classmethod
    def attach(cls, address: str | None, consumer: int, options: StoreOptions) -> ShmStore:
        if address is None:
            raise TransportError("the shm store needs the arena's name to attach")
        reader = arena.ArenaReader(address, consumer, wait_s=options.timeout_s)
        return cls(options, None, reader)

    @property
    def address(self) -> str | None:
        owner = self._writer or self._reader
        return owner.name if owner is not None else None

    @property
    def capacity(self) -> int:
        """Bytes the arena holds at once (producer side)."""
        return self._writer.capacity if self._writer is not None else 0

    def lend(self, path: Path, token: str) -> ArenaAccess:
        if self._writer is None:
            raise ConfigError("only the producer's shm store lends its arena")
        if self._lender is None:
            self._lender = ArenaLender(self._writer, path, token, self.options.timeout_s)
        return self._lender.access()

    def claim(self, lent: Any) -> torch.Tensor:
        if self._lender is None:
            raise ConfigError("this shm store lends no memory (Pipeline.producer_access first)")
        return self._lender.claim(lent)

    def consumers_attached(self) -> None:
        if self._writer is not None:
            self._writer.unlink()  # a crash from now on leaves nothing in /dev/shm

    def close(self) -> None:
        if self._lender is not None:
            self._lender.close()
        if self._writer is not None:
            self._writer.close()
        if self._reader is not None:
            self._reader.close()

    @classmethod
    def sweep_stale(cls) -> list[str]:
        return arena.sweep_stale_segments()

    @classmethod
    def remove_leftovers(cls, address: str | None) -> None:
        if address is not None:
            arena.unlink_segment(address)

    def allocate(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        if self._writer is None:
            return super().allocate(shape, dtype)
        # On the event loop it must not wait: the room it would wait for is given back by
        # that same loop (the ranks' answers and progress arrive there).
        return self._writer.allocate_tensor(shape, dtype, wait=not _on_event_loop())

    def placement(self, *, wait: bool = True) -> Placement:
        if self._writer is None:  # a consumer places nothing of its own
            return super().placement(wait=wait)
        return _ShmPlacement(self, self._writer, wait=wait)

    def put(self, tensor: torch.Tensor) -> PayloadRef | None:
        if dtype_name(tensor.dtype) not in DTYPES:
            return None
        owner = self._writer or self._reader
        assert owner is not None
        ref = None
        nbytes = tensor.numel() * tensor.element_size()
        if tensor.device.type == "cpu" and tensor.is_contiguous():
            # Already in the arena: allocated there by a processor, or (a consumer) resolved
            # from it and forwarded as the same reference.
            ref = owner.ref_at(tensor.data_ptr(), nbytes)
        if ref is None and self._writer is not None:
            if nbytes > self._writer.capacity:
                return None  # can never fit: it travels inline
            ref = self._writer.put_tensor(tensor)
        return None if ref is None else self._ref(tensor, ref)

    def _ref(self, tensor: torch.Tensor, ref: arena.Ref) -> PayloadRef:
        return PayloadRef(
            self.name,
            dtype_name(tensor.dtype),
            tuple(tensor.shape),
            "cpu",
            (ref.arena, ref.seq, ref.offset, ref.nbytes),
        )

    def settle(self, placed: Sequence[Any], *, sent: bool = True) -> None:
        if self._writer is not None:
            for seq in placed:
                (self._writer.release if sent else self._writer.abandon)(seq)

    def resolve(self, ref: PayloadRef) -> torch.Tensor:
        if self._reader is None:
            raise TransportError("only a rank that attached the arena resolves its references")
        location = ref.location
        if ref.store != self.name or ref.device != "cpu" or len(location) != 4:
            raise TransportError(f"not a reference of this shm store: {ref}")
        name, seq, offset, nbytes = location
        if not isinstance(name, str) or not all(type(v) is int for v in (seq, offset, nbytes)):
            raise TransportError(f"malformed shm location {location}")
        view = self._reader.view(arena.Ref(name, int(seq), int(offset), int(nbytes)))
        return tensor_from_frame(view, ref.dtype, list(ref.shape))


class _ShmPlacement(Placement):
    """One request's room in the arena: what it staged, and what its puts hold."""

    def __init__(self, store: ShmStore, writer: arena.ArenaWriter, *, wait: bool) -> None:
        super().__init__(store, wait=wait)
        self._shm = store
        self._writer = writer
        self._staged: dict[tuple[int, int], _Staged] = {}

    def stage(self, tensors: Iterable[torch.Tensor]) -> None:
        # The copy into the arena runs on the copier's threads while the caller hashes the
        # same source bytes on others: the two passes overlap instead of adding up.
        writer = self._writer
        chosen: dict[tuple[int, int], torch.Tensor] = {}
        for tensor in tensors:
            nbytes = tensor.numel() * tensor.element_size()
            if (
                self.wants(tensor)
                and dtype_name(tensor.dtype) in DTYPES
                and tensor.device.type == "cpu"
                and tensor.is_contiguous()
                and writer.ref_at(tensor.data_ptr(), nbytes) is None
            ):
                chosen[(tensor.data_ptr(), nbytes)] = tensor
        if not chosen or sum(n for _, n in chosen) > writer.capacity:
            return  # nothing to stage, or never all at once: put() decides tensor by tensor
        # All of the request's room at once (held while staged), or none yet: holding part
        # while waiting for the rest could wait forever on other requests doing so.
        rooms = writer.reserve_all([n for _, n in chosen], wait=self.wait)
        for ((address, nbytes), tensor), (ref, dst) in zip(chosen.items(), rooms, strict=True):
            # Under load (other hashes running, every core busy) one piece: each piece costs
            # a GIL hand-over when its thread comes back, and no core is idle.
            pieces = 1 if large_hashes_running() else None
            copy = shared_copier().start(dst, address, nbytes, pieces=pieces)
            self._staged[(address, nbytes)] = _Staged(ref, copy, tensor)

    def put(self, tensor: torch.Tensor) -> PayloadRef | None:
        if dtype_name(tensor.dtype) not in DTYPES:
            return None
        writer = self._writer
        ref = None
        nbytes = tensor.numel() * tensor.element_size()
        if tensor.device.type == "cpu" and tensor.is_contiguous():
            staged = self._staged.get((tensor.data_ptr(), nbytes))
            if staged is not None:
                wait(staged.copy)
                staged.used = True
                ref = staged.ref
            else:
                ref = writer.ref_at(tensor.data_ptr(), nbytes)
            if ref is not None:
                writer.hold(ref.seq)
        if ref is None:
            if nbytes > writer.capacity:
                return None  # can never fit: it travels inline
            # Holding room already (staged or placed for this request), it must not wait
            # for more (see stage): without room now, the tensor travels inline.
            holding = bool(self.placed) or bool(self._staged)
            try:
                ref = writer.put_tensor(tensor, hold=True, wait=self.wait and not holding)
            except ArenaFull:
                if not holding:
                    raise
                return None
        self.placed.append(ref.seq)
        return self._shm._ref(tensor, ref)

    def finish(self) -> None:
        staged, self._staged = self._staged, {}
        for entry in staged.values():  # no copy may still run into room that gets reused
            wait(entry.copy)
            if entry.used:
                self._writer.release(entry.ref.seq)  # put() took its own hold for the sending
            else:
                self._writer.abandon(entry.ref.seq)  # never sent (a cache hit, say)
