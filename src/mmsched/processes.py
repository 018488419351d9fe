"""Process liveness: the sweeps that remove what a crashed run left behind, and the end of
a run's rank processes."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from multiprocessing.process import BaseProcess

import psutil

RANK_PROCESS_PREFIX = "mmsched-rank"
"""Rank processes are named ``mmsched-rank<N>`` (``multiprocessing.current_process().name``)."""


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
