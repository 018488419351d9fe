"""The ``shm`` payload store: tensors live in one shared-memory arena that every rank maps.

The tokenizer owns the arena ([`mmsched.stores.arena`][]); a tensor is copied in once, or
not at all when the processor filled a tensor from
[`allocate`][mmsched.stores.shm.ShmStore.allocate] (it already lives there). Ranks resolve
a reference to a tensor viewing the mapped arena: no copy, and the bytes stay reserved
until every rank's tensor is gone. The entry rank forwards
a tensor it resolved as the same reference, so a request's bytes are written once whatever
the number of ranks and whatever the transport that carries the references.

One host only (shared memory); Linux only (``/dev/shm``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mmsched.errors import TransportError
from mmsched.frames import DTYPES, dtype_name, tensor_from_frame
from mmsched.hashing import tensor_bytes
from mmsched.stores import arena
from mmsched.stores.base import PayloadRef, PayloadStore, StoreOptions


class ShmStore(PayloadStore):
    name = "shm"

    def __init__(
        self,
        options: StoreOptions,
        writer: arena.ArenaWriter | None,
        reader: arena.ArenaReader | None,
    ) -> None:
        super().__init__(options)
        self._writer = writer
        self._reader = reader

    @classmethod
    def create(cls, options: StoreOptions, *, name: str | None = None) -> ShmStore:
        """The producer's arena, named ``name`` if given (else a fresh name)."""
        writer = arena.ArenaWriter(
            options.capacity_bytes, options.consumers, name=name, timeout_s=options.timeout_s
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

    def consumers_attached(self) -> None:
        if self._writer is not None:
            self._writer.unlink()  # a crash from now on leaves nothing in /dev/shm

    def close(self) -> None:
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
        return self._writer.allocate_tensor(shape, dtype)

    def put(self, tensor: torch.Tensor) -> PayloadRef | None:
        if dtype_name(tensor.dtype) not in DTYPES:
            return None
        owner = self._writer or self._reader
        assert owner is not None
        ref = None
        if tensor.device.type == "cpu" and tensor.is_contiguous():
            ref = owner.ref_at(tensor.data_ptr(), tensor.numel() * tensor.element_size())
        if ref is None and self._writer is not None:
            if tensor.numel() * tensor.element_size() > self._writer.capacity:
                return None  # can never fit: it travels inline
            ref = self._writer.put(tensor_bytes(tensor))
        if ref is None:
            return None
        return PayloadRef(
            self.name,
            dtype_name(tensor.dtype),
            tuple(tensor.shape),
            "cpu",
            (ref.arena, ref.seq, ref.offset, ref.nbytes),
        )

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
