"""The agent of a host other than node 0: it starts that host's ranks and feeds them.

``mmsched rank --nnodes N --node-rank K --dist-init-addr HOST:PORT`` (or
[`run_node`][mmsched.node.run_node] from a server's own launcher) runs one
[`NodeAgent`][mmsched.node.NodeAgent] per host. It

1. joins node 0 ([`mmsched.hosts`][]): the configs must match, and it gets the run's token;
   from then on it reports a heartbeat (see 4.), which keeps this node's slot its own
   while it starts its ranks; the first heartbeat after they are up completes the join;
2. subscribes to node 0's iterations (``PORT+2``), makes this host's payload store and
   starts this host's ``tp_size / nnodes`` ranks (global ranks ``K*L .. K*L+L-1``), which
   report to node 0's tokenizer themselves (``PORT+1``);
3. relays: each message of node 0's entry rank arrives here once, tensors inline; the agent
   writes them into this host's store and sends the message on over the configured
   transport, in which it is the sender and its ranks the receivers. Every rank on every
   host therefore sees the same messages in the same order, and a payload crosses each
   host's link once whatever the number of ranks behind it;
4. reports a heartbeat ([`NodeStatus`][mmsched.messages.NodeStatus]) to node 0 every
   ``min(1 s, timeout_s / 8)``; node 0 counts a host silent for ``timeout_s / 2`` as lost and
   fails every request in flight with [`PeerLost`][mmsched.errors.PeerLost].

With ``--rendezvous DIR`` (``rendezvous=`` here) the agent starts no ranks: node 0 is a
server's own group ([`RankGroup`][mmsched.rank_group.RankGroup]), and this host's ranks are
the server's own processes, which meet the agent in ``DIR`` (this host's rendezvous
directory) with ``RankGroup.join``. The agent announces its store and transport there as a
group's entry rank does on one host, and relays node 0's iterations to them the same way.

It stops when node 0 shuts the group down, when node 0 is silent for ``timeout_s / 2`` (no
iteration arrived: node 0 announces one at least every ``idle_wait_ms``), or when one of its
ranks dies (it tells node 0 why first). Whatever ends it, its ranks are asked to stop, killed
if they do not, and its store, directory and sockets are removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
from pathlib import Path
from typing import Any

import anyio
import zmq
import zmq.asyncio

from mmsched.codec import Decoder, encode
from mmsched.config import Config
from mmsched.credentials import present_credentials
from mmsched.errors import CodecError, ConfigError, EndOfStream, PeerLost
from mmsched.hosts import (
    HostAddresses,
    heartbeat_period_s,
    host_lost_after_s,
    join,
    probe_name,
)
from mmsched.messages import Batch, MaterializedInputs, NodeStatus
from mmsched.outputs import IterationCallback
from mmsched.probes import Probe
from mmsched.runtime.endpoints import Resources
from mmsched.runtime.rundir import RENDEZVOUS_FILE, Announcement, announce
from mmsched.runtime.supervisor import RankProcesses, check_picklable
from mmsched.scheduler import RankAddresses, RankStartCallback
from mmsched.stores import PayloadStore
from mmsched.transports import Transport

log = logging.getLogger(__name__)

_WATCH_PERIOD_S = 0.2


class NodeAgent:
    """Node ``node_rank``'s agent (see the module docstring); ``run`` until the group ends.

    Args:
        config: the same config as node 0's (checked when joining).
        node_rank: this host's index, ``1 .. nnodes - 1``.
        on_iteration: as [`Pipeline`][mmsched.pipeline.Pipeline]'s, for this host's ranks.
        probe: as ``Pipeline``'s; node 0 refuses a host whose probe differs from its own.
        on_rank_start: as ``Pipeline``'s.
        rendezvous: start no ranks: feed the server's own, which join a
            [`RankGroup`][mmsched.rank_group.RankGroup] in this directory (this host's
            rendezvous; node 0 must be a ``RankGroup`` too). No callbacks then: the
            server's ranks run its model.
    """

    def __init__(
        self,
        config: Config,
        node_rank: int,
        *,
        on_iteration: IterationCallback | None = None,
        probe: Probe | None = None,
        on_rank_start: RankStartCallback | None = None,
        rendezvous: str | os.PathLike[str] | None = None,
    ) -> None:
        if config.nnodes < 2:
            raise ConfigError("a node agent serves a group of several hosts: set nnodes >= 2")
        if not 0 < node_rank < config.nnodes:
            raise ConfigError(
                f"node_rank must be one of 1..{config.nnodes - 1} (node 0 is the process "
                f"that runs the pipeline), got {node_rank}"
            )
        self.rendezvous = Path(rendezvous) if rendezvous is not None else None
        if self.rendezvous is not None and (on_iteration or probe or on_rank_start):
            raise ConfigError(
                "an agent with a rendezvous starts no ranks: the model step and the probe "
                "are the server's own ranks' (drop on_iteration, probe and on_rank_start)"
            )
        self.config = config
        self.node_rank = node_rank
        self.on_iteration = on_iteration
        self.probe = probe
        self.on_rank_start = on_rank_start
        per_node = config.ranks_per_node
        self.ranks = range(node_rank * per_node, (node_rank + 1) * per_node)
        # What this host's side of the run opened, undone in reverse at the end: the run
        # directory, node 0's iterations, the store, the ranks, the ranks' group.
        self._resources = Resources(config)
        self._processes: RankProcesses | None = None  # the ranks, unless they are the server's
        self._store: PayloadStore | None = None
        self._zmq = zmq.asyncio.Context()
        self._status: zmq.asyncio.Socket | None = None
        self._upstream: Transport | None = None  # node 0's iterations, received once here
        self._local: Transport | None = None  # this host's ranks, fed by this agent
        self._iteration = -1  # the last iteration relayed
        self._ready = False  # this host's ranks are started: its join is complete
        self._shutdown_relayed = False

    async def run(self) -> None:
        """Join, start the ranks, relay until the group ends.

        Raises:
            ConfigError: node 0 refused this host (the message names the config field that
                differs), or a rank found the config unusable here.
            PeerLost: node 0 did not answer within ``startup_timeout_s``, went silent for
                ``timeout_s / 2``, or a rank of this host died.
        """
        if self.rendezvous is None:
            check_picklable(self.on_iteration, self.probe, self.on_rank_start)
        elif not self.rendezvous.is_dir():
            raise ConfigError(f"rendezvous {str(self.rendezvous)!r} is not a directory")
        own_ranks = self.rendezvous is not None
        try:
            token = await join(
                self.config, self.node_rank, probe_name(self.probe), own_ranks=own_ranks
            )
            log.info(
                "node %d claimed its slot; starting ranks %s", self.node_rank, list(self.ranks)
            )
            self._connect_status(token)
            async with anyio.create_task_group() as group:
                # Heartbeats from the hello on: node 0 keeps this host's slot only while it
                # hears from it (starting the ranks may take a model load's time).
                group.start_soon(self._heartbeat, name="mmsched-heartbeat")
                await self._start(token)
                self._ready = True
                await self._send_status()  # node 0 counts this host joined from now on
                if self._processes is not None:
                    group.start_soon(self._watch, name="mmsched-node-watch")
                await self._relay()
                group.cancel_scope.cancel()
        except BaseException as exc:
            failure = exc
            while isinstance(failure, BaseExceptionGroup) and failure.exceptions:
                failure = failure.exceptions[0]
            if isinstance(failure, asyncio.CancelledError | KeyboardInterrupt):
                why = "its agent was stopped (a signal, or its caller)"
            else:
                why = str(failure)
                log.error("node %d stops: %s", self.node_rank, why)
            self._report_failure(why)  # node 0 fails now, not after a heartbeat timeout
            if failure is not exc:
                raise failure from exc
            raise
        finally:
            await self._stop()

    def _connect_status(self, token: str) -> None:
        self._status = self._zmq.socket(zmq.PUSH)
        self._status.setsockopt(zmq.LINGER, 0)
        present_credentials(self._status, token)
        self._status.connect(HostAddresses.of(self.config).results)

    async def _start(self, token: str) -> None:
        config, resources = self.config, self._resources
        # The server's own ranks reach the group's sockets in their rendezvous directory.
        workdir = resources.run_dir(self.rendezvous)
        # Subscribe first: node 0's entry rank waits for every host's subscription.
        self._upstream = await resources.subscribe_to_node0(self.node_rank, token)
        self._store = await resources.create_store()
        group_address = resources.group_address(workdir)
        size = config.ranks_per_node + 1  # this agent sends; its ranks receive
        if self.rendezvous is not None:
            found = self.rendezvous / RENDEZVOUS_FILE
            announce(found, Announcement(self._store.address, group_address, token))
            resources.on_close("announcement", lambda: found.unlink(missing_ok=True))
            self._local = await resources.open_group(0, size, group_address, token)
        else:
            self._processes = ranks = RankProcesses(config, workdir, f" on node {self.node_rank}")
            addresses = RankAddresses(
                requests="",  # only node 0's entry rank reads requests
                results=HostAddresses.of(config).results,
                group=group_address,
                run_dir=str(workdir),
                parent_pid=os.getpid(),
                token=token,
                store=self._store.address,
            )
            hooks = (self.on_iteration, self.probe, self.on_rank_start)
            for index, rank in enumerate(self.ranks):
                ranks.start(rank, addresses, hooks, group=(index + 1, size))
            # Stopped after their group's endpoint closes, before the store goes.
            resources.on_close("rank processes", self._stop_ranks, bounded=False)
            opening = resources.open_group(0, size, group_address, token)
            self._local = await ranks.unless_one_dies(opening)
        self._store.consumers_attached()  # every rank attached before joining the group

    async def _relay(self) -> None:
        """Node 0's messages, each written into this host's store and sent on, in order."""
        assert self._upstream is not None and self._local is not None and self._store
        decoder = Decoder(allow_pickle=self.config.allow_pickle)
        while True:
            try:
                frames = await self._upstream.recv()
            except EndOfStream:
                return  # node 0 closed its side after the shutdown
            except PeerLost:
                raise PeerLost(
                    f"node 0 sent nothing for {host_lost_after_s(self.config):.1f} s "
                    "(timeout_s / 2): it is gone, or the link to it is cut"
                ) from None
            message = decoder.decode(frames)
            if not isinstance(message, Batch | MaterializedInputs):
                raise CodecError(f"node 0 sent a {type(message).__name__}, not an iteration")
            # The store may wait for room (held by this host's ranks): off the event loop.
            forwarded = await asyncio.to_thread(encode, message, self._store)
            await self._local.send(forwarded)
            if isinstance(message, Batch):
                self._iteration = message.iteration
                if message.shutdown:
                    self._shutdown_relayed = True
                    return

    async def _heartbeat(self) -> None:
        while True:
            await self._send_status()
            await asyncio.sleep(heartbeat_period_s(self.config))

    async def _send_status(self) -> None:
        assert self._status is not None
        stats = self._upstream.statistics() if self._upstream is not None else None
        status = NodeStatus(
            node=self.node_rank,
            pid=os.getpid(),
            bytes_received=stats.bytes_received if stats else 0,
            messages_received=stats.messages_received if stats else 0,
            ready=self._ready,
        )
        await self._status.send_multipart(encode(status))

    async def _watch(self) -> None:
        assert self._processes is not None
        while True:
            await asyncio.sleep(_WATCH_PERIOD_S)
            error = self._processes.lost()
            if error is not None:
                raise error

    def _report_failure(self, why: str) -> None:
        if self._status is None:
            return
        status = NodeStatus(node=self.node_rank, pid=os.getpid(), failed=why)
        with contextlib.suppress(zmq.ZMQError):
            zmq.Socket.shadow(self._status.underlying).send_multipart(
                encode(status), flags=zmq.NOBLOCK
            )

    async def _stop(self) -> None:
        """Stop this host's ranks (killed after a grace) and remove everything of the run."""
        ranks_alive = self._processes is None or self._processes.any_alive()
        if self._local is not None and not self._shutdown_relayed and ranks_alive:
            with contextlib.suppress(Exception):
                stop = Batch(iteration=self._iteration + 1, shutdown=True)
                await asyncio.wait_for(self._local.send(encode(stop)), 1.0)
        await self._resources.aclose()
        self._zmq.destroy(linger=0)
        log.info("node %d stopped", self.node_rank)

    async def _stop_ranks(self) -> None:
        assert self._processes is not None
        await self._processes.stop(self.config.timeout_s if self._local else 1.0)


