"""Process liveness: how rank processes start, how a rank learns that the process that
started it is gone, the sweeps that remove what a crashed run left behind, and the end of a
run's rank processes.

Rank processes start from ``forkserver`` by default: the first start in a process runs one
server process, which imports torch and the rank's code once
([`PRELOAD`][mmsched.processes.PRELOAD]) and then forks each rank, in milliseconds, where
``spawn`` starts a fresh interpreter that imports them again (seconds a rank). The server
process is this process's helper for as long as it lives, and exits with it. A forked rank
is then not a child of the process that asked for it, so a rank watches that process
through a pidfd ([`wait_for_exit`][mmsched.processes.wait_for_exit]), not through its
parent pid; and it takes the environment that process had at the start
([`adopt_environment`][mmsched.processes.adopt_environment]), as under ``spawn``, rather
than the server's.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import select
import time
from collections.abc import Mapping, Sequence
from multiprocessing.context import ForkServerContext, SpawnContext
from multiprocessing.process import BaseProcess

import psutil

RANK_PROCESS_PREFIX = "mmsched-rank"
"""Rank processes are named ``mmsched-rank<N>`` (``multiprocessing.current_process().name``)."""


START_METHODS = ("forkserver", "spawn")
"""The values of ``rank_start_method``."""

PRELOAD = ["mmsched.runtime.supervisor"]
"""What the fork server imports before it forks a rank: the rank's code, and torch with it."""

_EXIT_POLL_S = 0.2


def rank_context(method: str) -> ForkServerContext | SpawnContext:
    """The ``multiprocessing`` context rank processes start from under ``rank_start_method
    = method``: ``spawn`` where the platform has no fork server."""
    if method == "forkserver" and "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        # Read when the server starts (the first process started from it): a server that
        # already runs keeps what it imported.
        context.set_forkserver_preload(PRELOAD)
        return context
    return multiprocessing.get_context("spawn")


def adopt_environment(environ: Mapping[str, str] | None) -> None:
    """Make this process's environment ``environ`` (what its starter had; ``None``: keep
    this one). A forked rank otherwise has the fork server's, frozen when it started."""
    if environ is None or environ == os.environ:
        return
    os.environ.clear()
    os.environ.update(environ)


def wait_for_exit(pid: int) -> None:
    """Return once process ``pid`` (not necessarily this one's parent) has exited, or at
    once if there is none. Through a pidfd (Linux 5.3 and later), which the kernel makes
    readable at the exit: no polling, and no confusion with a later process of the same
    pid; elsewhere by polling every 0.2 s."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except (AttributeError, OSError):  # no pidfds here
        while pid_alive(pid):
            time.sleep(_EXIT_POLL_S)
        return
    try:
        while not select.select([pidfd], [], [])[0]:
            pass
    finally:
        os.close(pidfd)


def pid_alive(pid: int) -> bool:
    """Whether a process of that pid exists (of any user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_started(pid: int) -> float | None:
    """When the process of that pid started (seconds since the epoch, as the kernel
    counts it), or ``None`` when there is none. A pid is reused once its process is gone;
    ``(pid, started)`` names one process for as long as the host is up."""
    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.Error:
        return None


def same_process(pid: int, started: float) -> bool:
    """Whether ``pid`` is still the process that started at ``started`` (a process whose
    pid was reused since then is not)."""
    now = process_started(pid)
    # The kernel counts start times in clock ticks (10 ms): equal within one tick.
    return now is not None and abs(now - started) < 0.01


async def join_or_kill(processes: Sequence[BaseProcess], grace_s: float) -> None:
    """Wait up to ``grace_s`` (all together) for ``processes`` to exit, then kill those left
    and reap them. The waits run off the event loop."""
    deadline = time.monotonic() + grace_s
    for proc in processes:
        await asyncio.to_thread(proc.join, max(0.0, deadline - time.monotonic()))
    for proc in processes:
        if proc.is_alive():
            proc.kill()
            await asyncio.to_thread(proc.join, 5)
