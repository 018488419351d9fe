"""Rank processes: started, watched for their exit, stopped within a bound.

A rank process starts from the fork server or is spawned (``rank_start_method``, see
[`mmsched.processes`][]: both safe with torch and threads) and is daemonic; it outlives
nobody: a watcher thread in it exits the process as soon as the process that started it is
gone, even while the rank is still joining its group, and removes the run's directory. A rank
that fails (at start-up, say, when ``/dev/shm`` is too small) leaves its error in the run
directory ([`mmsched.runtime.rundir`][]) before exiting, so that its supervisor raises that
error rather than a bare exit code.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import shutil
import sys
import threading
from collections.abc import Awaitable
from multiprocessing.process import BaseProcess
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import TypeVar

import torch

from mmsched.config import Config
from mmsched.devices import rank_device
from mmsched.errors import ConfigError, MmschedError, PeerLost
from mmsched.outputs import IterationCallback
from mmsched.probes import Probe
from mmsched.processes import (
    RANK_PROCESS_PREFIX,
    adopt_environment,
    join_or_kill,
    rank_context,
    wait_for_exit,
)
from mmsched.runtime.endpoints import sweep_stale_stores
from mmsched.runtime.rundir import leave_failure, read_failure
from mmsched.scheduler import RankAddresses, RankStartCallback, SchedulerRank

log = logging.getLogger(__name__)

T = TypeVar("T")

_WATCH_PERIOD_S = 0.2
Hooks = tuple[IterationCallback | None, Probe | None, RankStartCallback | None]
"""``(on_iteration, probe, on_rank_start)``: what every rank process is given."""


def check_picklable(*hooks: object) -> None:
    """Raise ``ConfigError`` unless every hook can be sent to a spawned rank."""
    # Spawned ranks receive the callback and the probe pickled; a lambda or a local function
    # fails there with an AttributeError that does not say why.
    for hook in hooks:
        try:
            ForkingPickler.dumps(hook)
        except Exception as exc:
            raise ConfigError(
                f"{hook!r} cannot be sent to the rank processes ({exc}): pass a function "
                "defined at module level, or a picklable object"
            ) from exc


def rank_error(
    rank: int, kind: str, message: str, exitcode: int | None = None, where: str = ""
) -> MmschedError:
    """What rank ``rank``'s error ``kind: message`` means to the caller: the config's fault
    (``ConfigError``), or a lost rank. ``where``: the host, when not this one."""
    if kind in ("ConfigError", "UnknownNameError"):
        return ConfigError(f"scheduler rank {rank}{where}: {message}")
    exited = f" exited with code {exitcode}" if exitcode is not None else " failed"
    return PeerLost(f"scheduler rank {rank}{where}{exited}: {kind}: {message}")


def rank_main(
    config: Config,
    rank: int,
    addresses: RankAddresses,
    hooks: Hooks,
    group: tuple[int, int] | None = None,
    environ: dict[str, str] | None = None,
) -> None:
    """Process entry point of scheduler rank ``rank`` (``group``: see ``SchedulerRank``;
    ``environ``: the starter's environment, which the rank takes)."""
    threading.Thread(
        target=_exit_if_orphaned, args=(addresses,), name="mmsched-orphan", daemon=True
    ).start()
    adopt_environment(environ)
    try:
        device = rank_device(config.device, rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)  # the callback's default device is its own
        rank_loop = SchedulerRank(config, rank, addresses, *hooks, group=group)
        asyncio.run(rank_loop.run())
    except BaseException as exc:
        log.error("scheduler rank %d failed: %r", rank, exc)
        leave_failure(addresses.run_dir, rank, exc)
        raise
    _exit_cleanly()


def _exit_cleanly() -> None:
    """End a rank whose loop returned (its stores, transport and group closed) without the
    interpreter's teardown (torch's modules unloaded one by one), which every
    ``Pipeline.aclose`` waited for: at TP=4 on 2 cores it closed in 1.52-1.68 s with it,
    0.42-0.47 s without (``scripts/pipeline_start_stop.py``,
    docs/results/pipeline_start_stop_dev.txt). Its ``atexit`` handlers
    (multiprocessing's own among them) still run, and logging and stdio are flushed. Where a
    thread that the interpreter would wait for still runs (a callback's own, or an executor's,
    whose exit hooks ``atexit`` does not hold), the rank exits the ordinary way instead."""
    main = threading.main_thread()
    if any(t is not main and not t.daemon and t.is_alive() for t in threading.enumerate()):
        return
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)


