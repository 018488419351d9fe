"""The embedding API: a tokenizer stage in the caller's process and N scheduler rank processes.

```python
async with Pipeline(Config(tp_size=4, strategy="tokenizer")) as pipeline:
    output = await pipeline.generate("req-1", input_ids, processor_output)
```

Ranks are started with the ``spawn`` method (safe with torch and threads), form a group over
the configured transport, and each calls ``on_iteration(rank, iteration, requests)`` with
the iteration's typed requests. A watchdog fails every pending request with
[`PeerLost`][] as soon as a rank process dies. Closing the pipeline asks
the ranks to exit, waits ``timeout_s`` for them, then kills any left, and removes the run's
private directory (the IPC endpoints).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
import zmq
import zmq.asyncio

from mmsched import shm
from mmsched.config import Config
from mmsched.errors import ConfigError, PeerLost
from mmsched.inputs import MultimodalInputs
from mmsched.messages import GenerateOutput
from mmsched.scheduler import IterationCallback, RankAddresses, rank_main
from mmsched.strategies import get_strategy
from mmsched.tokenizer import RequestTrace, TokenizerStage
from mmsched.transports import CROSS_PROCESS, transport_class

_WATCHDOG_PERIOD_S = 0.2


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
        self._closing = False

    @property
    def pids(self) -> list[int]:
        """Process ids of the rank processes, rank order."""
        return [p.pid for p in self._processes if p.pid is not None]

    async def start(self) -> None:
        """Start the tokenizer stage and the rank processes; return once every rank is ready.

        Raises [`PeerLost`][] or ``TimeoutError`` (after ``startup_timeout_s``) if a rank
        does not come up; what was started is then closed again.
        """
        self._workdir = Path(tempfile.mkdtemp(prefix="mmsched-"))
        self._zmq = zmq.asyncio.Context()
        requests = self._zmq.socket(zmq.PUSH)
        results = self._zmq.socket(zmq.PULL)
        for sock in (requests, results):
            sock.setsockopt(zmq.LINGER, 0)
        if get_strategy(self.config.strategy).shared_memory_inputs:
            shm.sweep_stale_segments()  # what a crashed earlier run may have left
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
            data_plane=self._arena.name if self._arena is not None else None,
        )
        requests.bind(addresses.requests)
        results.bind(addresses.results)
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
        try:
            await self._stage.wait_ranks_ready(self.config.startup_timeout_s)
        except BaseException:
            await self.aclose()
            raise
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
        if self._zmq is not None:
            self._zmq.destroy(linger=0)
        if self._arena is not None:
            shm.unregister_writer(self._arena)
            self._arena.close()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)

    async def _join_ranks(self) -> None:
        deadline = asyncio.get_running_loop().time() + self.config.timeout_s
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
                    self._stage.fail_all(
                        PeerLost(f"scheduler rank {rank} exited with code {proc.exitcode}")
                    )
                    # A group missing a rank cannot serve: the others must not wait on it
                    # (a collective would, until gloo's timeout). Stop them now.
                    self._stage.shutdown()
                    await self._join_ranks()
                    return

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
