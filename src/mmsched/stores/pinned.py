"""The ``pinned`` payload store: the ``shm`` arena, page-locked on every rank for its GPU.

A copy from ordinary (pageable) host memory to a GPU goes through a driver staging buffer,
one piece at a time; a copy from page-locked memory is one DMA transfer at the bus's speed.
The arena is shared memory every rank maps, so each rank page-locks its own mapping once at
start (``cudaHostRegister``, paid before the first request) and from
then on copies features straight from the arena to its device, asynchronously, on a side
stream ([`mmsched.devices`][]). A feature's room in the arena is given back as soon as every
rank's copy is done.

Everything else (the tokenizer's writes, references, lending, lifetime) is the ``shm``
store's ([`mmsched.stores.shm`][]). Ranks whose device is ``cpu`` lock nothing: they get
the ``shm`` store's views. Page-locked memory cannot be swapped out: the arena's size
(``shm_arena_mb``) is locked once per rank process.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from mmsched.errors import ConfigError
from mmsched.stores.base import StoreOptions
from mmsched.stores.shm import ShmStore

log = logging.getLogger(__name__)

_PORTABLE = 1  # cudaHostRegisterPortable: page-locked for every CUDA context of the process


class PinnedShmStore(ShmStore):
    name = "pinned"
    _locked: int | None = None  # the address this process page-locked (ranks on a GPU)

    @classmethod
    def attach(cls, address: str | None, consumer: int, options: StoreOptions) -> ShmStore:
        store = super().attach(address, consumer, options)
        assert isinstance(store, PinnedShmStore) and store._reader is not None
        device = torch.device(options.device)
        if device.type == "cuda":
            base, size = store._reader.mapping
            try:
                _register(base, size, device)
            except BaseException:
                store.close()
                raise
            store._locked = base
            log.debug("rank %d page-locked the arena (%d MiB) for %s", consumer, size >> 20, device)
        return store

    def close(self) -> None:
        if self._locked is not None:
            # Before the mapping goes: the driver must not keep pages of an unmapped range.
            cudart = _cudart()
            result = cudart.cudaHostUnregister(self._locked)
            if result != cudart.cudaError.success:
                log.warning("cudaHostUnregister failed: %s", result)
            self._locked = None
        super().close()


def _register(address: int, size: int, device: torch.device) -> None:
    cudart = _cudart()
    with torch.cuda.device(device):
        result = cudart.cudaHostRegister(address, size, _PORTABLE)
    if result != cudart.cudaError.success:
        raise ConfigError(
            f"cannot page-lock the {size >> 20} MiB arena for {device} (cudaHostRegister: "
            f"{result}); lower shm_arena_mb, raise the locked-memory limit (ulimit -l), or use "
            "the shm store"
        )


def _cudart() -> Any:
    return torch.cuda.cudart()  # type: ignore[no-untyped-call]
