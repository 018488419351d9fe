"""Transports, resolved by the name a config gives.

``memory``  in-process: ranks as tasks of one event loop ([`mmsched.transports.memory`][])
``torch``   torch.distributed broadcast over gloo ([`mmsched.transports.torch_dist`][])
``zmq``     ZMQ publish-subscribe ([`mmsched.transports.zmq_pubsub`][])
``shm``     shared-memory payloads + ZMQ control ([`mmsched.transports.shm`][])

Implementations are imported on first use, so that a deployment needs only the libraries of
the transport it picks. A new transport is one module plus one line: in the table below, a
call to [`register_transport`][], or an entry point in the ``mmsched.transports`` group of an
installed package ([`TRANSPORTS`][mmsched.transports.TRANSPORTS], a
[`Registry`][mmsched.registry.Registry]).
"""

from __future__ import annotations

from mmsched.registry import Registry
from mmsched.transports.base import (
    Buffer,
    Frames,
    GroupSpec,
    Transport,
    TransportOptions,
    TransportStatistics,
)

TRANSPORTS: Registry[Transport] = Registry(
    "transport",
    Transport,
    {
        "memory": "mmsched.transports.memory:MemoryTransport",
        "shm": "mmsched.transports.shm:ShmTransport",
        "torch": "mmsched.transports.torch_dist:TorchTransport",
        "zmq": "mmsched.transports.zmq_pubsub:ZmqTransport",
    },
    entry_points="mmsched.transports",
)
"""Every transport, by name."""


def transport_names(*, cross_process: bool | None = None) -> list[str]:
    """The registered transport names, sorted; only those that do (or do not) cross
    processes when ``cross_process`` is given."""
    names = TRANSPORTS.names()
    if cross_process is None:
        return names
    return [n for n in names if transport_class(n).cross_process == cross_process]


def register_transport(name: str, target: str | type[Transport]) -> None:
    """Register a transport class (or ``"module:Class"``) under ``name`` (in this process:
    see [`Registry.register`][mmsched.registry.Registry.register])."""
    TRANSPORTS.register(name, target)


def transport_class(name: str) -> type[Transport]:
    """The transport class registered under ``name``.

    Raises:
        UnknownNameError: no transport of that name; the message lists the known ones.
    """
    return TRANSPORTS.get(name)


async def open_transport(name: str, spec: GroupSpec) -> Transport:
    """Join a group over the transport named ``name``.

    Raises:
        UnknownNameError: no transport of that name.
        ConfigError: the address or an option is malformed.
        TransportError: the group could not be joined (``PeerLost`` within its timeout).
    """
    return await transport_class(name).open(spec)


__all__ = [
    "TRANSPORTS",
    "Buffer",
    "Frames",
    "GroupSpec",
    "Transport",
    "TransportOptions",
    "TransportStatistics",
    "open_transport",
    "register_transport",
    "transport_class",
    "transport_names",
]
