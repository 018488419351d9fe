"""Payload stores, resolved by the name a config gives (``payload_store``).

``inline``  tensor bytes travel inside the frames ([`mmsched.stores.inline`][])
``shm``     tensor bytes live in one shared-memory arena every rank maps
            ([`mmsched.stores.shm`][])
``pinned``  the ``shm`` arena, page-locked by every rank for fast copies to its GPU
            ([`mmsched.stores.pinned`][])
``cuda-ipc`` tensor bytes live in one GPU pool every rank opens by CUDA IPC
            ([`mmsched.stores.cuda_ipc`][])

The interface is [`PayloadStore`][mmsched.stores.base.PayloadStore]. A new store is one module
plus one line: in the table below, a call to [`register_store`][], or an entry point in the
``mmsched.stores`` group of an installed package ([`STORES`][mmsched.stores.STORES], a
[`Registry`][mmsched.registry.Registry]); implementations are imported on first use. It
passes the store contract ([`mmsched.testing.run_store_contract`][]).
"""

from __future__ import annotations

from mmsched.registry import Registry
from mmsched.stores.base import PayloadRef, PayloadStore, Placement, StoreOptions

STORES: Registry[PayloadStore] = Registry(
    "payload store",
    PayloadStore,
    {
        "inline": "mmsched.stores.inline:InlineStore",
        "shm": "mmsched.stores.shm:ShmStore",
        "pinned": "mmsched.stores.pinned:PinnedShmStore",
        "cuda-ipc": "mmsched.stores.cuda_ipc:CudaIpcStore",
    },
    entry_points="mmsched.stores",
)
"""Every payload store, by name."""


def store_names() -> list[str]:
    """The registered store names, sorted."""
    return STORES.names()


def register_store(name: str, target: str | type[PayloadStore]) -> None:
    """Register a store class (or ``"module:Class"``) under ``name``.

    Rank processes are started with ``spawn``: a store registered at run time must be
    registered again in them (at import of the callback's module, say), or listed here.
    """
    STORES.register(name, target)


def store_class(name: str) -> type[PayloadStore]:
    """The store class registered under ``name``.

    Raises:
        UnknownNameError: no store of that name; the message lists the known ones.
    """
    return STORES.get(name)


__all__ = [
    "STORES",
    "PayloadRef",
    "PayloadStore",
    "Placement",
    "StoreOptions",
    "register_store",
    "store_class",
    "store_names",
]
