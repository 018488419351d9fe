"""The ``inline`` payload store: no store at all. Tensor bytes travel inside the frames.

Every transport carries them as it carries any frame (a zero-copy view of the tensor on the
way out, a view of the received frame on the way in). The default, and the one that works
across hosts without shared memory.
"""

from __future__ import annotations

import torch

from mmsched.errors import CodecError
from mmsched.stores.base import PayloadRef, PayloadStore, StoreOptions


class InlineStore(PayloadStore):
    name = "inline"
    by_reference = False

    @classmethod
    def create(cls, options: StoreOptions) -> InlineStore:
        return cls(options)

    @classmethod
    def attach(cls, address: str | None, consumer: int, options: StoreOptions) -> InlineStore:
        return cls(options)

    def put(self, tensor: torch.Tensor) -> PayloadRef | None:
        return None

    def resolve(self, ref: PayloadRef) -> torch.Tensor:
        raise CodecError(f"a {ref.store!r} reference reached a pipeline whose store is inline")