def run_node(config: Config, node_rank: int, **callbacks: Any) -> None:
    """Run node ``node_rank``'s agent in this process until the group ends (blocks; see
    ``NodeAgent``). The process is the agent's: its allocator is tuned to keep the memory
    payloads arrive in (``keep_received_memory``).

    Raises:
        MmschedError: as [`NodeAgent.run`][mmsched.node.NodeAgent.run].
    """
    keep_received_memory()
    asyncio.run(_run_until_signalled(NodeAgent(config, node_rank, **callbacks)))


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def keep_received_memory() -> bool:
    """Make this process receive each payload into memory it has received into before.

    ZMQ receives a message into memory it allocates; glibc serves a 100 MB allocation with a
    fresh ``mmap``, so the kernel faults in and zeroes every page as the bytes arrive, which
    doubled the time a payload took to cross (receiving into pages already in use took half
    as long, about what plain TCP into a reused buffer takes). With no ``mmap``, no trimming
    and one allocator arena for every thread (ZMQ's I/O thread included), a freed message's
    pages serve the next one. The price: the process keeps its peak heap (the largest
    messages it held at once). Returns whether it applied (glibc only; elsewhere nothing
    changes).
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))
    return all(mallopt(param, value) == 1 for param, value in settings)


async def _run_until_signalled(agent: NodeAgent) -> None:
    """``agent.run()``; SIGTERM or SIGINT stops it the way a failure does: node 0 is told,
    this host's ranks are stopped and its store and directory removed."""
    task = asyncio.ensure_future(agent.run())
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await task
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
