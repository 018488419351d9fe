"""Process liveness: the sweeps that remove what a crashed run left behind, and the end of
a run's rank processes."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from multiprocessing.process import BaseProcess

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
