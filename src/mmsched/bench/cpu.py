"""CPU time of a set of processes (the tokenizer and every rank), read from the OS."""

from __future__ import annotations

import psutil


class CpuMeter:
    """Sums user + system CPU seconds over the given processes, all their threads included."""

    def __init__(self, pids: list[int]) -> None:
        self._procs = [psutil.Process(pid) for pid in pids]

    def seconds(self) -> float:
        """User plus system CPU seconds of the watched processes so far."""
        total = 0.0
        for proc in self._procs:
            t = proc.cpu_times()
            total += t.user + t.system
        return total
