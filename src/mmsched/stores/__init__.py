"""Payload stores, resolved by the name a config gives (``payload_store``).

``inline``  tensor bytes travel inside the frames ([`mmsched.stores.inline`][])
``shm``     tensor bytes live in one shared-memory arena every rank maps
            ([`mmsched.stores.shm`][])
``pinned``  the ``shm`` arena, page-locked by every rank for fast copies to its GPU
            ([`mmsched.stores.pinned`][])
``cuda-ipc`` tensor bytes live in one GPU pool every rank opens by CUDA IPC
            ([`mmsched.stores.cuda_ipc`][])

The interface is [`PayloadStore`][mmsched.stores.base.PayloadStore]. A new store is one module
plus one line in ``_REGISTRY`` (or a call to [`register_store`][]); implementations are
imported on first use.
"""

from __future__ import annotations

from mmsched.registry import lookup
from mmsched.stores.base import PayloadRef, PayloadStore, Placement, StoreOptions

_REGISTRY: dict[str, str | type[PayloadStore]] = {
    "inline": "mmsched.stores.inline:InlineStore",
    "shm": "mmsched.stores.shm:ShmStore",
    "pinned": "mmsched.stores.pinned:PinnedShmStore",
    "cuda-ipc": "mmsched.stores.cuda_ipc:CudaIpcStore",
}


def store_names() -> list[str]:
    """The registered store names, sorted."""
    return sorted(_REGISTRY)


def register_store(name: str, target: str | type[PayloadStore]) -> None:
    """Register a store class (or ``"module:Class"``) under ``name``.

    Rank processes are started with ``spawn``: a store registered at run time must be
    registered again in them (at import of the callback's module, say), or listed here.
    """
    _REGISTRY[name] = target


def store_class(name: str) -> type[PayloadStore]:
    """The store class registered under ``name``.

    Raises:
        UnknownNameError: no store of that name; the message lists the known ones.
    """
    store: type[PayloadStore] = lookup("payload store", _REGISTRY, name, PayloadStore)
    return store


__all__ = [
    "PayloadRef",
    "PayloadStore",
    "Placement",
    "StoreOptions",
    "register_store",
    "store_class",
    "store_names",
]
