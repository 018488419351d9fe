"""The physical floor of one request's fan-out on this machine, measured beside it.

Whatever the design, the bytes must be hashed once; on the copy path (the processor's output
in ordinary memory) they must also be put once where every rank can read them; where ranks
read every byte (``consume="read"``) one read pass follows. The floor is the best this
machine does for exactly that work, measured right after each request (interleaved, so
that both see the same machine state) on a payload of the same size made the same way (in
ordinary memory or in the arena, written just before: a hash of bytes just written runs
slower than a second hash of the same bytes, and the pipeline only ever does the first
kind). Each part is timed once,
as the pipeline does it once: on a machine whose threads wake slowly (a virtual machine's
do), the best of several tries would compare a row's median with a lucky minimum.

- copy: the faster of one ``memmove`` and the chunked copy on several threads
  ([`mmsched.stores.copying`][]), into a buffer whose pages are faulted in, as an arena's are;
- hash: the benchmark's hasher as the pipeline calls it (BLAKE3 on several threads);
- copy and hash at once (the copy on its threads while the hash runs), since a design may
  overlap them;
- read: [`read_pass`][mmsched.probes.read_pass], what a ``read`` rank does;
- to device (``consume="cuda"``): one copy of the payload's size from page-locked host
  memory to the GPU, the fastest way bytes reach a device;
- on device (a feature already on the GPU): one device-to-device copy of it.

Copy path: ``min(copy + hash, copy and hash at once)``; arena path (the processor wrote into
shared memory): ``hash``; plus ``read`` under ``consume="read"``, plus ``to device`` under
``consume="cuda"``. Repeat path (the ranks hold the feature in their cache): ``hash``, plus
``read`` under ``read``. GPU path (the processor's output is on the GPU): ``hash`` (which takes
the bytes to the host first, as the pipeline's hash does) plus ``on device``. A row faster
than its floor is a measurement bug.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mmsched.hashing import get_hasher, uncounted
from mmsched.probes import read_pass
from mmsched.stores.copying import ParallelCopier, wait


@dataclass(frozen=True)
class Floor:
    """Milliseconds of each part of one request's unavoidable work."""

    copy_ms: float
    hash_ms: float
    copy_and_hash_ms: float  # both at once
    read_ms: float
    to_device_ms: float = 0.0  # page-locked host -> GPU
    on_device_ms: float = 0.0  # GPU -> GPU

    def total_ms(self, path: str, consume: str) -> float:
        """The floor of a row: ``path`` is ``copy``, ``arena`` or ``gpu``, ``consume`` its
        mode."""
        if path == "gpu":
            return self.hash_ms + self.on_device_ms
        if path == "repeat":  # the ranks hold it already: only the hash is unavoidable
            return self.hash_ms + (self.read_ms if consume == "read" else 0.0)
        base = (
            self.hash_ms
            if path == "arena"
            else min(self.copy_ms + self.hash_ms, self.copy_and_hash_ms)
        )
        extra = {"read": self.read_ms, "cuda": self.to_device_ms}.get(consume, 0.0)
        return base + extra


class FloorMeter:
    """Measures [`Floor`][mmsched.bench.floor.Floor]s of payloads up to ``max_nbytes``."""

    def __init__(self, max_nbytes: int, hasher: str) -> None:
        self._target = torch.empty(max_nbytes, dtype=torch.uint8)
        self._target.fill_(0)  # fault the pages in once, as the arena does at start
        self._hasher = get_hasher(hasher)
        self._copier = ParallelCopier()
        self._max_nbytes = max_nbytes
        self._pinned: torch.Tensor | None = None  # made on first use: CUDA only if asked
        self._device_target: torch.Tensor | None = None

    def measure(self, payload: torch.Tensor, *, read: bool, to_device: bool = False) -> Floor:
        """One floor of ``payload`` (a contiguous tensor), each part timed once; a payload
        on a GPU gets the GPU path's parts (hash, one copy on the device). Its hashes are
        not counted in ``hash_stats`` (the count is the pipeline's)."""
        with uncounted():
            return self._measure(payload, read=read, to_device=to_device)

    def _measure(self, payload: torch.Tensor, *, read: bool, to_device: bool) -> Floor:
        nbytes = payload.numel() * payload.element_size()
        if payload.device.type == "cuda":
            return Floor(
                copy_ms=0.0,
                hash_ms=_timed(lambda: self._hasher.hash_tensor("image", payload)) * 1000,
                copy_and_hash_ms=0.0,
                read_ms=0.0,
                on_device_ms=self._device_copy_s(payload.reshape(-1).view(torch.uint8)) * 1000,
            )
        src = payload.data_ptr()
        dst = self._target.data_ptr()

        def both() -> None:
            copying = self._copier.start(dst, src, nbytes)
            self._hasher.hash_tensor("image", payload)
            wait(copying)

        hash_s = _timed(lambda: self._hasher.hash_tensor("image", payload))
        single_s = _timed(lambda: ctypes.memmove(dst, src, nbytes))
        parallel_s = _timed(lambda: self._copier.copy(dst, src, nbytes))
        both_s = _timed(both)
        read_s = _timed(lambda: read_pass(payload)) if read else 0.0
        to_device_s = self._device_copy_s(self._pinned_source(nbytes)) if to_device else 0.0
        return Floor(
            copy_ms=min(single_s, parallel_s) * 1000,
            hash_ms=hash_s * 1000,
            copy_and_hash_ms=both_s * 1000,
            read_ms=read_s * 1000,
            to_device_ms=to_device_s * 1000,
        )

    def _pinned_source(self, nbytes: int) -> torch.Tensor:
        if self._pinned is None:
            self._pinned = torch.empty(self._max_nbytes, dtype=torch.uint8, pin_memory=True)
            self._pinned.fill_(1)
        return self._pinned[:nbytes]

    def _device_copy_s(self, source: torch.Tensor) -> float:
        """One copy of ``source``'s bytes into GPU memory, timed to its completion."""
        if self._device_target is None:
            self._device_target = torch.empty(self._max_nbytes, dtype=torch.uint8, device="cuda")
        target = self._device_target[: source.numel()]
        torch.cuda.synchronize()

        def copy() -> None:
            target.copy_(source, non_blocking=True)
            torch.cuda.synchronize()

        return _timed(copy)

    def close(self) -> None:
        self._copier.close()
        self._pinned = self._device_target = None


def _timed(work: Callable[[], object]) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start
