"""The embedding API: a tokenizer stage in the caller's process and N scheduler rank processes.

```python
async with Pipeline(Config(tp_size=4, strategy="tokenizer")) as pipeline:
    output = await pipeline.generate("req-1", input_ids, processor_output)
```

Ranks are started with the ``spawn`` method (safe with torch and threads), form a group over
the configured transport, and each calls ``on_iteration(rank, iteration, requests)`` with
the iteration's typed requests. A watchdog fails every pending request with
[`PeerLost`][] as soon as a rank process dies (or with the error a rank left behind, such
as a [`ConfigError`][] raised while it started). Closing the pipeline asks the ranks to
exit, waits ``timeout_s`` for them, then kills any left, and removes the run's private
directory (the IPC endpoints); a ``start()`` that fails closes what it had started.

The tokenizer's two sockets are ``ipc://`` files of mode 0600 in that 0700 directory, and
they accept only peers that present the run's secret token in the ZMQ handshake (PLAIN
credentials checked by a ZAP handler): another process cannot answer, steal or forge
requests by connecting to them.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import secrets
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from multiprocessing.process import BaseProcess
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
import zmq
import zmq.asyncio
from zmq.auth.thread import ThreadAuthenticator

from mmsched import shm
from mmsched.config import Config
from mmsched.errors import ConfigError, MmschedError, PeerLost
from mmsched.inputs import MultimodalInputs
from mmsched.messages import GenerateOutput
from mmsched.scheduler import (
    CREDENTIALS_USER,
    IterationCallback,
    RankAddresses,
    rank_main,
    read_failure,
)
from mmsched.strategies import get_strategy
from mmsched.tokenizer import RequestTrace, TokenizerStage
from mmsched.transports import CROSS_PROCESS, transport_class

log = logging.getLogger(__name__)

RUN_DIR_PREFIX = "mmsched-"
"""Run directories are ``mmsched-<pid of the tokenizer>-<random>`` in the temp directory."""

_WATCHDOG_PERIOD_S = 0.2
# A group that never came up all the way cannot be told to stop: its ranks are killed after
# this grace rather than after timeout_s.
_STARTUP_FAILURE_GRACE_S = 1.0


class Pipeline:
    """Tokenizer stage plus ``config.tp_size`` scheduler rank processes."""

    def __init__(self, config: Config, *, on_iteration: IterationCallback | None = None) -> None:
        if config.transport not in CROSS_PROCESS:
            raise ConfigError(
                f"transport {config.transport!r} cannot reach rank processes; "
                f"use one of: {', '.join(sorted(CROSS_PROCESS))}"
            )
        self.config = config
        self.on_iteration = on_iteration
        self._workdir: Path | None = None
        self._zmq: zmq.asyncio.Context | None = None
        self._processes: list[BaseProcess] = []
        self._stage: TokenizerStage | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._arena: shm.ArenaWriter | None = None
        self._authenticator: ThreadAuthenticator | None = None
        self._addresses: RankAddresses | None = None
        self._ready = False
        self._closing = False

    @property
    def pids(self) -> list[int]:
        """Process ids of the rank processes, rank order."""
        return [p.pid for p in self._processes if p.pid is not None]

    async def start(self) -> None:
        """Start the tokenizer stage and the rank processes; return once every rank is ready.

        Raises:
            ConfigError: the callback cannot reach the rank processes, or a rank found the
                config unusable where it runs (say ``/dev/shm`` too small for its arena).
            PeerLost: a rank died while starting.
            TimeoutError: not every rank was ready within ``startup_timeout_s``.

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
        _check_picklable(self.on_iteration)
        # What a crashed earlier run may have left: its ranks clean up after it when they
        # can, but a rank killed with its parent before it ran any code of ours cannot.
        sweep_stale_run_dirs()
        shm.sweep_stale_segments()
        self._workdir = Path(tempfile.mkdtemp(prefix=f"{RUN_DIR_PREFIX}{os.getpid()}-"))
        self._zmq = zmq.asyncio.Context()
        token = secrets.token_hex(16)
        self._authenticator = ThreadAuthenticator(zmq.Context.shadow(self._zmq.underlying))
        self._authenticator.start()
        self._authenticator.configure_plain(
            domain="*", passwords={CREDENTIALS_USER.decode(): token}
        )
        requests = self._zmq.socket(zmq.PUSH)
        results = self._zmq.socket(zmq.PULL)
        for sock in (requests, results):
            sock.setsockopt(zmq.LINGER, 0)
            sock.plain_server = True
        if get_strategy(self.config.strategy).shared_memory_inputs:
            self._arena = await asyncio.to_thread(
                shm.ArenaWriter,
                self.config.shm_arena_mb << 20,
                self.config.tp_size,
                timeout_s=self.config.timeout_s,
            )
            shm.register_writer(self._arena)
        addresses = RankAddresses(
            requests=f"ipc://{self._workdir}/requests",
            results=f"ipc://{self._workdir}/results",
            group=transport_class(self.config.transport).new_address(self._workdir),
            run_dir=str(self._workdir),
            parent_pid=os.getpid(),
            token=token,
            data_plane=self._arena.name if self._arena is not None else None,
        )
        self._addresses = addresses
        for sock, address in ((requests, addresses.requests), (results, addresses.results)):
            sock.bind(address)
            os.chmod(address.removeprefix("ipc://"), 0o600)  # owner only, as the directory
        self._stage = TokenizerStage(self.config, requests, results, self._arena)
        self._stage.start()

        ctx = multiprocessing.get_context("spawn")
        for rank in range(self.config.tp_size):
            proc = ctx.Process(
                target=rank_main,
                args=(self.config, rank, addresses, self.on_iteration),
                name=f"mmsched-rank{rank}",
                daemon=True,
            )
            proc.start()
            self._processes.append(proc)
        self._watchdog = asyncio.create_task(self._watch(), name="mmsched-watchdog")
        await self._stage.wait_ranks_ready(self.config.startup_timeout_s)
        self._ready = True
        if self._arena is not None:
            self._arena.unlink()  # every rank has mapped it: a crash now leaves nothing behind

    def allocate_tensor(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """An empty tensor for a processor to fill. Under ``zero-copy`` it lives in the
        shared-memory arena, so sending it copies nothing; otherwise it is ``torch.empty``.
        """
        if self._arena is not None:
            return self._arena.allocate_tensor(shape, dtype)
        return torch.empty(tuple(shape), dtype=dtype)

    async def generate(
        self,
        rid: str,
        input_ids: list[int],
        mm_inputs: MultimodalInputs | Mapping[str, Any] | None = None,
        sampling_params: dict[str, Any] | None = None,
    ) -> GenerateOutput:
        """Run one request; ``mm_inputs`` is the processor's output dict (or a built object).

        Raises:
            InvalidMultimodalInput: the inputs are malformed; this request alone fails.
            RequestFailed: a rank failed the request for another reason (``kind`` says which).
            Overloaded: ``max_inflight_mb`` is reached (see ``backpressure``).
            PeerLost: a rank died; the pipeline is stopped and must be started again.
        """
        trace = await self.generate_traced(rid, input_ids, mm_inputs, sampling_params)
        return trace.output

    async def generate_traced(
        self,
        rid: str,
        input_ids: list[int],
        mm_inputs: MultimodalInputs | Mapping[str, Any] | None = None,
        sampling_params: dict[str, Any] | None = None,
        *,
        check_ranks: bool = False,
    ) -> RequestTrace:
        """Like [`generate`][], with the ranks' reports when ``config.report_ranks`` is on.

        ``check_ranks`` asks every rank for a digest of the bytes it holds.
        """
        if self._stage is None:
            raise RuntimeError("the pipeline is not started")
        return await self._stage.submit(
            rid, input_ids, mm_inputs, sampling_params, check_ranks=check_ranks
        )

    async def aclose(self) -> None:
        """Stop the ranks (killed after ``timeout_s`` if they hang) and release everything:
        sockets, shared memory, the run's private directory. Safe to call twice."""
        if self._closing:
            return
        self._closing = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            await asyncio.gather(self._watchdog, return_exceptions=True)
        if self._stage is not None:
            if any(p.is_alive() for p in self._processes):
                self._stage.shutdown()
            await self._join_ranks()
            await self._stage.aclose()
        if self._authenticator is not None:
            self._authenticator.stop()
        if self._zmq is not None:
            self._zmq.destroy(linger=0)
        if self._arena is not None:
            shm.unregister_writer(self._arena)
            self._arena.close()
        if self._addresses is not None:
            transport_class(self.config.transport).remove_leftovers(self._addresses.group)
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
        log.info("pipeline closed")

    async def _join_ranks(self) -> None:
        grace = self.config.timeout_s if self._ready else _STARTUP_FAILURE_GRACE_S
        deadline = asyncio.get_running_loop().time() + grace
        for proc in self._processes:
            remaining = max(0.0, deadline - asyncio.get_running_loop().time())
            await asyncio.to_thread(proc.join, remaining)
        for proc in self._processes:
            if proc.is_alive():
                proc.kill()
                await asyncio.to_thread(proc.join, 5)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(_WATCHDOG_PERIOD_S)
            for rank, proc in enumerate(self._processes):
                if proc.exitcode is not None and self._stage is not None:
                    error = self._rank_error(rank, proc.exitcode)
                    log.error("%s", error)
                    self._stage.fail_all(error)
                    # A group missing a rank cannot serve: the others must not wait on it
                    # (a collective would, until gloo's timeout). Stop them now.
                    self._stage.shutdown()
                    await self._join_ranks()
                    return

    def _rank_error(self, rank: int, exitcode: int) -> MmschedError:
        """What a dead rank's death means to callers: the error it left, if any."""
        left = read_failure(self._workdir, rank) if self._workdir is not None else None
        if left is None:
            return PeerLost(f"scheduler rank {rank} exited with code {exitcode}")
        kind, message = left
        if kind in ("ConfigError", "UnknownNameError"):
            return ConfigError(f"scheduler rank {rank}: {message}")
        return PeerLost(f"scheduler rank {rank} exited with code {exitcode}: {kind}: {message}")

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


def _check_picklable(on_iteration: IterationCallback | None) -> None:
    # Spawned ranks receive the callback pickled; a lambda or a local function fails there
    # with an AttributeError that does not say why.
    try:
        ForkingPickler.dumps(on_iteration)
    except Exception as exc:
        raise ConfigError(
            f"on_iteration {on_iteration!r} cannot be sent to the rank processes ({exc}): "
            "pass a function defined at module level, or a picklable object"
        ) from exc


def sweep_stale_run_dirs() -> list[Path]:
    """Remove run directories whose tokenizer process is gone; returns those removed."""
    removed = []
    for path in Path(tempfile.gettempdir()).glob(f"{RUN_DIR_PREFIX}*"):
        pid = path.name.removeprefix(RUN_DIR_PREFIX).split("-", 1)[0]
        if pid.isdigit() and path.is_dir() and not shm.pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)  # another user's: not ours to remove
            if not path.exists():
                removed.append(path)
    return removed