def _exit_if_orphaned(addresses: RankAddresses) -> None:
    # The starter's pid comes from the starter itself: a rank that read getppid() after the
    # spawn bootstrap would record 1 if the parent had already died, and never notice; and
    # a rank forked by the fork server has the server for a parent.
    wait_for_exit(addresses.parent_pid)
    log.error("the tokenizer (pid %d) is gone; this rank exits", addresses.parent_pid)
    shutil.rmtree(addresses.run_dir, ignore_errors=True)
    sweep_stale_stores()  # the run's segments, named for the dead tokenizer
    os._exit(1)


class RankProcesses:
    """The rank processes this process started for one host, in the run directory
    ``run_dir``; ``where`` names the host in errors (empty on node 0)."""

    def __init__(self, config: Config, run_dir: Path, where: str = "") -> None:
        self.config = config
        self.run_dir = run_dir
        self.where = where
        self._ranks: list[tuple[int, BaseProcess]] = []

    def start(
        self,
        rank: int,
        addresses: RankAddresses,
        hooks: Hooks,
        *,
        group: tuple[int, int] | None = None,
    ) -> None:
        """Start rank ``rank``'s process (daemonic: it does not outlive this one)."""
        proc = rank_context(self.config.rank_start_method).Process(
            target=rank_main,
            args=(self.config, rank, addresses, hooks, group, dict(os.environ)),
            name=f"{RANK_PROCESS_PREFIX}{rank}",
            daemon=True,
        )
        proc.start()
        self._ranks.append((rank, proc))

    @property
    def pids(self) -> list[int]:
        """Process ids, in the order started."""
        return [p.pid for _, p in self._ranks if p.pid is not None]

    def any_alive(self) -> bool:
        return any(p.is_alive() for _, p in self._ranks)

    def lost(self, *, started: bool = True) -> MmschedError | None:
        """A rank process that exited, as an error (the one it left, if any): one killed by
        a signal before the others, else the first in rank order;
        ``started``: whether every rank had come up, which tells a rank that could not even
        import its program from one that died serving."""
        exited = [(rank, proc.exitcode) for rank, proc in self._ranks if proc.exitcode is not None]
        if not exited:
            return None
        # A rank killed by a signal is the cause; the ranks that failed because it went
        # (a broken collective, say) are its effects, and may have exited first.
        killed = [(rank, code) for rank, code in exited if code is not None and code < 0]
        rank, code = (killed or exited)[0]
        assert code is not None
        return self._exit_error(rank, code, started)

    def _exit_error(self, rank: int, exitcode: int, started: bool) -> MmschedError:
        left = read_failure(self.run_dir, rank)
        if left is None and exitcode > 0 and not started:
            # Failed before any rank code ran: the spawned process could not import the
            # main module or unpickle the callback. Its traceback went to stderr.
            return PeerLost(
                f"scheduler rank {rank}{self.where} exited with code {exitcode} before it "
                "started: the spawned rank imports the program's main module, so a script "
                'that starts a Pipeline must do so under `if __name__ == "__main__":`, and '
                "callbacks must be importable module-level functions (the rank's traceback "
                "is on stderr)"
            )
        if left is None:
            return PeerLost(f"scheduler rank {rank}{self.where} exited with code {exitcode}")
        return rank_error(rank, *left, exitcode=exitcode, where=self.where)

    async def unless_one_dies(self, awaitable: Awaitable[T]) -> T:
        """``awaitable``'s result, or the error of a rank that died first (while starting:
        a rank that fails to start must not leave its supervisor waiting)."""
        waiting = asyncio.ensure_future(awaitable)
        try:
            while True:
                done, _ = await asyncio.wait([waiting], timeout=_WATCH_PERIOD_S)
                if done:
                    return waiting.result()
                if (error := self.lost(started=False)) is not None:
                    raise error
        finally:
            if not waiting.done():
                waiting.cancel()
                await asyncio.gather(waiting, return_exceptions=True)

    async def stop(self, grace_s: float) -> None:
        """Wait up to ``grace_s`` for every rank to exit, then kill those left."""
        await join_or_kill([p for _, p in self._ranks], grace_s)
