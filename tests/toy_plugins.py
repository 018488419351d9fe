"""A payload store and a strategy that are not part of mmsched: each is this one file plus a
registry call (``test_plugins.py``), which is all a new one takes.

``shelf``: tensors stay where they are, in this process; a reference names a shelf slot.
Only a pipeline whose ranks are tasks of this process (the ``memory`` transport) can use
it, which is what makes it a toy.

``verify``: the tokenizer builds and hashes once, and every rank hashes each feature again
and refuses a request whose bytes do not match the tokenizer's hash (a paranoid server's
check that the data plane delivered what was hashed).
"""

from __future__ import annotations

import itertools
from typing import ClassVar

import torch

from mmsched.errors import TransportError
from mmsched.frames import dtype_name
from mmsched.hashing import get_hasher
from mmsched.inputs import MultimodalInputs
from mmsched.messages import ErrorOutput, TokenizedGenerateReqInput
from mmsched.stores import PayloadRef, PayloadStore, StoreOptions
from mmsched.strategies import RankServices
from mmsched.strategies.tokenizer import TokenizerStrategy

_SHELVES: dict[str, dict[int, torch.Tensor]] = {}
_names = itertools.count()


class ShelfStore(PayloadStore):
    name = "shelf"
    puts: ClassVar[int] = 0
    resolves: ClassVar[int] = 0

    def __init__(self, options: StoreOptions, shelf: str) -> None:
        super().__init__(options)
        self._shelf = shelf
        self._slots = itertools.count()

    @classmethod
    def create(cls, options: StoreOptions) -> ShelfStore:
        shelf = f"shelf-{next(_names)}"
        _SHELVES[shelf] = {}
        return cls(options, shelf)

    @classmethod
    def attach(cls, address: str | None, consumer: int, options: StoreOptions) -> ShelfStore:
        if address not in _SHELVES:
            raise TransportError(f"no shelf {address!r} in this process")
        return cls(options, address)

    @property
    def address(self) -> str | None:
        return self._shelf

    def put(self, tensor: torch.Tensor) -> PayloadRef | None:
        for slot, held in _SHELVES[self._shelf].items():
            if held is tensor:  # forwarding what a rank resolved: the same reference
                return self._ref(tensor, slot)
        slot = next(self._slots)
        _SHELVES[self._shelf][slot] = tensor
        ShelfStore.puts += 1
        return self._ref(tensor, slot)

    def _ref(self, tensor: torch.Tensor, slot: int) -> PayloadRef:
        location = (self._shelf, slot)
        return PayloadRef(self.name, dtype_name(tensor.dtype), tuple(tensor.shape), "cpu", location)

    def resolve(self, ref: PayloadRef) -> torch.Tensor:
        ShelfStore.resolves += 1
        shelf, slot = ref.location
        try:
            return _SHELVES[str(shelf)][int(slot)]
        except KeyError:
            raise TransportError(f"no such shelf slot: {ref.location}") from None

    def close(self) -> None:
        _SHELVES.pop(self._shelf, None)


class VerifyingStrategy(TokenizerStrategy):
    name = "verify"
    summary = "tokenizer hashes once; every rank hashes again and compares"

    async def resolve(
        self, req: TokenizedGenerateReqInput, rank: RankServices
    ) -> MultimodalInputs | ErrorOutput | None:
        inputs = await super().resolve(req, rank)
        if isinstance(inputs, MultimodalInputs):
            hasher = get_hasher(inputs.hasher)
            for i, item in enumerate(inputs.mm_items):
                if hasher.hash_tensor(item.modality.value, item.feature) != item.hash:
                    message = f"mm_items[{i}] does not hash to what the tokenizer hashed"
                    return ErrorOutput(rid=req.rid, kind="ContentMismatch", message=message)
        return inputs
