"""One scheduler rank: the per-iteration loop that every TP rank runs in its own process.

Each iteration:

1. the entry rank (rank 0) takes what the tokenizer sent since the last iteration (waiting
   up to ``idle_wait_ms`` for a first message) and announces it as one [`Batch`][] over
   the transport; the other ranks receive that batch. All ranks therefore run the same
   requests in the same iteration, and no rank runs a collective the others skip. With
   ranks on several hosts it also publishes the batch once per other host, whose agent
   passes it on to that host's ranks ([`mmsched.node`][]);
2. every rank resolves each request's multimodal inputs as its
   [strategy][mmsched.strategies] says (use the tokenizer's object; build it here; or,
   ``entry-broadcast``, receive the entry rank's); tensors that travel by reference are
   resolved through the [payload store][mmsched.stores] as the message is decoded; with a
   GPU ``device`` the features are then copied onto the rank's GPU ([`mmsched.devices`][]);
3. the server's callback (the model step; the stub by default) sees the iteration's typed
   requests and returns each one's output ([`mmsched.outputs`][]);
4. rank 0 returns those outputs, whole or streamed chunk by chunk (or per-request errors,
   or receipts of aborts) to the tokenizer, and every rank reports the iteration done: the
   tokenizer then reuses the requests' room in the payload store.

A request whose inputs fail to build fails alone: it gets an [`ErrorOutput`][] and the
iteration goes on. The decision is made identically on every rank (same bytes, same checks,
or the entry rank's verdict carried over), so ranks never diverge. Whatever is raised while
a request's inputs are built (not only mmsched's own errors) is that request's error: one
request never stops a rank.

The rank's payload store and transport endpoints are opened and closed through the rank
runtime ([`mmsched.runtime`][]), which also starts and watches rank processes.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import zmq
import zmq.asyncio

from mmsched.cache import CacheMiss, CacheOps, FeatureCache
from mmsched.codec import Decoder, encode
from mmsched.config import Config
from mmsched.credentials import present_credentials
from mmsched.devices import DevicePlacer, rank_device
from mmsched.errors import CodecError, ConfigError, ModelOutputError
from mmsched.frames import Frames, Int64List
from mmsched.inputs import MultimodalInputs
from mmsched.messages import (
    ABORTED,
    AbortReq,
    Batch,
    CacheMissed,
    ErrorOutput,
    GenerateOutput,
    Message,
    ProbeReport,
    RankProgress,
    RankReady,
    Shutdown,
    TokenizedGenerateReqInput,
)
from mmsched.outputs import (
    IterationCallback,
    ModelOutput,
    checked_output,
    run_callback,
)
from mmsched.probes import Probe
from mmsched.runtime.building import build_inputs
from mmsched.runtime.endpoints import Resources
from mmsched.stores import PayloadStore
from mmsched.strategies import get_strategy
from mmsched.transports import Transport, transport_class
from mmsched.zmqwait import wait_readable

log = logging.getLogger(__name__)

RankStartCallback = Callable[[int, torch.device], Awaitable[None] | None]
"""``on_rank_start(rank, device)``: once per rank, in its process, before it reports ready
(where a real server loads its model onto ``device``, the rank's own)."""


@dataclass(frozen=True)
class RankAddresses:
    """Where a rank finds the tokenizer and its peers, and how it proves it belongs to the run.

    ``token`` is the run's secret: the tokenizer's sockets accept only peers that present it
    (ZMQ PLAIN credentials, checked in the handshake). It reaches the ranks through the
    spawn pipe, never a command line or a file.
    """

    requests: str  # tokenizer PUSH -> entry rank PULL
    results: str  # every rank PUSH -> tokenizer PULL
    group: str  # the transport's rendezvous
    run_dir: str  # the run's private directory
    parent_pid: int  # the process that started the ranks (the tokenizer)
    token: str  # the run's secret (see above)
    store: str | None = None  # where the payload store's consumers attach
    # Several hosts: node 0's entry rank also publishes each iteration to the other hosts'
    # agents (at the iterations port of ``dist_init_addr``; see mmsched.hosts).
    to_hosts: bool = False


class SchedulerRank:
    """One scheduler rank: its sockets, its transport endpoint and its iteration loop.

    It is the [`RankServices`][mmsched.strategies.base.RankServices] its strategy uses.

    ``rank`` is the rank's place in the whole TP group; ``group`` is ``(index, size)`` in its
    host's transport group, whose index 0 sends: on node 0 the entry rank, on another host
    that host's agent ([`mmsched.node`][]). By default ``(rank, tp_size / nnodes)``.
    """

    def __init__(
        self,
        config: Config,
        rank: int,
        addresses: RankAddresses,
        on_iteration: IterationCallback | None,
        probe: Probe | None = None,
        on_rank_start: RankStartCallback | None = None,
        *,
        group: tuple[int, int] | None = None,
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        self.config = config
        self.rank = rank
        self.group = group if group is not None else (rank, config.ranks_per_node)
        self.addresses = addresses
        self.on_iteration = on_iteration
        self.probe = probe
        self.on_rank_start = on_rank_start
        self.strategy = get_strategy(config.strategy)
        self.device = rank_device(config.device, rank)
        self._placer = DevicePlacer(self.device)
        self._cache = (
            FeatureCache(config.feature_cache_mb << 20) if config.feature_cache_mb else None
        )
        self._store: PayloadStore | None = None
        self._resources = Resources(config)  # the store and the transport endpoints
        self.decoder = Decoder(allow_pickle=config.allow_pickle)
        # A rank that is a task of the tokenizer's process shares its ZMQ context, and
        # reaches the tokenizer's sockets over inproc:// (no I/O thread on the way).
        self._own_context = context is None
        self._zmq = zmq.asyncio.Context() if context is None else context
        self._results = self._zmq.socket(zmq.PUSH)
        self._inbox: zmq.asyncio.Socket | None = None
        self._inbox_now: zmq.Socket[Any] | None = None  # the inbox, read without waiting
        self._transport: Transport | None = None
        self._hosts: Transport | None = None  # entry rank of several hosts: to their agents
        self.refused = 0  # messages the entry rank refused (logged one by one)
        self._streams: dict[str, _Stream] = {}  # streamed answers in progress, by rid
        # Ranks that are tasks of one event loop (the memory transport) take turns on it.
        self._shares_loop = not transport_class(config.transport).cross_process

    async def run(self) -> None:
        """Join the group, say ready, then run iterations until shut down or a peer is lost."""
        try:
            await self._join()
            await self._run_start_hook()
            await self._send(RankReady(rank=self.rank, pid=os.getpid()))
            log.debug("scheduler rank %d joined its group", self.rank)
            iteration = 0
            while True:
                batch = await self._next_batch(iteration)
                await self._run_batch(batch)
                if batch.shutdown:
                    break
                iteration += 1
        finally:
            await self._resources.aclose()
            self._results.close()
            if self._inbox is not None:
                self._inbox.close()
            if self._own_context:
                self._zmq.term()

    async def _run_start_hook(self) -> None:
        """The server's per-rank set-up (its model load), before this rank says ready: the
        pipeline's ``start`` returns only once every rank's has finished."""
        if self.on_rank_start is None:
            return
        try:
            result = self.on_rank_start(self.rank, self.device)
            if inspect.isawaitable(result):
                await result
        except Exception as exc:
            raise ConfigError(
                f"on_rank_start failed on rank {self.rank}: {type(exc).__name__}: {exc}"
            ) from exc

    async def _join(self) -> None:
        self._results.setsockopt(zmq.LINGER, 2000)
        present_credentials(self._results, self.addresses.token)
        self._results.connect(self.addresses.results)
        if self.rank == 0:
            self._inbox = self._zmq.socket(zmq.PULL)
            self._inbox.setsockopt(zmq.LINGER, 0)
            present_credentials(self._inbox, self.addresses.token)
            self._inbox.connect(self.addresses.requests)
            self._inbox_now = zmq.Socket.shadow(self._inbox.underlying)
        # Attach to the payload store before saying ready: the tokenizer may then drop its
        # public name (the shm store unlinks its segment).
        self._store = await self._resources.attach_store(
            self.addresses.store,
            self.rank % self.config.ranks_per_node,  # its index among its host's consumers
            self.rank,
        )
        self.decoder = Decoder(allow_pickle=self.config.allow_pickle, store=self._store)
        index, size = self.group
        self._transport = await self._resources.open_group(
            index, size, self.addresses.group, self.addresses.token
        )
        if self.rank == 0 and self.addresses.to_hosts:
            self._hosts = await self._resources.open_host_fanout(self.addresses.token)

    # -- step 1: agree on the iteration's requests ------------------------------------------

    async def _next_batch(self, iteration: int) -> Batch:
        assert self._transport is not None
        if self.rank != 0:
            message = self.decoder.decode(await self._transport.recv())
            if not isinstance(message, Batch):
                raise CodecError(
                    f"expected a batch from the entry rank, got {type(message).__name__}"
                )
            return message
        batch, received = await self._collect(iteration)
        # Each request goes on to the other ranks as the frames it came in: decoded here only
        # to be checked and used, never encoded again (its tensors' references included).
        await self._transport.send(encode(batch, self._store, forward=received))
        if self._hosts is not None:
            await self._hosts.send(encode(batch))  # other hosts: the bytes inline
        return batch

    async def _collect(self, iteration: int) -> tuple[Batch, dict[int, Frames]]:
        """Entry rank: everything that arrived, after waiting briefly for a first message,
        and the frames each request came in (by the decoded request's ``id``)."""
        assert self._inbox is not None
        batch = Batch(iteration=iteration)
        received: dict[int, Frames] = {}
        # Streams in progress are stepped every iteration: no waiting for new requests then.
        timeout_ms = 0 if self._streams else int(self.config.idle_wait_ms)
        # What has arrived is taken at once (no future, no trip through the loop); only an
        # empty inbox is waited on, and the turn of the loop that sees a message wakes it.
        inbox = self._inbox_now
        assert inbox is not None
        while True:
            try:
                frames = inbox.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                if not timeout_ms or not await wait_readable(inbox, timeout_ms / 1000):
                    break
                timeout_ms = 0  # drain what is there, then go
                continue
            timeout_ms = 0
            buffers: Frames = [f.buffer for f in frames]
            try:
                message = self.decoder.decode(buffers)
                _check_request(message)
            except Exception as exc:
                # The request fails alone: answer it if its header names it, else drop what
                # is not a request of ours. It never enters a batch, so no rank waits for it.
                rid = Decoder.peek_rid(buffers)
                log.warning("entry rank refused a message (request %r): %s", rid, exc)
                self.refused += 1
                if rid is not None:
                    await self._send(ErrorOutput.from_exception(rid, exc))
                continue
            if isinstance(message, TokenizedGenerateReqInput):
                batch.requests.append(message)
                received[id(message)] = buffers
            elif isinstance(message, AbortReq):
                batch.aborted.append(message.rid)
            elif isinstance(message, Shutdown):
                batch.shutdown = True
        return batch, received

    # -- steps 2-4 ----------------------------------------------------------------------------

    async def _run_batch(self, batch: Batch) -> None:
        aborted = set(batch.aborted)
        ready: list[TokenizedGenerateReqInput] = []
        reports: list[ProbeReport] = []
        for req in batch.requests:
            if req.rid in aborted:
                if isinstance(req.mm_inputs, MultimodalInputs) and req.mm_inputs.cache:
                    # The tokenizer's cache mirror counted its operations: follow them.
                    await self._ready_inputs(req, req.mm_inputs)
                if self.rank == 0:  # the tokenizer's answer: its payloads may be reused
                    await self._send(
                        ErrorOutput(req.rid, ABORTED, "aborted", iteration=batch.iteration)
                    )
                continue
            outcome = await self.strategy.resolve(req, self)
            if isinstance(outcome, MultimodalInputs):
                outcome = await self._ready_inputs(req, outcome)
            if isinstance(outcome, ErrorOutput):
                outcome.iteration = batch.iteration
                await self._observe(req, batch.iteration, None, outcome, reports)
                if self.rank == 0:
                    log.info("request %r failed: %s: %s", req.rid, outcome.kind, outcome.message)
                    await self._send(outcome)
                continue
            req.mm_inputs = outcome
            await self._observe(req, batch.iteration, outcome, None, reports)
            ready.append(req)
        if batch.requests and self._shares_loop:
            # Ranks that share a loop would otherwise hold their inputs one after another's
            # model step and answers: this one steps aside once its inputs are ready, so
            # that every rank's are ready before any rank runs the step (as ranks in
            # processes of their own are, side by side).
            await asyncio.sleep(0)
        for report in reports:
            await self._send(report)

        outputs: Mapping[str, Any] = {}
        failed: ModelOutputError | None = None
        if ready:
            try:
                outputs = await run_callback(self.on_iteration, self.rank, batch.iteration, ready)
            except ModelOutputError as exc:
                failed = exc  # the answer as a whole is unusable: every request fails
        if ready and self.probe is not None:
            await self.probe.model_step(self.rank, batch.iteration, ready)
        for req in ready:
            await self._answer(req, batch.iteration, failed or outputs.get(req.rid))
        stepped = await self._step_streams(batch.iteration, aborted, batch.shutdown)
        if batch.requests or stepped:
            await self._send(RankProgress(rank=self.rank, iteration=batch.iteration))

    async def _answer(self, req: TokenizedGenerateReqInput, iteration: int, output: Any) -> None:
        """Check ``req``'s output; a whole one goes back now (from the entry rank), a stream
        joins the ones stepped once per iteration. A bad output fails ``req`` alone."""
        mm = req.mm_inputs
        pads = [i.pad_value for i in mm.mm_items] if isinstance(mm, MultimodalInputs) else []
        try:
            if isinstance(output, ModelOutputError):
                raise output
            checked = checked_output(req.rid, output)
        except Exception as exc:  # the model's failure on this request: it fails alone
            await self._model_failed(req.rid, iteration, exc)
            return
        if isinstance(checked, ModelOutput):
            if self.rank == 0:
                last = GenerateOutput(req.rid, checked.output_ids, checked.finish_reason, pads)
                last.iteration = iteration
                await self._send(last)
            return
        self._streams[req.rid] = _Stream(checked, GenerateOutput(req.rid, [], "stop", pads))

    async def _step_streams(self, iteration: int, aborted: set[str], shutdown: bool) -> bool:
        """One chunk of every stream in progress, as a decode step of every running request:
        a stream never holds up the requests behind it, and each iteration's batch still
        says everything every rank does. An aborted stream (or every one, at shutdown) is
        closed, its generator told so. Returns whether any stream was stepped or ended."""
        if not self._streams:
            return False
        for rid in [r for r in self._streams if r in aborted or shutdown]:
            stream = self._streams.pop(rid)
            await _close(stream.chunks)
            if self.rank == 0:  # the tokenizer's answer: the request's room may be reused
                await self._send(ErrorOutput(rid, ABORTED, "aborted", iteration=iteration))
        for rid, stream in list(self._streams.items()):
            try:
                chunk = await anext(stream.chunks)
            except StopAsyncIteration:
                del self._streams[rid]
                if self.rank == 0:
                    stream.last.iteration = iteration
                    await self._send(stream.last)
                continue
            except Exception as exc:  # raised by the model's generator: this request's
                del self._streams[rid]
                await self._model_failed(rid, iteration, exc)
                continue
            stream.last.finish_reason = chunk.finish_reason
            if self.rank == 0:
                await self._send(
                    GenerateOutput(rid, chunk.output_ids, "", iteration=iteration, finished=False)
                )
        return True

    async def _model_failed(self, rid: str, iteration: int, exc: BaseException) -> None:
        log.warning("rank %d: the model failed request %r: %r", self.rank, rid, exc)
        if self.rank == 0:
            error = ErrorOutput.from_exception(rid, exc)
            error.iteration = iteration
            await self._send(error)

    async def _ready_inputs(
        self, req: TokenizedGenerateReqInput, inputs: MultimodalInputs
    ) -> MultimodalInputs | ErrorOutput:
        """Cached features filled in, features on this rank's device, new ones cached."""
        ops, inserts = None, []
        if self._cache is not None and inputs.cache is not None:
            try:
                ops = CacheOps.from_tree(inputs.cache, len(inputs.mm_items))
                inserts = self._cache.fetch(inputs, ops)
            except (CacheMiss, CodecError) as exc:
                log.warning("rank %d: request %r: %s", self.rank, req.rid, exc)
                await self._send(CacheMissed(rid=req.rid, rank=self.rank))
                return ErrorOutput(req.rid, "CacheMiss", str(exc))
        outcome = await self._on_device(req, inputs)
        if ops is not None and self._cache is not None and isinstance(outcome, MultimodalInputs):
            self._cache.keep(outcome, inserts, ops)
        return outcome

    async def _on_device(
        self, req: TokenizedGenerateReqInput, inputs: MultimodalInputs
    ) -> MultimodalInputs | ErrorOutput:
        try:
            borrowed = self._store.borrowed if self._store is not None else None
            return await self._placer.place(inputs, borrowed)
        except Exception as exc:  # out of device memory, say: this request fails, alone
            log.warning("rank %d could not move %r to %s: %r", self.rank, req.rid, self.device, exc)
            return ErrorOutput.from_exception(req.rid, exc)

    # -- RankServices: what the strategy may use ---------------------------------------------

    async def build(self, req: TokenizedGenerateReqInput) -> MultimodalInputs | None:
        """Validate and hash ``req``'s raw inputs here, off the event loop (raises if bad)."""
        return await asyncio.to_thread(build_inputs, self.config, req)

    async def send_to_group(self, message: Message) -> None:
        """Entry rank: one message to every other rank (a strategy's own: the iteration's
        batch goes in ``_next_batch``). On this host its tensors go by store reference
        (those this rank resolved from the store as the same references); to each other
        host's agent, once, with the tensors' bytes inline."""
        assert self._transport is not None
        await self._transport.send(encode(message, self._store))
        if self._hosts is not None:
            await self._hosts.send(encode(message))

    async def recv_from_group(self) -> Message:
        """Other ranks: the entry rank's next message."""
        assert self._transport is not None
        return self.decoder.decode(await self._transport.recv())

    async def _observe(
        self,
        req: TokenizedGenerateReqInput,
        iteration: int,
        mm: MultimodalInputs | None,
        error: ErrorOutput | None,
        reports: list[ProbeReport],
    ) -> None:
        """The probe's look at ``req`` now that this rank holds its inputs; its report, if
        any, joins ``reports`` (sent once every request of the iteration is observed)."""
        if self.probe is None:
            return
        data = await self.probe.observe(self.rank, iteration, req, mm, error)
        if data is not None and self.probe.reports:
            reports.append(ProbeReport(rid=req.rid, rank=self.rank, data=data))

    async def _send(self, message: Message) -> None:
        await self._results.send_multipart(encode(message), copy=False)


def _check_request(message: Message) -> None:
    """What the entry rank accepts into a batch: the fields every rank will rely on, typed.

    The tokenizer validated the request already; this guards the loop every rank runs
    against a message that decodes but would fail later, on every rank at once.
    """
    if isinstance(message, TokenizedGenerateReqInput):
        ok = (
            isinstance(message.rid, str)
            and isinstance(message.input_ids, list)
            # Ids from an int64 frame are ints by construction; others are checked in C.
            and (
                isinstance(message.input_ids, Int64List)
                or set(map(type, message.input_ids)) <= {int}
            )
            and isinstance(message.sampling_params, dict)
            and isinstance(message.mm_inputs, MultimodalInputs | dict | None)
        )
        if not ok:
            raise CodecError(f"malformed request {message.rid!r}")
    elif isinstance(message, AbortReq):
        if not isinstance(message.rid, str):
            raise CodecError("malformed abort")
    elif not isinstance(message, Shutdown):
        raise CodecError(f"a {type(message).__name__} is not for the entry rank")


@dataclass
class _Stream:
    """A streamed answer in progress: its chunks to come and its last message."""

    chunks: AsyncIterator[ModelOutput]
    last: GenerateOutput


async def _close(chunks: AsyncIterator[ModelOutput]) -> None:
    aclose = getattr(chunks, "aclose", None)
    if aclose is None:
        return
    try:
        await aclose()
    except Exception as exc:  # the model's generator failing as it closes: nothing to answer
        log.warning("closing an aborted stream raised %r", exc)
