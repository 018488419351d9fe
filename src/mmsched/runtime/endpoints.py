"""The payload store and the transport endpoints of one side of a run, opened and closed.

A [`Resources`][mmsched.runtime.endpoints.Resources] records what its owner opened: the run
directory, the payload store (made by the side that sends: the tokenizer, a node agent, a
group's entry rank; attached by each rank that reads it, with
[`store_options`][mmsched.runtime.endpoints.store_options]), transport endpoints (a rank's
group, the legs between hosts) and the addresses whose files must go. ``aclose`` undoes them
in reverse order, each step whatever became of the others: endpoints close before the store
whose memory their messages name, the store before the directory that holds its sockets.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import zmq

from mmsched.config import Config
from mmsched.devices import rank_device
from mmsched.errors import ConfigError, PeerLost
from mmsched.hosts import HostAddresses, host_lost_after_s
from mmsched.runtime.rundir import make_run_dir, sweep_stale_run_dirs
from mmsched.stores import PayloadStore, StoreOptions, store_class, store_names
from mmsched.transports import GroupSpec, Transport, open_transport, transport_class

log = logging.getLogger(__name__)

# Tensors from this size up go through the payload store; smaller ones ride the header.
_STORE_MIN_BYTES = 4096
# The legs between hosts are zmq whatever the transport of each host's group.
_RUN_DIR_PARENT_MAX = 60
"""The deepest parent a run directory is made in: its name (``mmsched-<pid>-<random>``, up to
about 30 bytes) and a socket's name in it (``zmq-<8 hex>``, 12) must fit a Unix socket's
107-byte path."""

_HOSTS_TRANSPORT = "zmq"


def store_options(
    config: Config, rank: int | None = None, *, consumers: int | None = None
) -> StoreOptions:
    """What the run's payload store is made with on rank ``rank``, or (``None``) on the side
    that makes it, whose device is rank 0's where the store keeps its bytes on a GPU.
    ``consumers``: the ranks that attach; by default each host's ranks."""
    store = store_class(config.payload_store)
    if rank is not None or store.needs_gpu:
        device = str(rank_device(config.device, rank or 0))
    else:
        device = "cpu"  # a host store's producer needs no device: CUDA stays untouched
    return StoreOptions(
        capacity_bytes=int(getattr(config, store.capacity_setting)) << 20,
        consumers=config.ranks_per_node if consumers is None else consumers,
        timeout_s=config.timeout_s,
        min_bytes=_STORE_MIN_BYTES,
        device=device,
        reject_when_full=config.backpressure == "reject",
    )


def sweep_stale_stores() -> list[str]:
    """What every registered payload store's crashed runs left behind, removed."""
    return [left for name in store_names() for left in store_class(name).sweep_stale()]


Undo = Callable[[], Awaitable[object] | object]


