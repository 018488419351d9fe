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

Ranks find each other through ``rendezvous``, a directory every rank of the group can read
and only the server's user can write (one host): the entry rank leaves there, in a file of
mode 0600, where its payload store and transport are; the others wait for it up to
``startup_timeout_s``. A host store's tensors stay valid while the request object holds
them; their room is reused once every rank has dropped them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import orjson
import torch

from mmsched.codec import Decoder, encode
from mmsched.config import Config
from mmsched.devices import DevicePlacer, rank_device
from mmsched.errors import CodecError, ConfigError, NotRunning, PeerLost
from mmsched.frames import Frames
from mmsched.inputs import MultimodalInputs, materialize, validate_input_ids
from mmsched.messages import Batch, ErrorOutput, TokenizedGenerateReqInput
from mmsched.processes import process_started, same_process
from mmsched.scheduler import store_options
from mmsched.stores import PayloadStore, StoreOptions, store_class
from mmsched.transports import (
    GroupSpec,
    Transport,
    TransportStatistics,
    open_transport,
    transport_class,
)

log = logging.getLogger(__name__)

RENDEZVOUS_FILE = "mmsched-group.json"
"""What the entry rank leaves in the rendezvous directory for the other ranks."""

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
        store: PayloadStore | None,
        transport: Transport | None,
        rendezvous_file: Path | None,
    ) -> None:
        self.config = config
        self.rank = rank
        self._store = store
        self._transport = transport
        self._rendezvous_file = rendezvous_file  # the entry rank's, removed at close
        self._decoder = Decoder(allow_pickle=config.allow_pickle, store=store)
        self._placer = DevicePlacer(rank_device(config.device, rank))
        self._iteration = 0
        self._closed = False
        # Entry rank: the transport's address and private directory, removed at close.
        self._leftovers: tuple[str, Path] | None = None

    @classmethod
    async def join(cls, config: Config, rank: int, rendezvous: str | os.PathLike[str]) -> RankGroup:
        """Join the group of ``config.tp_size`` ranks that meet in ``rendezvous``.

        Raises:
            ConfigError: ``rank`` is outside the group, the config cannot serve a group of
                its own processes (the in-process ``memory`` transport) or spans hosts
                (``nnodes > 1``), or ``rendezvous`` is not a directory.
            PeerLost: the group was not complete within ``startup_timeout_s``.
        """
        if not 0 <= rank < config.tp_size:
            raise ConfigError(f"rank {rank} outside a group of tp_size={config.tp_size}")
        if config.nnodes > 1:
            raise ConfigError(
                "a RankGroup meets through a directory of one host: with nnodes > 1, run the "
                "ranks through Pipeline and mmsched rank (see Several hosts)"
            )
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
        if config.tp_size == 1:  # nobody to send to
            return cls(config, rank, None, None, None)
        if rank == 0:
            return await cls._open_entry(config, where / RENDEZVOUS_FILE)
        return await cls._open_receiver(config, rank, where / RENDEZVOUS_FILE)

    @classmethod
    async def _open_entry(cls, config: Config, announce: Path) -> RankGroup:
        announce.unlink(missing_ok=True)  # an earlier run's: its ranks must not find it
        kind = store_class(config.payload_store)
        kind.sweep_stale()
        store = await asyncio.to_thread(kind.create, _options(config, None))
        # The transport's sockets go in a private directory of their own, removed at close.
        private = Path(tempfile.mkdtemp(prefix="mmsched-", dir=announce.parent))
        group_address = transport_class(config.transport).new_address(private)
        token = secrets.token_hex(16)
        try:
            # The pid and its start time: a pid alone is reused by another process once an
            # earlier run's entry rank is gone, and its file would then look alive.
            started = process_started(os.getpid())
            _write_private(
                announce,
                {
                    "pid": os.getpid(),
                    "started": started,
                    "store": store.address,
                    "group": group_address,
                    # The group's secret: a process that cannot read this private file
                    # cannot join the group (its transport refuses a peer without it).
                    "token": token,
                },
            )
            transport = await _open_within(config, 0, group_address, token)
        except BaseException:
            announce.unlink(missing_ok=True)
            store.close()
            kind.remove_leftovers(store.address)
            transport_class(config.transport).remove_leftovers(group_address)
            shutil.rmtree(private, ignore_errors=True)
            raise
        store.consumers_attached()  # every receiver attached before it joined the transport
        log.info("rank group ready: entry rank, %d ranks", config.tp_size)
        group = cls(config, 0, store, transport, announce)
        group._leftovers = (group_address, private)
        return group

    @classmethod
    async def _open_receiver(cls, config: Config, rank: int, announce: Path) -> RankGroup:
        deadline = time.monotonic() + config.startup_timeout_s
        kind = store_class(config.payload_store)
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            found = _read_announcement(announce)
            if found is None:
                await asyncio.sleep(_POLL_S)
                continue
            store_address, group_address, token = found
            try:
                store = await asyncio.to_thread(
                    kind.attach, store_address, rank - 1, _options(config, rank)
                )
            except Exception as exc:  # an earlier run's file, or one not finished yet
                last_error = exc
                await asyncio.sleep(_POLL_S)
                continue
            try:
                transport = await _open_within(config, rank, group_address, token)
            except BaseException:
                store.close()
                raise
            log.info("rank group ready: rank %d of %d", rank, config.tp_size)
            return cls(config, rank, store, transport, None)
        raise PeerLost(
            f"rank {rank}: no entry rank announced a group in {announce.parent} within "
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
        if self._transport is not None:
            await self._transport.send(self._encode(iteration))
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
        req.mm_inputs = materialize(
            req.mm_inputs,
            hasher=self.config.hasher,
            input_len=len(req.input_ids),
            max_bytes=self.config.max_request_bytes,
        )

    async def receive(self) -> Iteration:
        """Other ranks: the entry rank's next iteration.

        Raises:
            NotRunning: closed, or called on rank 0.
            EndOfStream: the entry rank closed the group.
            PeerLost: nothing arrived within ``timeout_s`` (the entry rank is gone).
            CodecError: what arrived is not an iteration.
        """
        if self._closed or self.rank == 0 or self._transport is None:
            raise NotRunning("receive is for the open ranks other than 0")
        message = self._decoder.decode(await self._transport.recv())
        if not isinstance(message, Batch):
            raise CodecError(f"expected an iteration, got {type(message).__name__}")
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
        """Leave the group; on the entry rank, receivers then see ``EndOfStream``, and the
        payload store and the rendezvous file are removed. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._transport is not None:
            await self._transport.aclose()
        if self._store is not None:
            self._store.close()
            if self.rank == 0:
                store_class(self.config.payload_store).remove_leftovers(self._store.address)
        if self._rendezvous_file is not None:
            self._rendezvous_file.unlink(missing_ok=True)
        if self._leftovers is not None:
            address, private = self._leftovers
            transport_class(self.config.transport).remove_leftovers(address)
            shutil.rmtree(private, ignore_errors=True)

    async def __aenter__(self) -> RankGroup:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def _options(config: Config, rank: int | None) -> StoreOptions:
    # The entry rank is the producer; the other tp_size - 1 ranks are the consumers.
    return dataclasses.replace(store_options(config, rank), consumers=config.tp_size - 1)


async def _open_within(config: Config, rank: int, address: str, token: str) -> Transport:
    spec = GroupSpec(
        rank,
        config.tp_size,
        address,
        config.timeout_s,
        options=config.transport_options(token),
        # Ranks the server starts itself may come up far apart (one loads its model
        # first): the entry rank waits for the others as long as they wait for it.
        join_timeout_s=config.startup_timeout_s,
    )
    try:
        return await asyncio.wait_for(
            open_transport(config.transport, spec), config.startup_timeout_s
        )
    except TimeoutError:
        waited = f"ranks 1..{config.tp_size - 1}" if rank == 0 else "the entry rank (rank 0)"
        raise PeerLost(
            f"rank {rank}: {waited} did not join the group within "
            f"startup_timeout_s={config.startup_timeout_s}"
        ) from None


def _write_private(path: Path, data: dict[str, object]) -> None:
    # Written under a temporary name, then renamed: a reader never sees half a file.
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(orjson.dumps(data))
    tmp.rename(path)


def _read_announcement(path: Path) -> tuple[str | None, str, str] | None:
    """``(store address, group address, token)`` from a live entry rank's file, else
    ``None``.

    Live means the pid *and* its start time match a running process. Why not the pid alone:
    an earlier run's file outlives its entry rank, and the pid is soon another process's,
    so the file would send a receiver to a dead address. Why not a nonce: a receiver has
    nothing to compare it with. Why not probing the address: a ZMQ connect succeeds
    whether or not anyone listens. The kernel's start time of the pid is known to every
    process of the host, and differs between two processes that shared a pid.
    """
    try:
        data = orjson.loads(path.read_bytes())
        pid, started, store, group = data["pid"], data["started"], data["store"], data["group"]
        token = data["token"]
    except (OSError, orjson.JSONDecodeError, KeyError, TypeError):
        return None
    if type(pid) is not int or pid <= 0 or not isinstance(group, str):
        return None
    if not isinstance(token, str):
        return None
    if type(started) is not float or not same_process(pid, started):
        return None
    if store is not None and not isinstance(store, str):
        return None
    return store, group, token
