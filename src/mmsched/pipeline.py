"""The embedding API: a tokenizer stage in the caller's process and N scheduler ranks.

```python
async with Pipeline(Config(tp_size=4, strategy="tokenizer")) as pipeline:
    output = await pipeline.generate("req-1", input_ids, processor_output)
```

Ranks are processes started with the ``spawn`` method (safe with torch and threads); over
the in-process ``memory`` transport they are tasks of the caller's event loop instead, for
tests that need no process boundary. They form a group over the configured transport, and
each calls ``on_iteration(rank, iteration, requests)`` with the iteration's typed requests.

The pipeline's background work (routing results, watching the ranks, and in-process ranks)
runs in one anyio task group: if any of it stops unexpectedly, every pending and later
request fails with [`PeerLost`][mmsched.errors.PeerLost] (or with the error a rank left
behind, such as a [`ConfigError`][mmsched.errors.ConfigError] raised while it started)
instead of waiting. Closing the pipeline asks the ranks to exit, waits ``timeout_s`` for
them, then kills any left, and removes the run's private directory and payload store; a
``start()`` that fails closes what it had started.

The tokenizer's two sockets are, by default, ``ipc://`` files of mode 0600 in that 0700
directory (``requests_address`` and ``results_address`` may name ``tcp://`` endpoints
instead), and they accept only peers that present the run's secret token in the ZMQ
handshake (PLAIN credentials checked by a ZAP handler): another process cannot answer,
steal or forge requests by connecting to them. Ranks that are tasks of this process reach
the same two sockets over ``inproc://`` endpoints of the pipeline's own ZMQ context, which
no other process can reach (and which skip the I/O threads and the kernel).

With ``nnodes > 1`` this process is node 0: it starts its own ``tp_size / nnodes`` ranks,
admits the other hosts' agents at ``dist_init_addr`` ([`mmsched.hosts`][]), and ``start``
returns once every rank of every host is ready. A host that stops reporting for
``timeout_s / 2`` (killed, or its link cut) fails the pipeline as a dead rank does.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
from collections.abc import AsyncGenerator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
import torch
import zmq
import zmq.asyncio
from zmq.auth.thread import ThreadAuthenticator

from mmsched.cache import CacheStats
from mmsched.config import Config
from mmsched.credentials import check_credentials
from mmsched.errors import ConfigError, MmschedError, NotRunning, PeerLost
from mmsched.hosts import HostAddresses, JoinServer, lost_host, probe_name
from mmsched.inputs import MultimodalInputs
from mmsched.messages import GenerateOutput, NodeStatus
from mmsched.outputs import IterationCallback
from mmsched.probes import Probe
from mmsched.runtime.endpoints import Resources
from mmsched.runtime.supervisor import RankProcesses, check_picklable, rank_error
from mmsched.scheduler import RankAddresses, RankStartCallback, SchedulerRank
from mmsched.stores import PayloadStore
from mmsched.tokenizer import RequestTrace, TokenizerStage
from mmsched.transports import transport_class

log = logging.getLogger(__name__)

_WATCHDOG_PERIOD_S = 0.2
# A group that never came up all the way cannot be told to stop: its ranks are killed after
# this grace rather than after timeout_s.
_STARTUP_FAILURE_GRACE_S = 1.0


class Pipeline:
    """Tokenizer stage plus ``config.tp_size`` scheduler ranks.

    Args:
        config: what to run with.
        on_iteration: the model step, called on every rank with each iteration's requests
            (must be picklable when ranks are processes: a module-level function, say);
            what it returns is each request's answer ([`mmsched.outputs`][]). Default: the
            stub, which answers with the ids it was fed.
        probe: instrumentation for benchmarks and tests ([`mmsched.probes`][]); ``None``
            in production.
        on_rank_start: called once on every rank, in its process, with ``(rank, device)``
            before the rank reports ready: where a server loads its model (onto ``device``,
            the rank's own under a GPU ``device`` setting) and keeps it for ``on_iteration``
            (a module-level variable of the rank process, say). ``start`` returns once every
            rank's has finished (bounded by ``startup_timeout_s``); one that raises fails
            ``start`` with a [`ConfigError`][mmsched.errors.ConfigError] naming the rank.
            Picklable, like ``on_iteration``.
    """

    def __init__(
        self,
        config: Config,
        *,
        on_iteration: IterationCallback | None = None,
        probe: Probe | None = None,
        on_rank_start: RankStartCallback | None = None,
    ) -> None:
        self.config = config
        self.on_iteration = on_iteration
        self.probe = probe
        self.on_rank_start = on_rank_start
        self.in_process = not transport_class(config.transport).cross_process
        self._resources = Resources(config)  # run directory, payload store, group address
        self._workdir: Path | None = None
        self._zmq: zmq.asyncio.Context | None = None
        self._ranks: RankProcesses | None = None  # this host's rank processes
        self._stage: TokenizerStage | None = None
        self._background: asyncio.Task[None] | None = None
        self._ranks_running = 0
        self._ranks_stopped = asyncio.Event()
        self._store: PayloadStore | None = None
        self._authenticator: ThreadAuthenticator | None = None
        self._addresses: RankAddresses | None = None
        self._task_addresses: RankAddresses | None = None  # in-process ranks' (inproc://)
        self._join_server: JoinServer | None = None  # several hosts: where the others join
        self._ready = False
        self._closing = False
        self._failure: MmschedError | None = None  # why the pipeline stopped serving

    @property
    def running(self) -> bool:
        """Whether requests can be served now: started, not closed, no rank lost."""
        return self._ready and not self._closing and self._failure is None

    @property
    def pids(self) -> list[int]:
        """Process ids of the rank processes, rank order (none when ranks are tasks)."""
        return self._ranks.pids if self._ranks is not None else []

    def node_status(self) -> dict[int, NodeStatus]:
        """Several hosts: each other host's last heartbeat, by node rank, with the bytes
        that crossed the link to it so far (``bytes_received``)."""
        return dict(self._stage.node_status) if self._stage is not None else {}

    def cache_stats(self) -> CacheStats | None:
        """What the feature cache did (``feature_cache_mb``): hits, bytes saved, bytes held.

        These are the tokenizer's mirror's counters; every rank's cache holds the same keys
        by construction. ``None`` without a cache or before ``start``.
        """
        return self._stage.cache_stats() if self._stage is not None else None

    @property
    def request_bytes_sent(self) -> int:
        """Bytes of every request sent to rank 0 so far (the requests leg): what a repeated
        feature saves shows here."""
        return self._stage.bytes_sent if self._stage is not None else 0

    @property
    def inflight_bytes(self) -> int:
        """Feature bytes of requests sent and not yet released by every rank: what
        ``max_inflight_mb`` bounds (0 before ``start``)."""
        return self._stage.inflight_bytes if self._stage is not None else 0

    def rejected_results(self) -> dict[str, int]:
        """Result frames the tokenizer dropped so far (they did not decode, or decoded to
        nonsense), counted by the name of the error each raised; empty before ``start``."""
        return dict(self._stage.rejected) if self._stage is not None else {}

    @property
    def rank_addresses(self) -> RankAddresses | None:
        """What this host's rank processes are given to join the run: the tokenizer's two
        sockets as bound (``ipc://`` files, or the configured ``tcp://`` endpoints), the
        group's address, the payload store's and the run's secret token. ``None`` before
        ``start``. The token lets a peer in: hand it only to processes of this run."""
        return self._addresses

    @property
    def in_process_rank_addresses(self) -> RankAddresses | None:
        """What ranks that are tasks of this process connect to: the same as
        [`rank_addresses`][mmsched.pipeline.Pipeline.rank_addresses], but the two sockets
        reached over ``inproc://`` endpoints of the pipeline's own ZMQ context when the
        transport is in-process. ``None`` before ``start``."""
        return self._task_addresses

    async def start(self) -> None:
        """Start the tokenizer stage and the ranks; return once every rank is ready.

        Raises:
            ConfigError: the callback cannot reach the rank processes, or a rank found the
                config unusable where it runs (say ``/dev/shm`` too small for its arena).
            PeerLost: a rank died while starting, or not every rank was ready within
                ``startup_timeout_s``.

        Whatever fails, what was started is closed again: no process, directory or
        segment is left behind.
        """
        try:
            await self._start()
        except BaseException:
            await self.aclose()
            raise
        log.info("pipeline ready: %d ranks, pids %s", self.config.tp_size, self.pids)

    async def _start(self) -> None:
        if not self.in_process:
            check_picklable(self.on_iteration, self.probe, self.on_rank_start)
        # What a crashed earlier run left goes first: its ranks clean up after it when they
        # can, but a rank killed with its parent before it ran any code of ours cannot.
        self._workdir = self._resources.run_dir()
        self._zmq = zmq.asyncio.Context()
        token = secrets.token_hex(16)
        self._authenticator = check_credentials(self._zmq, token)
        requests = self._zmq.socket(zmq.PUSH)
        results = self._zmq.socket(zmq.PULL)
        for sock in (requests, results):
            sock.setsockopt(zmq.LINGER, 0)
            sock.plain_server = True
        self._store = await self._resources.create_store()
        bound = [
            _bind(sock, address, self._workdir / name)
            for sock, address, name in (
                (requests, self.config.requests_address, "requests"),
                (results, self.config.results_address, "results"),
            )
        ]
        if self.config.nnodes > 1:
            hosts = HostAddresses.of(self.config)
            try:
                results.bind(hosts.results)  # the other hosts' ranks report here
            except zmq.ZMQError as exc:
                raise ConfigError(f"cannot bind {hosts.results}: {exc}") from exc
        addresses = RankAddresses(
            requests=bound[0],
            results=bound[1],
            group=self._resources.group_address(self._workdir),
            run_dir=str(self._workdir),
            parent_pid=os.getpid(),
            token=token,
            store=self._store.address,
        )
        self._addresses = addresses
        if self.in_process:
            # Ranks that are tasks of this process connect over inproc:// endpoints of this
            # context: a message then goes from socket to socket without the I/O threads
            # and the kernel, and no other process can reach them. (The ipc or tcp
            # endpoints stay bound, and keep asking for the token.)
            inproc = [f"inproc://mmsched-{token}-{name}" for name in ("requests", "results")]
            requests.bind(inproc[0])
            results.bind(inproc[1])
            addresses = dataclasses.replace(addresses, requests=inproc[0], results=inproc[1])
        self._task_addresses = addresses
        self._stage = TokenizerStage(
            self.config,
            requests,
            results,
            self._store,
            probed=bool(self.probe and self.probe.reports),
        )
        if self.config.nnodes > 1:
            self._join_server = JoinServer(
                self._zmq, self.config, token, self._stage.fail_all, probe_name(self.probe)
            )
            self._stage.claim_of = self._join_server.heard
        if not self.in_process:
            self._ranks = RankProcesses(self.config, self._workdir)
            for rank in range(self.config.ranks_per_node):  # this host's; the others' agents
                hooks = (self.on_iteration, self.probe, self.on_rank_start)
                self._ranks.start(rank, self._rank_addresses(rank), hooks)
        self._background = asyncio.create_task(self._supervise(), name="mmsched-background")
        self._background.add_done_callback(self._background_stopped)
        try:
            await self._stage.wait_ranks_ready(self.config.startup_timeout_s)
        except TimeoutError:
            # Name what the start waited for: the ranks, and the hosts and what became of
            # each one's joiners.
            missing = f": ranks {self._stage.ranks_not_ready()} not ready"
            if self._join_server is not None:
                absent = sorted(set(range(1, self.config.nnodes)) - set(self._join_server.joined))
                if absent:
                    missing += (
                        f"; node(s) {absent} never joined at {self.config.dist_init_addr} "
                        f"({self._join_server.waiting_for()})"
                    )
            raise PeerLost(
                "not every rank was ready within "
                f"startup_timeout_s={self.config.startup_timeout_s}{missing}"
            ) from None
        self._ready = True
        self._store.consumers_attached()  # every rank has attached: drop the public name

    def _rank_addresses(self, rank: int) -> RankAddresses:
        assert self._addresses is not None
        if rank != 0 or self.config.nnodes == 1:
            return self._addresses
        # The entry rank also publishes every iteration to the other hosts' agents.
        return dataclasses.replace(self._addresses, to_hosts=True)

    async def _supervise(self) -> None:
        """The pipeline's background work, in one task group: if one part fails, the rest
        is cancelled and the failure reaches every caller (``_background_stopped``)."""
        assert self._stage is not None
        async with anyio.create_task_group() as group:
            group.start_soon(self._route_results, name="mmsched-results")
            if self._join_server is not None:
                group.start_soon(self._join_server.serve, name="mmsched-join")
            if self.in_process:
                for rank in range(self.config.tp_size):
                    self._ranks_running += 1
                    group.start_soon(self._run_rank_task, rank, name=f"mmsched-rank{rank}")
            else:
                group.start_soon(self._watch, name="mmsched-watchdog")

    async def _route_results(self) -> None:
        """The result router; if it stops, every caller fails now, not once the rest of the
        background work (in-process ranks finishing their iteration, say) has wound down."""
        assert self._stage is not None
        try:
            await self._stage.route_results()
        except BaseException as exc:
            if not self._closing:
                cause = "was cancelled" if isinstance(exc, asyncio.CancelledError) else exc
                error = PeerLost(f"the tokenizer's result router stopped: {cause}")
                self._failure = error
                log.error("%s; failing every waiting request", error)
                self._stage.fail_all(error)
            raise

    def _background_stopped(self, task: asyncio.Task[None]) -> None:
        if self._closing or self._stage is None:
            return
        if task.cancelled():
            cause = "was cancelled"
        else:
            exc = task.exception()
            while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
                exc = exc.exceptions[0]
            cause = f"failed: {exc}" if exc is not None else "ended"
        error = PeerLost(f"the tokenizer's background work (result router, ranks) {cause}")
        self._failure = error
        log.error("%s; failing every waiting request", error)
        self._stage.fail_all(error)

    async def _run_rank_task(self, rank: int) -> None:
        """An in-process rank: its failure fails the pipeline, as a process's death does."""
        assert self._task_addresses is not None and self._stage is not None
        rank_loop = SchedulerRank(
            self.config,
            rank,
            self._task_addresses,
            self.on_iteration,
            self.probe,
            self.on_rank_start,
            context=self._zmq,
        )
        try:
            await rank_loop.run()
        except Exception as exc:
            error = rank_error(rank, type(exc).__name__, str(exc))
            self._failure = error
            log.error("%s", error)
            self._stage.fail_all(error)
            raise  # the group cancels the other ranks: a group missing a rank cannot serve
        finally:
            self._ranks_running -= 1
            if self._ranks_running == 0:
                self._ranks_stopped.set()

    def producer_access(self) -> Any:
        """What a processor in another process needs to write its outputs straight into the
        payload store (picklable; under ``shm``, an
        [`ArenaAccess`][mmsched.stores.lending.ArenaAccess]): the process connects with it,
        fills tensors from ``allocate`` and hands their ``Lent`` handles back here, to
        [`claim_tensor`][mmsched.pipeline.Pipeline.claim_tensor].

        Raises:
            NotRunning: the pipeline has not started, or has closed.
            ConfigError: the payload store lends no memory (only ``shm`` does).
        """
        if self._store is None or self._addresses is None or self._workdir is None:
            raise NotRunning("the pipeline is not running")
        if not self._store.lends:
            raise ConfigError(
                f"the {self._store.name!r} payload store lends no memory to other processes"
            )
        return self._store.lend(self._workdir / "producers", self._addresses.token)

    def claim_tensor(self, lent: Any) -> torch.Tensor:
        """The tensor a processor in another process wrote under ``lent`` (see
        [`producer_access`][mmsched.pipeline.Pipeline.producer_access]), ready to pass to
        [`generate`][mmsched.pipeline.Pipeline.generate]: it crosses to the ranks without a
        copy. Claim each handle once, within ``timeout_s`` of its allocation.

        Raises:
            NotRunning: the pipeline has not started, or has closed.
            ConfigError: the payload store lends no memory.
            TransportError: ``lent`` is not a live lease (forged, claimed already, expired).
            CodecError: its dtype and shape do not match its size.
        """
        if self._store is None:
            raise NotRunning("the pipeline is not running")
        if not self._store.lends:
            raise ConfigError(
                f"the {self._store.name!r} payload store lends no memory to other processes"
            )
        return self._store.claim(lent)

    def allocate_tensor(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """An empty tensor for a processor to fill. With the ``shm`` payload store it lives
        in shared memory, so sending it copies nothing; otherwise it is ``torch.empty``.

        Call it from a processor thread (``await asyncio.to_thread(...)`` from async code):
        room in the arena comes back as the ranks' answers reach the event loop, so on the
        event loop's own thread it does not wait for room and fails at once.

        Raises:
            NotRunning: the pipeline is not started.
            ArenaFull: the store had no room within ``timeout_s`` (at once, when called on
                the event loop's thread).
        """
        if self._store is None:
            raise NotRunning("the pipeline is not started")
        return self._store.allocate(shape, dtype)

    async def generate(
        self,
        rid: str,
        input_ids: list[int],
        mm_inputs: MultimodalInputs | Mapping[str, Any] | None = None,
        sampling_params: dict[str, Any] | None = None,
    ) -> GenerateOutput:
        """Run one request; ``mm_inputs`` is the processor's output dict (or a built object).

        An item of the dict may carry its own ``content_hash`` (an int below ``2**64``, or 8
        to 64 bytes of a digest): it is then the item's hash, for the ranks' feature cache
        and the pad values, and the feature is not hashed. Trusted input, as SGLang's
        ``content_hash`` and vLLM's ``multi_modal_uuids`` are: pass only a key your own code
        computed over the media ([`mmsched.inputs`][]).

        Raises:
            InvalidMultimodalInput: the inputs are malformed; this request alone fails.
            RequestFailed: a rank failed the request for another reason (``kind`` says which).
            Overloaded: ``max_inflight_mb`` is reached (see ``backpressure``), or the
                payload store had no room in time (``ArenaFull``).
            CodecError: a value in the request cannot be encoded.
            PeerLost: a rank died; the pipeline is stopped and must be started again. Or
                this request got no answer within ``timeout_s`` (it alone fails).
            NotRunning: the pipeline is not started, or closed.
        """
        trace = await self.generate_traced(rid, input_ids, mm_inputs, sampling_params)
        return trace.output

    async def generate_traced(
        self,
        rid: str,
        input_ids: list[int],
        mm_inputs: MultimodalInputs | Mapping[str, Any] | None = None,
        sampling_params: dict[str, Any] | None = None,
    ) -> RequestTrace:
        """Like [`generate`][mmsched.pipeline.Pipeline.generate], with when the request was
        submitted and every rank's probe report (with a ``probe``).

        Raises:
            MmschedError: as [`generate`][mmsched.pipeline.Pipeline.generate].
        """
        if self._stage is None or self._closing:
            raise NotRunning("the pipeline is not started, or closed")
        return await self._stage.submit(rid, input_ids, mm_inputs, sampling_params)

    async def generate_stream(
        self,
        rid: str,
        input_ids: list[int],
        mm_inputs: MultimodalInputs | Mapping[str, Any] | None = None,
        sampling_params: dict[str, Any] | None = None,
    ) -> AsyncGenerator[GenerateOutput, None]:
        """Run one request and yield its output as the model streams it: each
        [`GenerateOutput`][mmsched.messages.GenerateOutput] holds the ids generated since
        the one before; the last has ``finished`` set (a model that does not stream gives
        just that one, with every id). Closing the generator early aborts the request (the
        ranks close the model's stream): leave the loop inside ``contextlib.aclosing(...)``,
        or the abort waits for the generator to be collected.

        Raises:
            MmschedError: as [`generate`][mmsched.pipeline.Pipeline.generate]; a request
                whose chunks stop coming for ``timeout_s`` fails with ``PeerLost``.
        """
        if self._stage is None or self._closing:
            raise NotRunning("the pipeline is not started, or closed")
        chunks: asyncio.Queue[GenerateOutput] = asyncio.Queue()
        submitted = asyncio.ensure_future(
            self._stage.submit(rid, input_ids, mm_inputs, sampling_params, chunks.put_nowait)
        )
        sent = 0
        got: asyncio.Future[GenerateOutput] | None = None
        try:
            while True:
                got = asyncio.ensure_future(chunks.get())
                await asyncio.wait((got, submitted), return_when=asyncio.FIRST_COMPLETED)
                if got.done():
                    chunk = got.result()
                    sent += len(chunk.output_ids)
                    yield chunk
                    continue
                got.cancel()
                while not chunks.empty():  # chunks that came with the result
                    chunk = chunks.get_nowait()
                    sent += len(chunk.output_ids)
                    yield chunk
                whole = submitted.result().output
                yield dataclasses.replace(whole, output_ids=whole.output_ids[sent:])
                return
        finally:
            if got is not None:
                got.cancel()
            if not submitted.done():
                submitted.cancel()  # the caller stopped reading: the request is aborted
                with contextlib.suppress(BaseException):
                    await submitted

    async def aclose(self) -> None:
        """Stop the ranks (killed after ``timeout_s`` if they hang) and release everything:
        sockets, the payload store, the run's private directory. Safe to call twice."""
        if self._closing:
            return
        self._closing = True
        if self._stage is not None:
            if self.in_process:
                await self._stop_rank_tasks()
            else:
                if self._ranks is not None and self._ranks.any_alive():
                    await self._stage.shutdown_when_connected(self._shutdown_wait_s())
                await self._join_ranks()
        if self._background is not None:
            self._background.cancel()
            await asyncio.gather(self._background, return_exceptions=True)
        if self._stage is not None:
            self._stage.close()
        if self._join_server is not None:
            self._join_server.close()
        if self._authenticator is not None:
            self._authenticator.stop()
        if self._zmq is not None:
            self._zmq.destroy(linger=0)
        await self._resources.aclose()
        log.info("pipeline closed")

    def _shutdown_wait_s(self) -> float:
        # A group that never came up may have no entry rank to connect: do not wait long.
        return min(self.config.timeout_s, 5.0) if self._ready else 0.1

    async def _stop_rank_tasks(self) -> None:
        assert self._stage is not None
        if self._ranks_running == 0:
            return
        await self._stage.shutdown_when_connected(self._shutdown_wait_s())
        grace = self.config.timeout_s if self._ready else _STARTUP_FAILURE_GRACE_S
        with anyio.move_on_after(grace):
            await self._ranks_stopped.wait()  # else the background's cancel stops them

    async def _join_ranks(self) -> None:
        grace = self.config.timeout_s if self._ready else _STARTUP_FAILURE_GRACE_S
        if self._ranks is not None:
            await self._ranks.stop(grace)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(_WATCHDOG_PERIOD_S)
            if self._closing:
                return  # ranks exiting now were told to: not a failure
            lost_rank = self._ranks.lost(started=self._ready) if self._ranks else None
            error = lost_rank or self._lost_host()
            if error is not None and self._stage is not None:
                self._failure = error
                log.error("%s", error)
                self._stage.fail_all(error)
                # A group missing a rank cannot serve: the others must not wait on it
                # (a collective would, until gloo's timeout). Stop them now.
                self._stage.shutdown()
                await self._join_ranks()
                return

    def _lost_host(self) -> MmschedError | None:
        """Another host that said it stopped, or that went silent (``timeout_s / 2``)."""
        if self._stage is None or self.config.nnodes == 1:
            return None
        return lost_host(self.config, self._stage.node_seen, self._stage.node_failure)

    async def __aenter__(self) -> Pipeline:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def _bind(sock: zmq.asyncio.Socket, address: str | None, ipc_path: Path) -> str:
    """Bind ``sock`` where the config says (an owner-only ``ipc://`` file by default);
    returns the address peers connect to (a ``tcp://...:*`` resolved to its port)."""
    if address is None:
        sock.bind(f"ipc://{ipc_path}")
        os.chmod(ipc_path, 0o600)  # owner only, as the directory
        return f"ipc://{ipc_path}"
    try:
        sock.bind(address)
    except zmq.ZMQError as exc:
        raise ConfigError(f"cannot bind {address}: {exc}") from exc
    bound = sock.getsockopt(zmq.LAST_ENDPOINT)
    return bound.decode() if isinstance(bound, bytes) else str(bound)
