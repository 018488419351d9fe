"""The shared-memory data plane: one writer, N readers, payloads written once, mapped by all.

An *arena* is one POSIX shared-memory segment in ``/dev/shm``: a header page holding one
*watermark* per reader, then a data region used as a ring. The writer copies a payload in
once (or a processor writes it there directly, [`ArenaWriter.allocate_tensor`][]) and
sends a small [`Ref`][] instead of the bytes. Readers turn a ref into a ``memoryview`` of
the mapped segment: no copy.

Lifetime: each allocation has a sequence number. A reader's watermark is the highest
sequence number below which it holds nothing; it moves when the views it handed out are
garbage-collected (a finalizer per view), so a tensor built on a view keeps its bytes alive
for as long as it lives. The writer reuses an allocation only when every reader's
watermark has passed it and no hold of the writer's process is left on it: a producer with
several sending threads holds each payload until every reader is done with its message
(a watermark also passes payloads sent after it by another thread, not yet received), and
abandons room it never sent, which is then reused at once. When the ring is full the writer
waits, up to a timeout, then raises [`ArenaFull`][]. Space is reused in allocation order: a
payload still held (by a rank, or by the writer's own tensor from
[`ArenaWriter.allocate_tensor`][]) holds back the reuse of everything written after it until
it is released.

Failure modes addressed:

- ``/dev/shm`` too small: the segment's pages are reserved with ``posix_fallocate`` at
  start, which fails with a clear error instead of a SIGBUS on first touch later;
- ``/dev/shm`` bigger than the memory left (a tmpfs may be sized at the host's RAM): an
  arena larger than what ``/proc/meminfo`` (or a container's cgroup) says is available is
  refused before a page is taken, since reserving it would wake the OOM killer rather than
  fail;
- page faults per request: every mapping is made with ``MAP_POPULATE``, so pages are faulted
  in once, at start;
- leaks after a crash: segment names carry the creating process's pid, and
  [`sweep_stale_segments`][] removes those whose creator is gone. Beyond that the writer
  unlinks the name as soon as every reader has mapped it, so even ``kill -9`` leaves
  nothing behind: the memory goes when the last mapping does;
- a dead reader wedging the writer: waiting for space is bounded by the timeout.

Linux only (``/dev/shm``, ``MAP_POPULATE``).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import secrets
import threading
import time
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mmsched.errors import ArenaFull, ConfigError, TransportError
from mmsched.frames import Buffer
from mmsched.hashing import raw_bytes, tensor_bytes
from mmsched.processes import pid_alive
from mmsched.stores.copying import shared_copier

SHM_DIR = Path("/dev/shm")
SEGMENT_PREFIX = "mmsched-"
_HEADER_BYTES = 4096  # one page of reader watermarks (up to 512 readers)
HEADER_BYTES = _HEADER_BYTES
"""Bytes before the data region: a ref's offset counts from the segment's start."""
_ALIGN = 64  # cache-line alignment of every allocation


@dataclass(frozen=True)
class Ref:
    """Where a payload lives: arena name, allocation sequence number, offset, length."""

    arena: str
    seq: int
    offset: int
    nbytes: int


def new_segment_name() -> str:
    """A fresh segment name carrying this process's pid, for the stale-segment sweep."""
    return f"{SEGMENT_PREFIX}{os.getpid()}-{secrets.token_hex(6)}"


def _creator_pid(name: str) -> int | None:
    try:
        return int(name[len(SEGMENT_PREFIX) :].split("-", 1)[0])
    except ValueError:
        return None


def sweep_stale_segments() -> list[str]:
    """Unlink mmsched segments whose creating process no longer exists; returns their names."""
    removed = []
    for path in SHM_DIR.glob(f"{SEGMENT_PREFIX}*"):
        pid = _creator_pid(path.name)
        if pid is not None and not pid_alive(pid):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path.name)
    return removed


