"""What one run owns on the host: its segments, the shared memory its processes map, its
run directories, its rank processes.

Tests assert on these rather than on the whole of ``/dev/shm``, so that they hold while other
mmsched runs (parallel CI jobs, a developer's server) come and go on the same machine.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import psutil

from mmsched.runtime.rundir import RUN_DIR_PREFIX
from mmsched.stores.arena import SEGMENT_PREFIX, SHM_DIR, live_segments


def segments_of(pids: list[int]) -> set[str]:
    """Segments in /dev/shm whose names carry one of ``pids`` (the process that made them)."""
    return {name for name in live_segments() if any(f"-{pid}-" in name for pid in pids)}


def shared_memory_of(pids: list[int]) -> int:
    """Bytes of mmsched segments that ``pids`` map, or that carry their pids, counted once."""
    sizes: dict[str, int] = {}
    for pid in pids:
        for region in psutil.Process(pid).memory_maps(grouped=False):
            name = os.path.basename(region.path).removesuffix(" (deleted)")
            if region.path.startswith(str(SHM_DIR)) and name.startswith(SEGMENT_PREFIX):
                start, end = (int(x, 16) for x in region.addr.split("-"))
                sizes[name] = max(sizes.get(name, 0), end - start)
    for name in segments_of(pids):
        sizes.setdefault(name, (SHM_DIR / name).stat().st_size)
    return sum(sizes.values())


def run_dirs_of(pids: list[int]) -> set[Path]:
    """Run directories of tokenizers ``pids`` (named ``mmsched-<pid>-...``) that exist."""
    tmp = Path(tempfile.gettempdir())
    return {path for pid in pids for path in tmp.glob(f"{RUN_DIR_PREFIX}{pid}-*")}


def rank_processes_of(pid: int) -> list[psutil.Process]:
    """The rank processes process ``pid`` started, under either ``rank_start_method``: its
    spawned children, or the children of its fork server (not the server itself, nor
    multiprocessing's resource tracker)."""
    try:
        descendants = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for process in descendants:
        try:
            command = " ".join(process.cmdline())
            parent = process.ppid()
        except psutil.Error:  # gone meanwhile
            continue
        if "spawn_main" in command and parent == pid:
            found.append(process)
        elif "forkserver" in command and parent != pid:
            found.append(process)  # forked by the server, a child of this process
    return found
