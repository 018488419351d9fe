"""The tokenizer stage: turns processor output into requests and routes results back.

Under the ``tokenizer`` strategy this is where [`MultimodalInputs.from_dict`][] runs, once
per request, in a pool of worker threads: hashing releases the GIL, so the event loop stays
responsive and several requests build at once. A small request (features under
[`INLINE_MAX_BYTES`][mmsched.tokenizer.INLINE_MAX_BYTES]), or a mid-sized one (under
[`IDLE_INLINE_MAX_BYTES`][mmsched.tokenizer.IDLE_INLINE_MAX_BYTES]) that finds no other
request in flight, is prepared on the event loop instead: its work is less than the hop to
a thread and back, or (idle) nothing else waits for the loop. Either way it is validated
first, then placed in the payload store through its own
[`Placement`][mmsched.stores.base.Placement] and encoded once. A malformed input raises
[`InvalidMultimodalInput`][] to its own caller and never reaches a rank.

Results from the ranks (outputs, errors and, when enabled, per-rank reports) arrive on one
socket and resolve the caller's future. That socket is a boundary where foreign bytes enter:
a frame that does not decode, or decodes to nonsense, is logged and counted and never stops
the router; if it names a request still waiting, that request fails with the error. Should
the router stop all the same, every waiting and later caller fails with [`PeerLost`][]
at once instead of waiting for an answer that cannot come.

Backpressure releases are synchronous: a caller cancelled at any point gives its bytes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import zmq
import zmq.asyncio

from mmsched.cache import CacheMirror, CacheStats, Sequencer
from mmsched.codec import Decoder, encode
from mmsched.config import Config
from mmsched.errors import (
    ArenaFull,
    CodecError,
    InvalidMultimodalInput,
    MmschedError,
    Overloaded,
    PeerLost,
    RequestFailed,
)
from mmsched.frames import Frames, Int64List, frames_nbytes
from mmsched.inputs import MultimodalInputs, validate_input_ids
from mmsched.messages import (
    ABORTED,
    AbortReq,
    CacheMissed,
    ErrorOutput,
    GenerateOutput,
    NodeStatus,
    ProbeReport,
    RankProgress,
    RankReady,
    Shutdown,
    TokenizedGenerateReqInput,
)
from mmsched.runtime.building import build_inputs
from mmsched.stores import PayloadStore
from mmsched.strategies import get_strategy

if TYPE_CHECKING:
    from mmsched.hosts import Claim

log = logging.getLogger(__name__)


@dataclass
class RequestTrace:
    """One request's result, when it was submitted (``time.monotonic()``), what every
    rank's [probe][mmsched.probes] reported of it (none without a probe), and whether it
    was prepared (validated, hashed, placed and encoded) on the event loop rather than in a
    worker thread (see [`INLINE_MAX_BYTES`][mmsched.tokenizer.INLINE_MAX_BYTES])."""

    output: GenerateOutput
    created_at: float
    reports: list[ProbeReport] = field(default_factory=list)
    prepared_on_loop: bool = False


INLINE_MAX_BYTES = 256 << 10
"""Requests with fewer feature bytes than this (and at most ``_INLINE_MAX_IDS`` token ids)
are prepared on the event loop: validating, hashing (about 0.05 ms for 256 KiB of BLAKE3 on
one core) and copying them costs less than the hop to a worker thread and back."""
_INLINE_MAX_IDS = 4096  # validating an id costs about as much as hashing 100 bytes

IDLE_INLINE_MAX_BYTES = 2 << 20
"""Requests with fewer feature bytes than this are also prepared on the event loop when no
other request is in flight (sent and unanswered, or in a worker thread): nothing then waits
for the loop, and the hops to a worker thread and back cost as much as hashing and copying
a megabyte. Under load they go to the worker threads, which hash several requests at once."""

# A request planned by the cache mirror waits for the ones planned before it. Each of those
# is sent, or gives its turn back when it fails, but may first wait up to timeout_s for room
# in the payload store (an arena the concurrent requests fill): the wait is that bound plus
# this slack; past it they are skipped and the caches start over. (A 5 s bound alone was
# passed by requests waiting for room under load, and emptied the caches for nothing.)
_TURN_SLACK_S = 5.0


@dataclass
class _Prepared:
    frames: Frames
    placed: list[Any]  # payload-store room, held until every rank is done with it
    ticket: int | None  # its turn to be sent (feature cache), or None


class _NoRoomYet(Exception):
    """A request built and planned by the cache mirror on the event loop found no room in
    the payload store: its plan and ``ticket`` stay for a worker thread to place it."""

    def __init__(self, ticket: int, error: ArenaFull) -> None:
        super().__init__(str(error))
        self.ticket, self.error = ticket, error


@dataclass
class _Pending:
    future: asyncio.Future[RequestTrace]
    created_at: float
    output: GenerateOutput | None = None
    reports: list[ProbeReport] = field(default_factory=list)
    # A streamed answer: the ids of its chunks so far, where each chunk is also handed on
    # (``submit(stream=...)``), and when the last one came (it keeps the request alive).
    streamed: list[int] = field(default_factory=list)
    stream: Callable[[GenerateOutput], None] | None = None
    heard_at: float = 0.0
    prepared_on_loop: bool = False


class InflightBudget:
    """Feature bytes of requests in flight, bounded by ``limit`` (``None``: unbounded).

    [`release`][mmsched.tokenizer.InflightBudget.release] is synchronous, so that no
    cancellation can skip it: a caller cancelled while waiting for a lock it needed to give
    bytes back would otherwise leak them, and enough leaked bytes answer every later request
    with [`Overloaded`][].
    """

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.used = 0
        self._waiters: list[asyncio.Future[None]] = []

    async def acquire(self, nbytes: int, *, reject: bool, wait_s: float) -> None:
        """Count ``nbytes`` in; at the limit, raise (``reject``) or wait up to ``wait_s``."""
        limit = self.limit
        if limit is None:
            self.used += nbytes
            return
        if nbytes > limit:
            raise Overloaded(
                f"a request of {nbytes} bytes can never fit max_inflight_mb={limit >> 20}"
            )
        if self.used + nbytes > limit and reject:
            log.warning("backpressure: rejected %d bytes, %d in flight", nbytes, self.used)
            raise Overloaded(
                f"{self.used} bytes in flight; {nbytes} more would pass "
                f"max_inflight_mb={limit >> 20} (backpressure='reject')"
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while self.used + nbytes > limit:
            remaining = deadline - loop.time()
            if remaining <= 0:
                log.warning("backpressure: no room for %d bytes within %s s", nbytes, wait_s)
                raise Overloaded(
                    f"no room for {nbytes} bytes within {wait_s} s: {self.used} bytes in "
                    f"flight (max_inflight_mb={limit >> 20}); a rank is slow"
                )
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, remaining)
            except TimeoutError:
                pass  # the loop re-checks room and the deadline
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
        self.used += nbytes

    def release(self, nbytes: int) -> None:
        """Give ``nbytes`` back and wake every waiter (each re-checks for room)."""
        self.used -= nbytes
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


class TokenizerStage:
    """Sends requests to the entry rank and awaits their results.

    Args:
        config: the pipeline's config.
        requests: PUSH socket connected to the entry rank.
        results: PULL socket every rank pushes results to.
        store: the payload store the requests' tensors go through.
        probed: every rank sends a probe report per request; a request's result waits
            for all of them.
    """

    def __init__(
        self,
        config: Config,
        requests: zmq.asyncio.Socket,
        results: zmq.asyncio.Socket,
        store: PayloadStore,
        *,
        probed: bool = False,
    ) -> None:
        self.config = config
        self._store = store
        self._reports_per_request = config.tp_size if probed else 0
        self.strategy = get_strategy(config.strategy)
        self._requests = requests
        self._results = results
        self._decoder = Decoder(allow_pickle=config.allow_pickle)
        self._pool = ThreadPoolExecutor(config.tokenizer_workers, thread_name_prefix="mmsched-tok")
        self._pending: dict[str, _Pending] = {}
        self._preparing = 0  # requests in a worker thread now (not pending yet)
        self._ready_ranks: dict[int, int] = {}
        self._ranks_ready = asyncio.Event()
        self._failure: MmschedError | None = None
        self._budget = InflightBudget(
            None if config.max_inflight_mb is None else config.max_inflight_mb << 20
        )
        self.rejected = Counter[str]()  # result frames dropped, by reason
        # Backpressure bookkeeping: the last iteration each rank finished, and the bytes of
        # answered requests still held until every rank has passed their iteration.
        self._progress = dict.fromkeys(range(config.tp_size), -1)
        self._held: list[tuple[int, int]] = []
        # Payload-store room of requests sent: by request id, one entry per send awaiting
        # the entry rank's answer (in send order), then by the iteration every rank must
        # finish before the room is reused (see PayloadStore.placing).
        self._unsettled: dict[str, deque[list[Any]]] = {}
        self._settling: list[tuple[int, list[Any]]] = []
        self._mirror = (
            CacheMirror(config.feature_cache_mb << 20) if config.feature_cache_mb else None
        )
        self._sequencer = self._mirror.sequencer if self._mirror is not None else Sequencer()
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop requests come from
        # Several hosts: an answer counts once every rank has run its iteration (a host that
        # never got it must not let it through), and each other host's last heartbeat.
        self._answers_wait_for_ranks = config.nnodes > 1
        self._answers_held: set[str] = set()  # rids whose answer waits for a rank's progress
        self.node_status: dict[int, NodeStatus] = {}
        self.node_seen: dict[int, float] = {}
        self.node_failure: PeerLost | None = None  # a host's own report that it stopped
        # Several hosts: the join port's word on a heartbeat (the claim of the agent it
        # comes from, or None for a process that holds no node's slot).
        self.claim_of: Callable[[NodeStatus], Claim | None] | None = None
        self.bytes_sent = 0  # bytes of every request sent to the entry rank (the requests leg)

    def ranks_not_ready(self) -> list[int]:
        """The ranks that have not reported ready yet."""
        return [r for r in range(self.config.tp_size) if r not in self._ready_ranks]

    async def wait_ranks_ready(self, timeout: float) -> dict[int, int]:
        """Pids of every rank once all have joined; raises if a rank died first."""
        await asyncio.wait_for(self._ranks_ready.wait(), timeout)
        if self._failure is not None:
            raise self._failure
        return dict(self._ready_ranks)

    async def submit(
        self,
        rid: str,
        input_ids: list[int],
        mm_inputs: MultimodalInputs | Mapping[str, Any] | None = None,
        sampling_params: dict[str, Any] | None = None,
        stream: Callable[[GenerateOutput], None] | None = None,
    ) -> RequestTrace:
        """Send one request and wait for its result (every id, however it was streamed).

        ``stream``, if given, is called with each streamed chunk as it arrives (on the
        event loop; it must not block); the last chunk is in the result.

        Raises:
            InvalidMultimodalInput: the inputs are malformed (whichever process found it).
            RequestFailed: a rank failed the request for another reason.
            Overloaded: ``max_inflight_mb`` is reached (see ``backpressure``), or the
                payload store had no room in time ([`ArenaFull`][mmsched.errors.ArenaFull]).
            PeerLost: a rank died; the pipeline is unusable.
            CodecError: a value in the request cannot be encoded.
            PeerLost: no answer came within ``timeout_s`` of sending (this request alone).
        """
        if self._failure is not None:
            raise self._failure
        if not isinstance(rid, str) or rid in self._pending:
            raise InvalidMultimodalInput("rid", f"{rid!r} is not a string, or already in flight")
        nbytes = _feature_bytes(mm_inputs)
        await self._budget.acquire(
            nbytes,
            reject=self.config.backpressure == "reject",
            wait_s=self.config.backpressure_wait_s,
        )
        held = False
        try:
            trace = await self._submit(rid, input_ids, mm_inputs, sampling_params, stream, nbytes)
            if trace.output.iteration > min(self._progress.values()):
                self._held.append((trace.output.iteration, nbytes))  # a rank is still behind
                held = True
            return trace
        finally:
            if not held:
                self._budget.release(nbytes)

    async def _answer_of(self, pending: _Pending) -> RequestTrace:
        """``pending``'s result; raises ``TimeoutError`` after ``timeout_s`` with no word."""
        pending.heard_at = time.monotonic()
        while True:
            wait_s = pending.heard_at + self.config.timeout_s - time.monotonic()
            if wait_s <= 0:
                raise TimeoutError
            done, _ = await asyncio.wait((pending.future,), timeout=wait_s)
            if done:
                return pending.future.result()

    def _rank_progressed(self, message: RankProgress) -> None:
        if message.rank not in self._progress or not isinstance(message.iteration, int):
            raise CodecError(f"progress of unknown rank {message.rank!r}")
        self._progress[message.rank] = max(self._progress[message.rank], message.iteration)
        done = min(self._progress.values())
        if any(it <= done for it, _ in self._settling):
            for it, placed in self._settling:
                if it <= done:
                    self._store.settle(placed)
            self._settling = [(it, p) for it, p in self._settling if it > done]
        for rid in list(self._answers_held):
            self._answers_held.discard(rid)
            pending = self._pending.get(rid)
            if pending is not None:
                self._finish_if_complete(rid, pending)
        behind = [(it, n) for it, n in self._held if it > done]
        if len(behind) != len(self._held):
            freed = sum(n for it, n in self._held if it <= done)
            self._held = behind
            self._budget.release(freed)

    @property
    def inflight_bytes(self) -> int:
        """Feature bytes of requests sent and not yet released by every rank."""
        return self._budget.used

    async def _submit(
        self,
        rid: str,
        input_ids: list[int],
        mm_inputs: MultimodalInputs | Mapping[str, Any] | None,
        sampling_params: dict[str, Any] | None,
        stream: Callable[[GenerateOutput], None] | None,
        nbytes: int,
    ) -> RequestTrace:
        created_at = time.monotonic()
        req = TokenizedGenerateReqInput(
            rid=rid,
            input_ids=input_ids,  # checked and made a list of ints in _prepare
            sampling_params=dict(sampling_params or {}),
            mm_inputs=dict(mm_inputs) if isinstance(mm_inputs, Mapping) else mm_inputs,
        )
        loop = self._loop = asyncio.get_running_loop()
        prepared = None
        idle = not self._pending and not self._preparing
        small = nbytes < INLINE_MAX_BYTES or (idle and nbytes < IDLE_INLINE_MAX_BYTES)
        planned: int | None = None  # the cache mirror's ticket of a plan kept for the thread
        if small and _id_count(input_ids) <= _INLINE_MAX_IDS:
            # Less work than the hop to a worker thread and back (a wake-up each way, and
            # the GIL handed over twice), or nothing else waiting for the loop: done here,
            # on the loop, without waiting for room.
            given = req.input_ids, req.mm_inputs
            try:
                prepared = self._prepare(req, inline=True)
            except _NoRoomYet as no_room:
                if self.config.backpressure == "reject":
                    self._abandon_ticket(no_room.ticket)  # never sent: the caches start over
                    raise no_room.error from None
                # Planned by the cache mirror, then no room to place it: the plan and its
                # turn stay (undoing them would empty every rank's cache), and a worker
                # thread places the planned request, waiting for room.
                planned = no_room.ticket
            except ArenaFull:
                if self.config.backpressure == "reject":
                    raise
                # No room now: a worker thread may wait for it (the loop gives it back),
                # and starts again from the request as it was given.
                req.input_ids, req.mm_inputs = given
        on_loop = prepared is not None
        if prepared is None:
            # Building, hashing and copying into shared memory release the GIL: worker
            # threads keep the event loop free for other requests.
            job = loop.run_in_executor(self._pool, self._prepare, req, False, planned)
            self._preparing += 1
            try:
                prepared = await asyncio.shield(job)
            except asyncio.CancelledError:
                job.add_done_callback(self._drop_unsent)  # the thread finishes on its own
                raise
            finally:
                self._preparing -= 1
        frames, placed = prepared.frames, prepared.placed
        try:
            if prepared.ticket is not None:  # the cache mirror planned it: go in that order
                in_turn = await self._sequencer.wait_turn(
                    prepared.ticket, self.config.timeout_s + _TURN_SLACK_S
                )
                if not in_turn and self._mirror is not None:
                    log.warning("an earlier request never went out: the caches start over")
                    self._mirror.reset()
            if self._failure is not None:  # a rank died while the inputs were being built
                raise self._failure
        except BaseException:
            self._drop_unsent(prepared)
            raise
        pending = _Pending(
            loop.create_future(), created_at, stream=stream, prepared_on_loop=on_loop
        )
        self._pending[rid] = pending
        if placed:
            self._unsettled.setdefault(rid, deque()).append(placed)
        # A PUSH to a dead entry rank blocks forever: send in the background and wait on the
        # result, which the watchdog fails if a rank dies.
        sending = asyncio.ensure_future(self._requests.send_multipart(frames, copy=False))
        self.bytes_sent += frames_nbytes(frames)
        if prepared.ticket is not None:
            self._sequencer.done(prepared.ticket)  # on its way: the next one may go
        try:
            # The answer comes in the iteration after the request reaches the entry rank, and
            # no iteration may take longer than timeout_s: past that, nobody is answering.
            # A streamed answer may take longer as a whole, as long as chunks keep coming.
            return await self._answer_of(pending)
        except TimeoutError:
            self._send_nowait(encode(AbortReq(rid=rid)))
            log.warning("no answer to request %r within timeout_s=%s", rid, self.config.timeout_s)
            raise PeerLost(
                f"no answer to request {rid!r} within timeout_s={self.config.timeout_s}"
            ) from None
        except asyncio.CancelledError:
            self._send_nowait(encode(AbortReq(rid=rid)))
            raise
        finally:
            sending.cancel()
            self._pending.pop(rid, None)
            if placed and not (sending.done() and not sending.cancelled()):
                self._settle_unsent(rid, placed)  # it never went out: nobody will read it

    def _prepare(
        self, req: TokenizedGenerateReqInput, inline: bool = False, planned: int | None = None
    ) -> _Prepared:
        """The request's frames, inputs built if the strategy says so (a worker thread, or
        the loop for a small request: ``inline``), the payload-store room they hold (until
        settled) and, with a feature cache, its turn to be sent. ``planned``: the ticket of
        a request the loop already built and planned (it found no room to place it): only
        its placement and encoding are left.

        Raises:
            _NoRoomYet: ``inline``, planned, and no room to place it now.
        """
        ticket = planned
        # Placed through this request's own handle; on the loop it must not wait for room.
        placement = self._store.placement(wait=not inline)
        try:
            with placement:
                if planned is None:
                    req.input_ids = validate_input_ids(req.input_ids)
                    # A worker thread starts the features' copy into the store once they
                    # are valid, so that it overlaps the hash prepare() computes over the
                    # same bytes.
                    self.strategy.prepare(
                        req, lambda r: self._build(r, None if inline else placement.stage)
                    )
                    if self._mirror is not None and isinstance(req.mm_inputs, MultimodalInputs):
                        # Hits travel as their key only; the order of plans is the order
                        # of sends, so that every rank applies them as the mirror did.
                        req.mm_inputs, ticket = self._mirror.plan(req.mm_inputs)
                frames = encode(req, placement)
        except ArenaFull as exc:
            self._store.settle(placement.placed, sent=False)  # nothing of it is sent
            if ticket is not None and inline:
                raise _NoRoomYet(ticket, exc) from exc  # the plan is kept: see _submit
            if ticket is not None and self._loop is not None:
                self._loop.call_soon_threadsafe(self._abandon_ticket, ticket)
            raise
        except BaseException:
            self._store.settle(placement.placed, sent=False)  # nothing of it is sent
            if ticket is not None and inline:
                self._abandon_ticket(ticket)  # on the loop: before anything is planned again
            elif ticket is not None and self._loop is not None:
                self._loop.call_soon_threadsafe(self._abandon_ticket, ticket)
            raise
        return _Prepared(frames, placement.placed, ticket)

    def _drop_unsent(self, prepared: _Prepared | asyncio.Future[_Prepared]) -> None:
        """A prepared request that will not be sent: its room and its turn go back."""
        if isinstance(prepared, asyncio.Future):
            if prepared.cancelled() or prepared.exception() is not None:
                return
            prepared = prepared.result()
        self._store.settle(prepared.placed, sent=False)
        if prepared.ticket is not None:
            self._abandon_ticket(prepared.ticket)

    def _abandon_ticket(self, ticket: int) -> None:
        # The ranks will never apply what the mirror planned for it: start the caches over.
        assert self._mirror is not None
        self._mirror.reset()
        self._sequencer.done(ticket)

    def cache_stats(self) -> CacheStats | None:
        """The feature cache's counters (the mirror's, which every rank's equals), or
        ``None`` without a cache."""
        return self._mirror.stats() if self._mirror is not None else None

    def _cache_missed(self, message: CacheMissed) -> None:
        log.warning(
            "rank %s missed a cached feature of %r: resynchronizing", message.rank, message.rid
        )
        if self._mirror is not None:
            self._mirror.reset()
        pending = self._pending.get(message.rid)
        if pending is not None and not pending.future.done():
            pending.future.set_exception(
                RequestFailed(
                    message.rid, "CacheMiss", f"rank {message.rank} missed a cached feature"
                )
            )

    def _settle_unsent(self, rid: str, placed: list[Any]) -> None:
        sends = self._unsettled.get(rid)
        if sends is not None and placed in sends:
            sends.remove(placed)
            if not sends:
                del self._unsettled[rid]
        self._store.settle(placed, sent=False)

    def _answered(self, rid: str, iteration: int) -> None:
        """The entry rank answered ``rid`` in ``iteration`` (-1: it never entered a batch):
        its room is reused once every rank has finished that iteration."""
        sends = self._unsettled.get(rid)
        if not sends:
            return
        placed = sends.popleft()
        if not sends:
            del self._unsettled[rid]
        if iteration <= min(self._progress.values()):
            self._store.settle(placed)
        else:
            self._settling.append((iteration, placed))

    def _build(
        self,
        req: TokenizedGenerateReqInput,
        on_valid: Callable[[list[torch.Tensor]], None] | None = None,
    ) -> MultimodalInputs | None:
        return build_inputs(self.config, req, on_valid)

    def shutdown(self) -> None:
        """Ask the ranks to exit after their current iteration, if the entry rank's
        connection can take it at once (it may be dead: this never waits)."""
        self._send_nowait(encode(Shutdown()))

    async def shutdown_when_connected(self, wait_s: float) -> bool:
        """Ask the ranks to exit, waiting up to ``wait_s`` for the entry rank's connection.

        Right after start the entry rank may be ready while its connection is still in its
        handshake: a message sent without waiting would be dropped, and the ranks would
        run on until killed. Returns whether the request went out.
        """
        try:
            await asyncio.wait_for(self._requests.send_multipart(encode(Shutdown())), wait_s)
        except (TimeoutError, zmq.ZMQError):
            return False
        return True

    def _send_nowait(self, frames: list[Any]) -> None:
        # Control messages must never wait on an entry rank that may be gone.
        # (The asyncio socket would report zmq.Again through a future; its synchronous shadow
        # raises it here, where it can be dropped.)
        with contextlib.suppress(zmq.Again):
            zmq.Socket.shadow(self._requests.underlying).send_multipart(frames, flags=zmq.NOBLOCK)

    def fail_all(self, error: MmschedError) -> None:
        """Fail every pending request and every later one with ``error`` (a rank died).

        The first failure is the one callers see: what follows from it (the other ranks
        stopping, the background work ending) does not replace it.
        """
        if self._failure is None:
            self._failure = error
        self._ranks_ready.set()  # wake a start() still waiting for ranks
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.set_exception(self._failure)

    def close(self) -> None:
        """Stop the worker threads (the pipeline has stopped routing results)."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def route_results(self) -> None:
        """Route results from the ranks to the requests waiting for them, until cancelled.

        Raises:
            PeerLost: the results socket itself failed; nothing more can arrive.
        """
        # What has arrived is taken at once through a plain view of the socket (no future
        # per message); only an empty socket is waited on, through the asyncio socket,
        # whose closing fails the wait.
        now: zmq.Socket[Any] = zmq.Socket.shadow(self._results.underlying)
        while True:
            try:
                try:
                    frames = now.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    frames = await self._results.recv_multipart(copy=False)
            except zmq.ZMQError as exc:
                raise PeerLost(f"the tokenizer's result router failed: {exc}") from exc
            buffers = [f.buffer for f in frames]
            try:
                self._route(self._decoder.decode(buffers))
            except Exception as exc:
                # Foreign bytes: this frame alone is dropped (its request, if it names one
                # still waiting, fails with the error); the router goes on.
                self.rejected[type(exc).__name__] += 1
                rid = Decoder.peek_rid(buffers)
                log.warning("dropped a result frame (request %r): %s", rid, exc)
                pending = self._pending.get(rid) if rid is not None else None
                if pending is not None and not pending.future.done():
                    pending.future.set_exception(
                        RequestFailed(rid or "", type(exc).__name__, f"bad result: {exc}")
                    )

    def _route(self, message: object) -> None:
        if isinstance(message, NodeStatus):
            self._node_reported(message)
            return
        if isinstance(message, CacheMissed):
            self._cache_missed(message)
            return
        if isinstance(message, RankProgress):
            self._rank_progressed(message)
            return
        if isinstance(message, RankReady):
            if message.rank not in self._progress:
                raise CodecError(f"ready message of unknown rank {message.rank!r}")
            self._ready_ranks[message.rank] = message.pid
            if len(self._ready_ranks) == self.config.tp_size:
                self._ranks_ready.set()
            return
        rid = getattr(message, "rid", None)
        final = not isinstance(message, GenerateOutput) or message.finished is not False
        if isinstance(message, GenerateOutput | ErrorOutput) and isinstance(rid, str) and final:
            # Settled before the message is checked: a malformed final answer still ends
            # its request (which fails), and its room must not be held for ever.
            iteration = message.iteration if type(message.iteration) is int else -1
            self._answered(rid, iteration)
            if isinstance(message, ErrorOutput) and message.kind == ABORTED:
                return  # the entry rank's receipt of an abort: nobody waits for it
        if isinstance(message, GenerateOutput):
            _check_output(message)
            if not message.finished:
                self._streamed(message)
                return
        pending = self._pending.get(rid) if isinstance(rid, str) else None
        if pending is None or pending.future.done():
            return  # a late report of a request that already failed or was cancelled
        if isinstance(message, ErrorOutput):
            pending.future.set_exception(_error_from(message))
            return
        if isinstance(message, GenerateOutput):
            if pending.streamed:  # the result holds every id, the last chunk's too
                pending.streamed.extend(message.output_ids)
                message.output_ids = pending.streamed
            pending.output = message
        elif isinstance(message, ProbeReport):
            pending.reports.append(message)
        else:
            raise CodecError(f"a {type(message).__name__} is not a result")
        assert isinstance(rid, str)  # it named a pending request
        self._finish_if_complete(rid, pending)

    def _streamed(self, chunk: GenerateOutput) -> None:
        """A chunk of a streamed answer: kept for the result, handed on to the stream."""
        pending = self._pending.get(chunk.rid)
        if pending is None or pending.future.done():
            return
        pending.heard_at = time.monotonic()
        pending.streamed.extend(chunk.output_ids)
        if pending.stream is not None:
            pending.stream(chunk)

    def _finish_if_complete(self, rid: str, pending: _Pending) -> None:
        output = pending.output
        if output is None or pending.future.done():
            return
        if len(pending.reports) < self._reports_per_request:
            return
        if self._answers_wait_for_ranks and output.iteration > min(self._progress.values()):
            self._answers_held.add(rid)  # looked at again when a rank reports progress
            return
        pending.future.set_result(
            RequestTrace(output, pending.created_at, pending.reports, pending.prepared_on_loop)
        )

    def _node_reported(self, message: NodeStatus) -> None:
        if not (type(message.node) is int and 0 < message.node < self.config.nnodes):
            raise CodecError(f"status of unknown node {message.node!r}")
        claim = self.claim_of(message) if self.claim_of is not None else None
        if self.claim_of is not None and claim is None:
            # An agent whose claim lapsed (another took the slot) or a stranger with the
            # token: it speaks for no node.
            log.info("ignored a status of node %d from pid %r", message.node, message.pid)
            return
        if message.failed is None and claim is not None and not claim.joined:
            return  # alive, still starting its ranks: silence here is not a lost host yet
        self.node_status[message.node] = message
        self.node_seen[message.node] = time.monotonic()
        if message.failed is not None and self.node_failure is None:
            self.node_failure = PeerLost(f"node {message.node} stopped: {message.failed}")
            self.fail_all(self.node_failure)


def _feature_bytes(mm_inputs: MultimodalInputs | Mapping[str, Any] | None) -> int:
    """Bytes of feature tensors a request carries; 0 where the input is too malformed to tell
    (validation will reject it)."""
    if isinstance(mm_inputs, MultimodalInputs):
        return mm_inputs.nbytes
    total = 0
    for feature in _raw_features(mm_inputs):
        if isinstance(feature, torch.Tensor):
            total += feature.numel() * feature.element_size()
        elif isinstance(feature, np.ndarray):
            total += feature.nbytes
    return total


def _id_count(input_ids: Any) -> int:
    """How many token ids a request carries (validation tells whether they are ids)."""
    try:
        return len(input_ids)
    except TypeError:
        return 0


def _raw_features(mm_inputs: Mapping[str, Any] | None) -> list[Any]:
    if not isinstance(mm_inputs, Mapping) or not isinstance(mm_inputs.get("mm_items"), list):
        return []
    return [item.get("feature") for item in mm_inputs["mm_items"] if isinstance(item, Mapping)]


def _error_from(message: ErrorOutput) -> MmschedError:
    # Malformed input is the same exception whichever process found it (tokenizer or rank).
    if message.kind == InvalidMultimodalInput.__name__ and message.field is not None:
        return InvalidMultimodalInput(message.field, message.message)
    return RequestFailed(message.rid, message.kind, message.message)


def _check_output(message: GenerateOutput) -> None:
    """A result frame is foreign data: its ids must be ints (a chunk's field types too)."""
    if not isinstance(message.rid, str) or not isinstance(message.finished, bool):
        raise CodecError("an output with a bad rid or finished flag")
    if not isinstance(message.finish_reason, str) or not isinstance(message.pad_values, list):
        raise CodecError(f"output of request {message.rid!r}: a bad finish reason or pad values")
    ids = message.output_ids
    if isinstance(ids, Int64List):
        return  # decoded from an int64 frame: ints by construction
    if not isinstance(ids, list) or not all(type(i) is int for i in ids):
        raise CodecError(f"output of request {message.rid!r}: ids that are not a list of ints")
