"""A drop-in for a server's own per-iteration broadcast, in rank processes it started itself.

Most servers start their scheduler ranks themselves and will not let a library spawn them.
In SGLang, each TP rank's loop calls ``recv_requests``: the entry rank (rank 0) takes what
the tokenizer sent and ``broadcast_pyobj`` pickles it to every other rank, tensors and all.
A [`RankGroup`][mmsched.rank_group.RankGroup] takes that broadcast's place:

```python
group = await RankGroup.join(config, rank, rendezvous="/run/myserver")
while serving:
    if rank == 0:
        iteration = await group.publish(requests_from_tokenizer)  # answer iteration.failed
    else:
        iteration = await group.receive()
    run_model(iteration.requests)  # the same requests, in the same order, on every rank
await group.aclose()
```

- The entry rank validates and hashes each request's multimodal inputs once (a processor
  dict, or inputs already built); a request that fails comes back in ``failed`` as an
  [`ErrorOutput`][mmsched.messages.ErrorOutput] for the server to answer, and no other rank
  sees it.
- Tensors travel through the configured payload store (``shm``: each feature is written
  once into a shared arena, every rank maps it; a tensor the processor wrote with
  [`allocate_tensor`][mmsched.rank_group.RankGroup.allocate_tensor] costs no copy at all),
  the rest over the configured transport. Nothing is pickled; nothing is spawned.
- With a GPU ``device`` each rank's features arrive on its device, their copy finished.
- **Call ``publish`` every iteration, with an empty list when nothing arrived**, as SGLang's
  loop broadcasts every iteration: receivers treat ``timeout_s`` of silence as a dead entry
  rank ([`PeerLost`][mmsched.errors.PeerLost]).

Ranks find each other through ``rendezvous``, a directory of their host that every rank
there can read and only the server's user can write: the entry rank leaves there, in a file
of mode 0600, where its payload store and transport are and the secret its transport asks
for; the others wait for it up to ``startup_timeout_s``. A host store's tensors stay valid
while the request object holds them; their room is reused once every rank has dropped them.

**Several hosts** (``nnodes > 1``): the ranks of node 0 meet as above; on every other host an
agent (``mmsched rank --nnodes N --node-rank K --dist-init-addr HOST:PORT --rendezvous DIR``,
see [`mmsched.node`][]) takes the entry rank's place: it joins node 0, leaves the same file
in that host's ``DIR`` for the host's ranks, and relays each iteration into that host's
store. Node 0's entry rank admits the agents at ``dist_init_addr`` and publishes each
iteration to them once ([`mmsched.hosts`][]); ``join`` returns on rank 0 once every host's
ranks have joined. A host that stops reporting for ``timeout_s / 2`` fails the next
``publish`` with ``PeerLost``; an agent whose node 0 is silent that long stops, and its
ranks' ``receive`` raises ([`EndOfStream`][mmsched.errors.EndOfStream] or ``PeerLost``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
import zmq
import zmq.asyncio

from mmsched.codec import Decoder, encode
from mmsched.config import Config
from mmsched.credentials import check_credentials
from mmsched.devices import DevicePlacer, rank_device
from mmsched.errors import CodecError, ConfigError, EndOfStream, NotRunning, PeerLost
from mmsched.frames import Frames
from mmsched.hosts import HostAddresses, JoinServer, lost_host
from mmsched.inputs import MultimodalInputs, validate_input_ids
from mmsched.messages import Batch, ErrorOutput, NodeStatus, TokenizedGenerateReqInput
from mmsched.runtime.building import build_inputs
from mmsched.runtime.endpoints import Resources
from mmsched.runtime.rundir import RENDEZVOUS_FILE, Announcement, announce, read_announcement
from mmsched.stores import PayloadStore
from mmsched.transports import Transport, TransportStatistics, transport_class

__all__ = ["RENDEZVOUS_FILE", "Iteration", "RankGroup"]

log = logging.getLogger(__name__)

_POLL_S = 0.05


@dataclass
class Iteration:
    """One iteration's requests, as every rank of the group sees them.

    Attributes:
        index: the iteration's number, counted from 0 by the entry rank.
        requests: the requests every rank runs, their ``mm_inputs`` built.
        failed: entry rank only: the requests that did not make it, one error each, for
            the server to answer (their clients get an error, the other ranks never hear
            of them).
    """

    index: int
    requests: list[TokenizedGenerateReqInput] = field(default_factory=list)
    failed: list[ErrorOutput] = field(default_factory=list)


class RankGroup:
    """One rank's end of the group; made with [`join`][mmsched.rank_group.RankGroup.join]."""

    def __init__(
        self,
        config: Config,
        rank: int,
        resources: Resources,
        store: PayloadStore | None = None,
        transport: Transport | None = None,
        hosts: _OtherHosts | None = None,
    ) -> None:
        self.config = config
        self.rank = rank
        self._resources = resources  # everything this rank opened, undone at close
        self._store = store
        self._transport = transport
        self._hosts = hosts  # node 0's entry rank of several hosts: the other hosts' agents
        self._decoder = Decoder(allow_pickle=config.allow_pickle, store=store)
        self._placer = DevicePlacer(rank_device(config.device, rank))
        self._iteration = 0
        self._closed = False

    @classmethod
    async def join(cls, config: Config, rank: int, rendezvous: str | os.PathLike[str]) -> RankGroup:
        """Join the group of ``config.tp_size`` ranks; this host's meet in ``rendezvous``.

        Raises:
            ConfigError: ``rank`` is outside the group, the config cannot serve a group of
                its own processes (the in-process ``memory`` transport), ``rendezvous`` is
                not a directory, or (rank 0 of several hosts) a host's agent has another
                config or cannot be admitted at ``dist_init_addr``.
            PeerLost: the group was not complete within ``startup_timeout_s``.
        """
        if not 0 <= rank < config.tp_size:
            raise ConfigError(f"rank {rank} outside a group of tp_size={config.tp_size}")
        if not transport_class(config.transport).cross_process:
            raise ConfigError(
                f"transport {config.transport!r} runs in one process; a RankGroup's ranks are "
                "the server's own processes: use zmq, shm or torch"
            )
        where = Path(rendezvous)
        if not where.is_dir():
            raise ConfigError(f"rendezvous {str(where)!r} is not a directory")
        device = rank_device(config.device, rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        resources = Resources(config)
        try:
            if rank == 0:
                return await cls._open_entry(config, where, resources)
            return await cls._open_receiver(config, rank, where, resources)
        except BaseException:
            await resources.aclose()
            raise

    @classmethod
    async def _open_entry(cls, config: Config, where: Path, resources: Resources) -> RankGroup:
        token = secrets.token_hex(16)  # the group's secret, in the announcement (mode 0600)
        hosts = _OtherHosts(config, token, resources) if config.nnodes > 1 else None
        store, transport = None, None
        if config.ranks_per_node > 1:  # anyone on this host to send to
            found = where / RENDEZVOUS_FILE
            found.unlink(missing_ok=True)  # an earlier run's: its ranks must not find it
            store = await resources.create_store(consumers=config.ranks_per_node - 1)
            # The transport's sockets go in a private directory of their own.
            address = resources.group_address(resources.run_dir(where))
            announce(found, Announcement(store.address, address, token))
            resources.on_close("announcement", lambda: found.unlink(missing_ok=True))
            transport = await resources.open_group(0, config.ranks_per_node, address, token)
            store.consumers_attached()  # every receiver attached before it joined
        if hosts is not None:
            await hosts.wait_joined()
        log.info("rank group ready: entry rank, %d ranks", config.tp_size)
        return cls(config, 0, resources, store, transport, hosts)

    @classmethod
    async def _open_receiver(
        cls, config: Config, rank: int, where: Path, resources: Resources
    ) -> RankGroup:
        per_node = config.ranks_per_node
        node, local = divmod(rank, per_node)
        # On node 0 the entry rank sends (member 0); on another host its agent does, and
        # every rank there reads its store.
        index, size, consumer, consumers = (
            (local, per_node, local - 1, per_node - 1)
            if node == 0
            else (local + 1, per_node + 1, local, per_node)
        )
        sender = "entry rank" if node == 0 else f"agent of node {node} (mmsched rank)"
        found = where / RENDEZVOUS_FILE
        deadline = time.monotonic() + config.startup_timeout_s
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            announced = read_announcement(found)
            if announced is None:
                await asyncio.sleep(_POLL_S)
                continue
            try:
                store = await resources.attach_store(
                    announced.store, consumer, rank, consumers=consumers
                )
            except Exception as exc:  # an earlier run's file, or one not finished yet
                last_error = exc
                await asyncio.sleep(_POLL_S)
                continue
            transport = await resources.open_group(index, size, announced.group, announced.token)
            log.info("rank group ready: rank %d of %d", rank, config.tp_size)
            return cls(config, rank, resources, store, transport)
        raise PeerLost(
            f"rank {rank}: no {sender} announced a group in {where} within "
            f"startup_timeout_s={config.startup_timeout_s}"
            + (f" (last attempt: {last_error})" if last_error else "")
        )

    def allocate_tensor(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """Entry rank: an empty tensor for a processor to fill; with the ``shm`` store it
        lives in the shared arena, so publishing it copies nothing.

        Raises:
            NotRunning: closed.
            ArenaFull: no room within ``timeout_s``.
        """
        if self._closed:
            raise NotRunning("the rank group is closed")
        if self._store is None:
            return torch.empty(tuple(shape), dtype=dtype)
        return self._store.allocate(shape, dtype)

    async def publish(self, requests: Sequence[TokenizedGenerateReqInput]) -> Iteration:
        """Entry rank: build each request's inputs once and send the iteration to every rank.

        A request whose ids or inputs are malformed fails alone (in ``failed``). An item
        that carries its own ``content_hash`` (trusted: see [`mmsched.inputs`][]) is not
        hashed.

        Raises:
            NotRunning: closed, or called on another rank than 0.
            ArenaFull: the payload store had no room within ``timeout_s`` (a rank that
                stopped reading holds its room).
            TransportError: the transport failed (``PeerLost``: a rank is gone).
        """
        if self._closed or self.rank != 0:
            raise NotRunning("publish is the open entry rank's (rank 0)")
        if self._hosts is not None and (lost := self._hosts.lost()) is not None:
            raise lost
        iteration = Iteration(self._iteration)
        self._iteration += 1
        for req in requests:
            try:
                await asyncio.to_thread(self._build, req)  # O(ids) and the hash: off the loop
            except Exception as exc:  # foreign data: this request's error, never the loop's
                rid = req.rid if isinstance(req.rid, str) else repr(req.rid)
                log.warning("rank group refused request %s: %r", rid, exc)
                iteration.failed.append(ErrorOutput.from_exception(rid, exc))
                continue
            iteration.requests.append(req)
        if self._transport is not None or self._hosts is not None:
            frames = self._encode(iteration)
            if self._transport is not None:
                await self._transport.send(frames)
            if self._hosts is not None:
                # Once per other host, tensors inline: its agent writes them into its store.
                if self._store is not None:
                    batch = Batch(iteration.index, iteration.requests)
                    frames = encode(batch, allow_pickle=self.config.allow_pickle)
                await self._hosts.send(frames)
        await self._place(iteration)
        return iteration

    def _encode(self, iteration: Iteration) -> Frames:
        """The iteration as frames that every receiver can decode; a request that cannot go
        (a value the codec refuses, or one it would pickle while receivers refuse pickles:
        a set in its sampling parameters, say) fails alone."""
        pickles = self.config.allow_pickle
        try:
            return encode(
                Batch(iteration.index, iteration.requests), self._store, allow_pickle=pickles
            )
        except CodecError:
            kept = []
            for req in iteration.requests:
                try:  # the failure path only: finds the culprits
                    encode(req, self._store, allow_pickle=pickles)
                except CodecError as exc:
                    log.warning("rank group refused request %s: %s", req.rid, exc)
                    iteration.failed.append(ErrorOutput.from_exception(req.rid, exc))
                    continue
                kept.append(req)
            iteration.requests = kept
            return encode(Batch(iteration.index, kept), self._store, allow_pickle=pickles)

    def _build(self, req: TokenizedGenerateReqInput) -> None:
        """``req``'s ids checked and its inputs built and hashed, in place (raises if bad)."""
        req.input_ids = validate_input_ids(req.input_ids)
        req.mm_inputs = build_inputs(self.config, req)

    async def receive(self) -> Iteration:
        """Other ranks: the entry rank's next iteration.

        Raises:
            NotRunning: closed, or called on rank 0.
            EndOfStream: the entry rank (on another host: its agent) closed the group.
            PeerLost: nothing arrived within ``timeout_s`` (the entry rank is gone).
            CodecError: what arrived is not an iteration.
        """
        if self._closed or self.rank == 0 or self._transport is None:
            raise NotRunning("receive is for the open ranks other than 0")
        message = self._decoder.decode(await self._transport.recv())
        if not isinstance(message, Batch):
            raise CodecError(f"expected an iteration, got {type(message).__name__}")
        if message.shutdown:  # another host's agent ends its ranks' group this way
            raise EndOfStream("the group was shut down")
        iteration = Iteration(message.iteration, list(message.requests))
        await self._place(iteration)
        return iteration

    def statistics(self) -> TransportStatistics:
        """What this rank's transport endpoint moved so far: tensors that went through the
        payload store count a reference of a few hundred bytes, not their size."""
        if self._transport is None:
            return TransportStatistics()
        return self._transport.statistics()

    async def _place(self, iteration: Iteration) -> None:
        """Features onto this rank's device (nothing to do on the host)."""
        if self._placer.device.type == "cpu":
            return
        borrowed = self._store.borrowed if self._store is not None else None
        kept = []
        for req in iteration.requests:
            if isinstance(req.mm_inputs, MultimodalInputs):
                try:
                    req.mm_inputs = await self._placer.place(req.mm_inputs, borrowed)
                except Exception as exc:  # out of device memory: this request, this rank
                    log.warning("rank %d could not place %r: %r", self.rank, req.rid, exc)
                    iteration.failed.append(ErrorOutput.from_exception(req.rid, exc))
                    continue
            kept.append(req)
        iteration.requests = kept

    async def aclose(self) -> None:
        """Leave the group; on the entry rank, receivers (and other hosts' agents) then see
        ``EndOfStream``, and the payload store and the rendezvous file are removed. Safe to
        call twice."""
        if self._closed:
            return
        self._closed = True
        await self._resources.aclose()

    async def __aenter__(self) -> RankGroup:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class _OtherHosts:
    """Node 0's entry rank, of a group on several hosts: the join port admits each other
    host's agent, the results port hears its heartbeats, the iterations port publishes each
    iteration to them once ([`mmsched.hosts`][]). What it opens closes with ``resources``."""

    def __init__(self, config: Config, token: str, resources: Resources) -> None:
        self.config = config
        self._context = zmq.asyncio.Context()
        self._tasks: list[asyncio.Future[Any]] = []
        self._join: JoinServer | None = None
        self._authenticator = check_credentials(self._context, token)
        # Polled without waiting (``lost``), between the server's iterations: a plain socket.
        plain: zmq.Context[zmq.Socket[bytes]] = zmq.Context.shadow(self._context.underlying)
        self._status: zmq.Socket[bytes] = plain.socket(zmq.PULL)
        resources.on_close("the ports of the other hosts", self._close)
        self._status.setsockopt(zmq.LINGER, 0)
        self._status.plain_server = True  # the agents present the run's token
        address = HostAddresses.of(config).results
        try:
            self._status.bind(address)
        except zmq.ZMQError as exc:
            raise ConfigError(f"cannot bind {address}: {exc}") from exc
        self._mismatch: ConfigError | None = None
        self._join = JoinServer(self._context, config, token, self._mismatched, own_ranks=True)
        self._decoder = Decoder(allow_pickle=False)
        self._seen: dict[int, float] = {}  # node rank -> when its last heartbeat was read
        self._failure: PeerLost | None = None  # a host's own report that it stopped
        self._fanout: asyncio.Future[Transport] = asyncio.ensure_future(
            resources.open_host_fanout(token)
        )
        self._tasks = [asyncio.ensure_future(self._join.serve()), self._fanout]

    def _mismatched(self, error: ConfigError) -> None:
        self._mismatch = self._mismatch or error

    async def wait_joined(self) -> None:
        """Return once every other host's agent has joined (its ranks too) and subscribed.

        Raises:
            ConfigError: an agent's config differs, or the iterations port cannot be bound.
            PeerLost: not every host joined within ``startup_timeout_s``.
        """
        assert self._join is not None
        deadline = time.monotonic() + self.config.startup_timeout_s
        others = set(range(1, self.config.nnodes))
        while True:
            self._drain()
            if self._mismatch is not None:
                raise self._mismatch
            if self._fanout.done():
                self._fanout.result()  # raises why it failed
                if set(self._join.joined) == others:
                    return
            if time.monotonic() > deadline:
                absent = sorted(others - set(self._join.joined))
                raise PeerLost(
                    f"rank 0: node(s) {absent} never joined at {self.config.dist_init_addr} "
                    f"within startup_timeout_s={self.config.startup_timeout_s} "
                    f"({self._join.waiting_for()})"
                )
            await asyncio.sleep(_POLL_S)

    def lost(self) -> PeerLost | None:
        """A host that said it stopped, or that nothing was heard from for ``timeout_s / 2``
        (read as the entry rank's event loop runs)."""
        self._drain()
        return lost_host(self.config, self._seen, self._failure)

    async def send(self, frames: Frames) -> None:
        await self._fanout.result().send(frames)

    def _drain(self) -> None:
        while True:
            try:
                frames = self._status.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                status = self._decoder.decode(frames)
            except Exception as exc:  # foreign bytes with the token: nothing to act on
                log.warning("ignored a malformed status from another host: %s", exc)
                continue
            if isinstance(status, NodeStatus):
                self._heard(status)

    def _heard(self, status: NodeStatus) -> None:
        assert self._join is not None
        if not (type(status.node) is int and 0 < status.node < self.config.nnodes):
            return
        claim = self._join.heard(status)
        if claim is None or (status.failed is None and not claim.joined):
            return  # a stale or foreign status, or an agent still starting
        self._seen[status.node] = time.monotonic()
        if status.failed is not None and self._failure is None:
            self._failure = PeerLost(f"node {status.node} stopped: {status.failed}")

    async def _close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._join is not None:
            self._join.close()
        self._status.close()
        self._authenticator.stop()
        self._context.destroy(linger=0)