class Resources:
    """What one side of a run opened, undone in reverse order by ``aclose`` (see the module
    docstring). Every ``open``/``create``/``attach`` registers its undoing as it succeeds,
    so that an exit at any point (a failed start included) leaves nothing behind."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._undo: list[tuple[str, Undo, bool]] = []
        self._closed = False

    def on_close(self, what: str, undo: Undo, *, bounded: bool = True) -> None:
        """Run ``undo`` (a function, or a coroutine function) at ``aclose``, before what was
        registered earlier; ``bounded``: given up on after ``timeout_s`` (not for a step
        that bounds its own wait, as stopping processes does)."""
        self._undo.append((what, undo, bounded))

    def run_dir(self, parent: Path | None = None) -> Path:
        """A private run directory (in ``parent`` or the temp directory; what crashed runs
        left there is removed first), removed at close. A ``parent`` too deep for the
        sockets made in it (a Unix socket's path holds at most 107 bytes) gives way to the
        temp directory: the group's announcement says where its sockets are."""
        if parent is not None and len(os.fsencode(parent)) > _RUN_DIR_PARENT_MAX:
            log.info(
                "%s is too deep for socket paths: the run directory goes in %s",
                parent,
                tempfile.gettempdir(),
            )
            parent = None
        sweep_stale_run_dirs(parent)
        path = make_run_dir(parent)
        self.on_close(f"run directory {path}", lambda: shutil.rmtree(path, ignore_errors=True))
        return path

    async def create_store(self, *, consumers: int | None = None) -> PayloadStore:
        """The run's payload store, made here (its producer side); removed at close."""
        kind = store_class(self.config.payload_store)
        await asyncio.to_thread(sweep_stale_stores)
        options = store_options(self.config, consumers=consumers)
        store = await asyncio.to_thread(kind.create, options)

        def remove() -> None:
            store.close()
            kind.remove_leftovers(store.address)

        self.on_close("payload store", remove)
        return store

    async def attach_store(
        self, address: str | None, consumer: int, rank: int, *, consumers: int | None = None
    ) -> PayloadStore:
        """Rank ``rank``'s view of the store at ``address``, as consumer ``consumer`` of its
        host's; closed (not removed) at close."""
        options = store_options(self.config, rank, consumers=consumers)
        kind = store_class(self.config.payload_store)
        store = await asyncio.to_thread(kind.attach, address, consumer, options)
        self.on_close("payload store", store.close)
        return store

    def group_address(self, run_dir: Path) -> str:
        """A new rendezvous of the config's transport in ``run_dir``; its files removed at
        close."""
        kind = transport_class(self.config.transport)
        address = kind.new_address(run_dir)
        self.on_close("transport rendezvous", lambda: kind.remove_leftovers(address))
        return address

    async def open_group(self, index: int, size: int, address: str, token: str) -> Transport:
        """This endpoint (``index`` of ``size``; index 0 sends) of a group over the config's
        transport at ``address``; closed at close.

        Raises:
            PeerLost: the group was not complete within ``startup_timeout_s``.
            TransportError: the transport failed to open.
        """
        config = self.config
        spec = GroupSpec(
            index,
            size,
            address,
            config.timeout_s,
            options=config.transport_options(token),
            # A group's members start apart (spawned, each loading its model): meeting is
            # bounded by startup_timeout_s, a live peer's silence by timeout_s.
            join_timeout_s=config.startup_timeout_s,
        )
        try:
            transport = await asyncio.wait_for(
                open_transport(config.transport, spec), config.startup_timeout_s
            )
        except TimeoutError:
            waited = f"members 1..{size - 1}" if index == 0 else "its sender (member 0)"
            raise PeerLost(
                f"member {index} of a group of {size}: {waited} did not join within "
                f"startup_timeout_s={config.startup_timeout_s}"
            ) from None
        self.on_close("transport endpoint", transport.aclose)
        return transport

    async def open_host_fanout(self, token: str) -> Transport:
        """Node 0's entry rank: the publisher every other host's agent subscribes to (with
        the run's ``token``); returns once all ``nnodes - 1`` have (``startup_timeout_s``).

        Raises:
            ConfigError: the iterations port cannot be bound.
        """
        config = self.config
        address = HostAddresses.of(config).iterations
        # Closing waits for queued iterations to leave only as long as a live host may take
        # to be heard from: past that, a host behind a cut link would hold the shutdown.
        options = config.transport_options(token, linger_s=host_lost_after_s(config))
        spec = GroupSpec(0, config.nnodes, address, config.startup_timeout_s, options)
        try:
            transport = await open_transport(_HOSTS_TRANSPORT, spec)
        except zmq.ZMQError as exc:
            raise ConfigError(
                f"cannot publish iterations to the other hosts at {address}: {exc}"
            ) from exc
        self.on_close("iterations to the other hosts", transport.aclose)
        return transport

    async def subscribe_to_node0(self, node_rank: int, token: str) -> Transport:
        """Another host's agent: node 0's iterations, received once here; silence for
        ``timeout_s / 2`` is node 0 lost."""
        config = self.config
        spec = GroupSpec(
            node_rank,
            config.nnodes,
            HostAddresses.of(config).iterations,
            host_lost_after_s(config),
            self.config.transport_options(token),
        )
        transport = await open_transport(_HOSTS_TRANSPORT, spec)
        self.on_close("iterations from node 0", transport.aclose)
        return transport

    async def aclose(self) -> None:
        """Undo everything, latest first; a step that fails or hangs (bounded by
        ``timeout_s``) is logged and the rest still run. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        cancelled: BaseException | None = None
        while self._undo:
            what, undo, bounded = self._undo.pop()
            try:
                result = undo()
                if inspect.isawaitable(result):
                    await asyncio.wait_for(result, self.config.timeout_s if bounded else None)
            except asyncio.CancelledError as exc:  # the rest is undone first, then it stops
                cancelled = exc
            except Exception as exc:  # cleanup goes on: the rest must not leak for it
                log.warning("closing the %s failed: %r", what, exc)
        if cancelled is not None:
            raise cancelled