def unlink_segment(name: str) -> None:
    """Remove segment ``name`` (and a half-built one of that name) if it is still there."""
    if not name.startswith(SEGMENT_PREFIX) or "/" in name:
        return  # only mmsched's own names, and only inside /dev/shm
    for path in (SHM_DIR / name, SHM_DIR / f"{name}.init"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def live_segments() -> list[str]:
    """Names of mmsched segments present in /dev/shm (for tests and operators)."""
    return sorted(p.name for p in SHM_DIR.glob(f"{SEGMENT_PREFIX}*"))


def _address(buf: Buffer) -> int:
    return int(np.frombuffer(buf, dtype=np.uint8).ctypes.data) if memoryview(buf).nbytes else 0


class _Mapped:
    """A mapped segment: the mmap, its base address, and the reader watermarks."""

    def __init__(self, name: str, fd: int, size: int) -> None:
        self.name = name
        self.size = size
        self.mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        self.base = _address(memoryview(self.mm))
        self.watermarks = memoryview(self.mm)[:_HEADER_BYTES].cast("q")

    def contains(self, address: int, nbytes: int) -> bool:
        return self.base + _HEADER_BYTES <= address and address + nbytes <= self.base + self.size

    def locate(self, address: int, nbytes: int) -> int | None:
        """The offset in this mapping of ``nbytes`` at ``address``, or None if elsewhere."""
        return address - self.base if self.contains(address, nbytes) else None

    def close(self) -> None:
        self.watermarks.release()
        # Views still held elsewhere keep the mapping; it goes when they do.
        with contextlib.suppress(BufferError):
            self.mm.close()


@dataclass
class _Allocation:
    seq: int
    offset: int
    nbytes: int


class ArenaWriter:
    """Creates an arena and writes payloads into it.

    Args:
        size: bytes of payload the ring can hold at once.
        n_readers: readers that will open the arena (each with its own index).
        timeout_s: longest wait for room before [`ArenaFull`][].
        backed: whether the segment holds the data region. Without it the segment is the
            header alone and the ring only hands out offsets: the bytes live elsewhere (a GPU
            pool, [`mmsched.stores.cuda_ipc`][]), and only the ref of
            [`reserve`][mmsched.stores.arena.ArenaWriter.reserve] is meaningful.
    """

    def __init__(
        self,
        size: int,
        n_readers: int,
        *,
        name: str | None = None,
        timeout_s: float = 60.0,
        backed: bool = True,
    ) -> None:
        if not 0 <= n_readers <= _HEADER_BYTES // 8:
            raise ConfigError(f"an arena serves 0 to {_HEADER_BYTES // 8} readers, not {n_readers}")
        total = _HEADER_BYTES + (_round_up(size) if backed else 0)
        _check_free_space(total)
        self.name = name or new_segment_name()
        self.n_readers = n_readers
        self.timeout_s = timeout_s
        self._path = SHM_DIR / self.name
        # Made under a temporary name and renamed when ready, so that a reader waiting for
        # the name never maps a segment that is not yet sized and initialised.
        building = SHM_DIR / f"{self.name}.init"
        fd = os.open(building, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            try:
                os.posix_fallocate(fd, 0, total)  # reserve now: ENOSPC here, not SIGBUS later
            except OSError as exc:
                building.unlink()
                raise ConfigError(
                    f"cannot reserve {total} bytes in {SHM_DIR}: {exc.strerror}; lower the arena "
                    "size (shm_arena_mb) or enlarge /dev/shm (docker: --shm-size)"
                ) from exc
            self._mapped = _Mapped(self.name, fd, total)
        except BaseException:
            os.close(fd)
            raise
        # Kept open: producers in other processes receive it (lending) once the name is gone.
        self.fd = fd
        for i in range(n_readers):
            self._mapped.watermarks[i] = -1
        os.rename(building, self._path)
        self._data_start = _HEADER_BYTES
        self._capacity = _round_up(size)
        # Re-entrant: a view's finalizer takes this lock, and the garbage collector may run
        # it on a thread that already holds it.
        self._lock = threading.RLock()
        self._live: deque[_Allocation] = deque()
        self._head = 0  # next free offset in the data region, relative to _data_start
        self._next_seq = 0
        # Holds of the writer's process, by sequence number: a held allocation is never
        # reclaimed, whatever the readers' watermarks say. A watermark only means "below
        # this, I hold nothing": a payload not yet sent to a reader (written by one thread
        # while another's later payload went first) is below it too.
        self._holds: dict[int, int] = {}
        self._by_offset: dict[int, _Allocation] = {}
        self._leases: dict[int, tuple[_Allocation, float]] = {}  # seq -> (allocation, deadline)
        self._abandoned: set[int] = set()  # expired leases: no reader will ever see them
        self._unlinked = False

    @property
    def capacity(self) -> int:
        return self._capacity

    def unlink(self) -> None:
        """Remove the name from /dev/shm (mappings stay valid). Call once readers mapped it."""
        if not self._unlinked:
            self._unlinked = True
            with contextlib.suppress(FileNotFoundError):
                self._path.unlink()

    def close(self) -> None:
        """Unlink the name if still there and drop this process's mapping."""
        self.unlink()
        self._mapped.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)

    @property
    def size(self) -> int:
        """Bytes of the segment, header included (what a producer maps)."""
        return self._mapped.size

    def lease(self, nbytes: int, ttl_s: float) -> Ref:
        """Room for a producer in another process to write ``nbytes`` into, held for it until
        [`claim`][mmsched.stores.arena.ArenaWriter.claim]ed or ``ttl_s`` has passed (a
        producer that died is not waited for forever). Raises [`ArenaFull`][]."""
        alloc = self._allocate(nbytes, writer_held=True)
        with self._lock:
            self._leases[alloc.seq] = (alloc, time.monotonic() + ttl_s)
        return Ref(self.name, alloc.seq, self._data_start + alloc.offset, nbytes)

    def claim(self, ref: Ref) -> np.ndarray:
        """The bytes a producer wrote under lease ``ref``, as an array of this process's
        mapping; the room stays reserved while the array (or a view of it) lives.

        Raises:
            TransportError: ``ref`` names no lease of this arena (another arena, a forged or
                already claimed lease, or one whose time ran out).
        """
        with self._lock:
            lease = self._leases.get(ref.seq) if ref.arena == self.name else None
            if (
                lease is None
                or self._data_start + lease[0].offset != ref.offset
                or not 0 <= ref.nbytes <= lease[0].nbytes
            ):
                raise TransportError(f"{ref} is not a lease of arena {self.name} (or it expired)")
            del self._leases[ref.seq]
        arr = np.frombuffer(self._mapped.mm, dtype=np.uint8, count=ref.nbytes, offset=ref.offset)
        weakref.finalize(arr, self._writer_release, ref.seq)
        return arr

    def _expire_leases(self) -> None:
        # An expired lease can never be claimed, so no reader will ever see it: its room is
        # reclaimed without waiting for the readers' watermarks to pass it.
        now = time.monotonic()
        for seq, (_, deadline) in list(self._leases.items()):
            if deadline < now:
                del self._leases[seq]
                self._unhold(seq)
                self._abandoned.add(seq)

    def put(self, payload: Buffer, *, hold: bool = False, wait: bool = True) -> Ref:
        """Copy ``payload`` into the arena once; raises [`ArenaFull`][] after the timeout
        (at once without ``wait``).

        With ``hold``, the room is held for the caller until it calls ``release``."""
        src = memoryview(payload).cast("B")
        ref, dst = self.reserve(src.nbytes, hold=hold, wait=wait)
        # Chunks on a few pool threads (idle threads sleep: an OpenMP copy's team kept
        # spinning after each copy, and under load burned 12 cores on the entry rank).
        try:
            shared_copier().copy(dst, _address(src), src.nbytes)
        except BaseException:
            # A copy that fails (the copier's pool gone at shutdown, an interrupt) leaves
            # room that was never sent: it goes back now, as in put_tensor, or it would
            # wait for watermarks that only a later payload moves past it.
            self.abandon(ref.seq)
            raise
        return ref

    def put_tensor(self, tensor: torch.Tensor, *, hold: bool = False, wait: bool = True) -> Ref:
        """A tensor's bytes into the arena, as [`tensor_bytes`][mmsched.hashing.tensor_bytes]
        reads them; like ``put`` otherwise. One on a GPU is copied from the device into the
        mapped segment by one ``copy_``: no page-locked staging tensor of our own and no
        second copy from it into the arena (the driver still stages the transfer through
        page-locked memory of its own, the segment not being registered). What it gave the
        ``cuda`` preprocessing server: docs/serving.md, "Where the H200 host saturates"."""
        if tensor.device.type != "cuda":
            return self.put(tensor_bytes(tensor), hold=hold, wait=wait)
        flat = raw_bytes(tensor)
        nbytes = flat.numel()
        ref, _ = self.reserve(nbytes, hold=hold, wait=wait)
        if nbytes:
            try:
                into = torch.frombuffer(
                    self._mapped.mm, dtype=torch.uint8, count=nbytes, offset=ref.offset
                )
                into.copy_(flat)  # synchronous: the bytes are there when it returns
            except BaseException:
                # A CUDA error surfaces here: the room was never sent, so it goes back now
                # (held or not) rather than when the readers' watermarks pass it.
                self.abandon(ref.seq)
                raise
        return ref

    def reserve(self, nbytes: int, *, hold: bool = False, wait: bool = True) -> tuple[Ref, int]:
        """Room for ``nbytes``: its ref and the address to write them at.

        The caller must finish writing before it sends the ref. Without ``hold`` the room is
        reclaimed like any payload's, once every reader's watermark is past it: right for a
        single sender whose refs reach the readers in allocation order. Where several
        threads send, pass ``hold`` and ``release`` once every reader is done with the ref
        (or it was never sent). Raises [`ArenaFull`][] after the timeout (at once without
        ``wait``).
        """
        alloc = self._allocate(nbytes, writer_held=hold, wait=wait)
        start = self._data_start + alloc.offset
        return Ref(self.name, alloc.seq, start, nbytes), self._mapped.base + start

    def reserve_all(self, sizes: Sequence[int], *, wait: bool = True) -> list[tuple[Ref, int]]:
        """Room for every one of ``sizes`` at once, or for none (waiting up to the timeout,
        if ``wait``): like [`reserve`][mmsched.stores.arena.ArenaWriter.reserve] with
        ``hold``, for a producer that needs several payloads' room before it can send any."""
        made = self._allocate_all(sizes, writer_held=True, wait=wait)
        return [
            (
                Ref(self.name, a.seq, self._data_start + a.offset, n),
                self._mapped.base + self._data_start + a.offset,
            )
            for a, n in zip(made, sizes, strict=True)
        ]

    def allocate_tensor(
        self, shape: Sequence[int], dtype: torch.dtype, *, wait: bool = True
    ) -> torch.Tensor:
        """A tensor living in the arena, for a processor to fill; sending it copies nothing.

        The space stays reserved while the tensor (or any view of it) lives in this process.
        Raises [`ArenaFull`][] after the timeout (at once without ``wait``).
        """
        nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
        alloc = self._allocate(nbytes, writer_held=True, wait=wait)
        start = self._data_start + alloc.offset
        arr = np.frombuffer(self._mapped.mm, dtype=np.uint8, count=nbytes, offset=start)
        weakref.finalize(arr, self._writer_release, alloc.seq)
        return torch.frombuffer(arr.data, dtype=torch.uint8).view(dtype).reshape(tuple(shape))

    def ref_at(self, address: int, n: int) -> Ref | None:
        """The ref of ``n`` bytes at ``address`` if they lie in one of this arena's allocations."""
        start = self._mapped.locate(address, n)
        if start is None:
            return None
        with self._lock:
            alloc = self._by_offset.get(start - self._data_start)
        if alloc is None or alloc.nbytes < n:
            return None
        return Ref(self.name, alloc.seq, start, n)

    # -- ring allocation ---------------------------------------------------------------------

    def _allocate(
        self, nbytes: int, *, writer_held: bool = False, wait: bool = True
    ) -> _Allocation:
        return self._allocate_all([nbytes], writer_held=writer_held, wait=wait)[0]

    def _allocate_all(
        self, sizes: Sequence[int], *, writer_held: bool = False, wait: bool = True
    ) -> list[_Allocation]:
        # All or nothing: a producer that held part of its room while waiting for the rest
        # could wait forever on producers doing the same (each holding what the others need).
        rounded = [_round_up(max(n, 1)) for n in sizes]
        if sum(rounded) > self._capacity:
            raise ArenaFull(
                f"payload of {sum(sizes)} bytes exceeds the arena ({self._capacity} bytes)"
            )
        deadline = time.monotonic() + (self.timeout_s if wait else 0.0)
        delay = 0.0001
        while True:
            with self._lock:
                self._expire_leases()
                self._reclaim()
                head, next_seq = self._head, self._next_seq
                made: list[_Allocation] = []
                for size in rounded:
                    offset = self._find_room(size)
                    if offset is None:
                        break
                    alloc = _Allocation(self._next_seq, offset, size)
                    self._next_seq += 1
                    self._live.append(alloc)
                    self._by_offset[offset] = alloc
                    self._head = offset + size
                    made.append(alloc)
                if len(made) == len(rounded):
                    if writer_held:
                        for alloc in made:
                            self._holds[alloc.seq] = 1
                    return made
                for alloc in reversed(made):  # give back what part of it fitted
                    self._live.pop()
                    del self._by_offset[alloc.offset]
                self._head, self._next_seq = head, next_seq
            if time.monotonic() > deadline:
                marks = list(self._mapped.watermarks[: self.n_readers])
                oldest = self._live[0].seq if self._live else None
                raise ArenaFull(
                    f"no room for {sum(sizes)} bytes in {self.timeout_s if wait else 0} s; "
                    f"reader watermarks {marks}, oldest live allocation {oldest}, "
                    f"{len(self._holds)} held by the writer: a reader is slow or gone"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.005)

    def _find_room(self, size: int) -> int | None:
        if not self._live:
            self._head = 0
            return 0 if size <= self._capacity else None
        tail = self._live[0].offset
        if self._head > tail:  # live data is [tail, head): room after head, else at 0
            if self._head + size <= self._capacity:
                return self._head
            return 0 if size <= tail else None
        return self._head if self._head + size <= tail else None  # wrapped: room in [head, tail)

    def _reclaim(self) -> None:
        # With no readers (a group of one) nothing is ever held by anyone else.
        done = min(
            (self._mapped.watermarks[i] for i in range(self.n_readers)), default=self._next_seq
        )
        while (
            self._live
            and (self._live[0].seq <= done or self._live[0].seq in self._abandoned)
            and self._live[0].seq not in self._holds
        ):
            alloc = self._live.popleft()
            self._by_offset.pop(alloc.offset, None)
            self._abandoned.discard(alloc.seq)

    def hold(self, seq: int) -> None:
        """Keep allocation ``seq`` from reuse until a matching ``release``."""
        with self._lock:
            self._holds[seq] = self._holds.get(seq, 0) + 1

    def release(self, seq: int) -> None:
        """Drop one hold of allocation ``seq``; it is reused once readers are past it."""
        with self._lock:
            self._unhold(seq)

    def abandon(self, seq: int) -> None:
        """Drop one hold of allocation ``seq``, which no reader will ever see (it was never
        sent): it is reused without waiting for the readers' watermarks, which only move
        past it when a later payload is read."""
        with self._lock:
            self._unhold(seq)
            if seq not in self._holds:
                self._abandoned.add(seq)

    def _unhold(self, seq: int) -> None:
        left = self._holds.get(seq, 0) - 1
        if left > 0:
            self._holds[seq] = left
        else:
            self._holds.pop(seq, None)

    def _writer_release(self, seq: int) -> None:
        self.release(seq)


class ArenaReader:
    """Maps an arena made by an [`ArenaWriter`][] and hands out views of its payloads.

    Args:
        name: the arena's segment name.
        index: this reader's watermark slot, ``0 <= index < n_readers``.
    """

    def __init__(self, name: str, index: int, *, wait_s: float = 0.0) -> None:
        self.name = name
        self.index = index
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fd = os.open(SHM_DIR / name, os.O_RDWR)
                break
            except FileNotFoundError:
                if time.monotonic() >= deadline:
                    raise TransportError(
                        f"shared-memory segment {name} does not exist (waited {wait_s} s)"
                    ) from None
                time.sleep(0.01)
        try:
            self._mapped = _Mapped(name, fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        self._lock = threading.RLock()  # re-entrant for the same reason as the writer's
        self._outstanding: dict[int, int] = {}
        self._last_seen = -1
        self._seq_at: dict[int, int] = {}  # offset -> seq, for views still held

    def view(self, ref: Ref) -> memoryview:
        """The payload as a view of shared memory, held until the view is collected.

        Raises:
            TransportError: the ref is not one this arena could have made (another arena,
                a negative size or sequence number, bytes outside the data region).
        """
        fields = (ref.seq, ref.offset, ref.nbytes)
        if (
            ref.arena != self.name
            or not all(type(v) is int and v >= 0 for v in fields)
            or not self._mapped.contains(self._mapped.base + ref.offset, ref.nbytes)
        ):
            raise TransportError(f"ref {ref} is not a payload of arena {self.name}")
        arr = np.frombuffer(self._mapped.mm, dtype=np.uint8, count=ref.nbytes, offset=ref.offset)
        self._hold(ref, arr)  # checked above
        return arr.data

    def hold(self, ref: Ref, owner: object) -> None:
        """Keep ``ref``'s room from reuse until ``owner`` is garbage-collected (the bytes may
        live outside this segment: a header-only arena's ring of offsets)."""
        if not all(type(v) is int and v >= 0 for v in (ref.seq, ref.offset, ref.nbytes)):
            raise TransportError(f"ref {ref} is not a payload of arena {self.name}")
        self._hold(ref, owner)

    def _hold(self, ref: Ref, owner: object) -> None:
        with self._lock:
            self._outstanding[ref.seq] = self._outstanding.get(ref.seq, 0) + 1
            self._last_seen = max(self._last_seen, ref.seq)
            self._seq_at[ref.offset] = ref.seq
            self._publish()
        weakref.finalize(owner, self._release, ref.seq, ref.offset)

    def held(self, offset: int, n: int) -> Ref | None:
        """The ref of ``n`` bytes at ``offset`` if they start a payload this reader holds."""
        with self._lock:
            seq = self._seq_at.get(offset)
        return None if seq is None else Ref(self.name, seq, offset, n)

    @property
    def mapping(self) -> tuple[int, int]:
        """``(address, size)`` of this process's mapping of the whole segment."""
        return self._mapped.base, self._mapped.size

    def ref_at(self, address: int, n: int) -> Ref | None:
        """The ref of ``n`` bytes at ``address`` if they start a view this reader handed out
        and still tracks."""
        offset = self._mapped.locate(address, n)
        return None if offset is None else self.held(offset, n)

    def close(self) -> None:
        """Drop this process's mapping; views still held keep their bytes until released."""
        self._mapped.close()

    def _release(self, seq: int, offset: int) -> None:
        with self._lock:
            left = self._outstanding.get(seq, 0) - 1
            if left > 0:
                self._outstanding[seq] = left
            else:
                self._outstanding.pop(seq, None)
                if self._seq_at.get(offset) == seq:
                    del self._seq_at[offset]
            self._publish()

    def _publish(self) -> None:
        # Everything below the oldest payload still held is free; with nothing held, all
        # this reader has seen is.
        mark = min(self._outstanding) - 1 if self._outstanding else self._last_seen
        with contextlib.suppress(ValueError):  # the mapping was closed under us at shutdown
            self._mapped.watermarks[self.index] = mark


def _round_up(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _check_free_space(nbytes: int) -> None:
    try:
        st = os.statvfs(SHM_DIR)
    except FileNotFoundError:
        raise ConfigError(f"{SHM_DIR} does not exist: the shm transport needs Linux") from None
    free = st.f_bavail * st.f_frsize
    if free < nbytes:
        raise ConfigError(
            f"{SHM_DIR} has {free // 2**20} MiB free, the arena needs {nbytes // 2**20} MiB; lower "
            "shm_arena_mb or enlarge /dev/shm (docker: --shm-size)"
        )
    # /dev/shm's pages are memory, and a tmpfs may be sized at (or above) the host's RAM:
    # reserving more than the memory left would not fail with ENOSPC but wake the OOM killer,
    # which kills whichever process is largest (not necessarily this one).
    memory = _memory_available()
    if memory is not None and memory < nbytes:
        raise ConfigError(
            f"{memory // 2**20} MiB of memory available here (the host's, or the container's "
            f"limit), the arena in {SHM_DIR} needs {nbytes // 2**20} MiB; lower shm_arena_mb"
        )


CGROUP_DIR = Path("/sys/fs/cgroup")  # this process's cgroup (v2), as a container sees it


def _memory_available() -> int | None:
    """Bytes of memory (and swap) the kernel could still give this process, or ``None``
    where unknown: the host's (``/proc/meminfo``), or less where a cgroup (a container's
    ``--memory``) caps it."""
    try:
        with open("/proc/meminfo", "rb") as f:
            fields = dict(line.split(b":", 1) for line in f.read().splitlines() if b":" in line)
        kib = sum(int(fields[key].split()[0]) for key in (b"MemAvailable", b"SwapFree"))
    except (OSError, KeyError, ValueError, IndexError):
        return None
    capped = _cgroup_memory_left()
    return kib << 10 if capped is None else min(kib << 10, capped)


def _cgroup_memory_left() -> int | None:
    """What this process's cgroup (v2) still allows: its limit less what it holds and cannot
    drop; ``None`` without a limit (``max``) or a cgroup v2 to read."""
    try:
        limit = (CGROUP_DIR / "memory.max").read_text().strip()
        if limit == "max":
            return None
        used = int((CGROUP_DIR / "memory.current").read_text())
        lines = (CGROUP_DIR / "memory.stat").read_text().splitlines()
        stat = dict(line.split(" ", 1) for line in lines if " " in line)
        # The page cache ("file", shared memory included) counts as used, yet all but the
        # shared memory is dropped under pressure: a model's weights read once must not
        # make the arena look as if it had no room.
        reclaimable = max(0, int(stat.get("file", 0)) - int(stat.get("shmem", 0)))
        return max(0, int(limit) - used + reclaimable)
    except (OSError, ValueError):
        return None
