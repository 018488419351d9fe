"""A run's files: its private directory, the error a failed rank leaves there, and the
announcement a group's sender leaves in a rendezvous directory for its receivers.

A run directory is ``mmsched-<pid of its owner>-<random>``, mode 0700: in the temp directory
for a pipeline or a node agent, in the rendezvous directory for a server's own group (in the
temp directory where the rendezvous directory is too deep for socket paths). The
pid in its name lets a later run remove what a crashed one left
([`sweep_stale_run_dirs`][mmsched.runtime.rundir.sweep_stale_run_dirs]).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import orjson

from mmsched.processes import pid_alive, process_started, same_process

log = logging.getLogger(__name__)

RUN_DIR_PREFIX = "mmsched-"
"""Run directories are ``mmsched-<pid of their owner>-<random>``."""

RENDEZVOUS_FILE = "mmsched-group.json"
"""The announcement a group's sender leaves in a rendezvous directory."""

FAILURE_FILE = "rank-{rank}.failed.json"
"""Name of the file in the run directory where a failed rank leaves its error."""


def make_run_dir(parent: Path | None = None) -> Path:
    """A new run directory of this process (mode 0700), in ``parent`` or the temp directory."""
    return Path(tempfile.mkdtemp(prefix=f"{RUN_DIR_PREFIX}{os.getpid()}-", dir=parent))


def sweep_stale_run_dirs(parent: Path | None = None) -> list[Path]:
    """Remove run directories (in ``parent`` or the temp directory) whose owner is gone;
    returns those removed."""
    removed = []
    for path in (parent or Path(tempfile.gettempdir())).glob(f"{RUN_DIR_PREFIX}*"):
        pid = path.name.removeprefix(RUN_DIR_PREFIX).split("-", 1)[0]
        if pid.isdigit() and path.is_dir() and not pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)  # another user's: not ours to remove
            if not path.exists():
                removed.append(path)
    return removed


def leave_failure(run_dir: str | Path, rank: int, exc: BaseException) -> None:
    """Leave ``exc`` as rank ``rank``'s error in ``run_dir``, for whoever watches the rank."""
    # Atomic (write, then rename): the watcher reads it as soon as it sees the process exit.
    path = Path(run_dir) / FAILURE_FILE.format(rank=rank)
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_bytes(orjson.dumps({"kind": type(exc).__name__, "message": str(exc)}))
        tmp.rename(path)
    except OSError as write_error:  # the run directory is gone: nobody is left to tell
        log.warning("could not leave rank %d's error in %s: %s", rank, run_dir, write_error)


def read_failure(run_dir: str | Path, rank: int) -> tuple[str, str] | None:
    """``(kind, message)`` of the error rank ``rank`` left before exiting, if it left one."""
    try:
        data = orjson.loads((Path(run_dir) / FAILURE_FILE.format(rank=rank)).read_bytes())
        return str(data["kind"]), str(data["message"])
    except (OSError, orjson.JSONDecodeError, KeyError, TypeError):
        return None


@dataclass(frozen=True)
class Announcement:
    """What a group's sender leaves for its receivers: where its payload store and its
    transport are, and the secret its transport asks of them."""

    store: str | None
    group: str
    token: str


def announce(path: Path, announcement: Announcement) -> None:
    """Leave ``announcement`` at ``path`` (mode 0600), signed with this process's pid and
    start time."""
    data = {
        "pid": os.getpid(),
        # A pid alone is reused by another process once an earlier run's sender is gone,
        # and its file would then look alive.
        "started": process_started(os.getpid()),
        "store": announcement.store,
        "group": announcement.group,
        "token": announcement.token,
    }
    # Written under a temporary name, then renamed: a reader never sees half a file.
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(orjson.dumps(data))
    tmp.rename(path)


def read_announcement(path: Path) -> Announcement | None:
    """The announcement at ``path`` of a live sender, else ``None``.

    Live means the pid *and* its start time match a running process. Why not the pid alone:
    an earlier run's file outlives its sender, and the pid is soon another process's, so
    the file would send a receiver to a dead address. Why not a nonce: a receiver has
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
    if type(started) is not float or not same_process(pid, started):
        return None
    if not (store is None or isinstance(store, str)) or not isinstance(token, str):
        return None
    return Announcement(store, group, token)
