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
- read: [`read_pass`][mmsched.probes.read_pass], what a ``read`` rank does.

Copy path: ``min(copy + hash, copy and hash at once)``; arena path (the processor wrote into
shared memory): ``hash``; plus ``read`` under ``consume="read"``. A row faster than its floor
is a measurement bug.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mmsched.hashing import get_hasher
from mmsched.probes import read_pass
from mmsched.stores.copying import ParallelCopier, wait


@dataclass(frozen=True)
class Floor:
    """Milliseconds of each part of one request's unavoidable work."""

    copy_ms: float
    hash_ms: float
    copy_and_hash_ms: float  # both at once
    read_ms: float

    def total_ms(self, path: str, consume: str) -> float:
        """The floor of a row: ``path`` is ``copy`` or ``arena``, ``consume`` its mode."""
        base = (
            self.hash_ms
            if path == "arena"
            else min(self.copy_ms + self.hash_ms, self.copy_and_hash_ms)
        )
        return base + (self.read_ms if consume == "read" else 0.0)


class FloorMeter:
    """Measures [`Floor`][mmsched.bench.floor.Floor]s of payloads up to ``max_nbytes``."""

    def __init__(self, max_nbytes: int, hasher: str) -> None:
        self._target = torch.empty(max_nbytes, dtype=torch.uint8)
        self._target.fill_(0)  # fault the pages in once, as the arena does at start
        self._hasher = get_hasher(hasher)
        self._copier = ParallelCopier()

    def measure(self, payload: torch.Tensor, *, read: bool) -> Floor:
        """One floor of ``payload`` (a contiguous CPU tensor), each part timed once."""
        src, nbytes = payload.data_ptr(), payload.numel() * payload.element_size()
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
        return Floor(
            copy_ms=min(single_s, parallel_s) * 1000,
            hash_ms=hash_s * 1000,
            copy_and_hash_ms=both_s * 1000,
            read_ms=read_s * 1000,
        )

    def close(self) -> None:
        self._copier.close()


def _timed(work: Callable[[], object]) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start
