"""Copies of large buffers split over a few threads, with the GIL released.

One thread copies about 6-10 GB/s; a server's memory system gives several times that to a
handful of threads. A payload of 1 MB or more is therefore cut into cache-line-aligned
chunks, each copied by ``memmove`` on a small pool of threads (``ctypes`` releases the GIL
for the call, so the event loop and a concurrent hash keep running). The pool's threads
sleep on a queue between copies: unlike an OpenMP team they burn no CPU when idle.
"""

from __future__ import annotations

import ctypes
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_all

# Below this a single memmove is faster than handing chunks to threads.
PARALLEL_MIN_BYTES = 1 << 20
_MIN_CHUNK = 512 << 10
_ALIGN = 64


def default_threads() -> int:
    """Copy threads: up to 8, fewer on a small machine (more gain nothing on memory bandwidth)."""
    return max(1, min(8, os.cpu_count() or 1))


class ParallelCopier:
    """Copies ``nbytes`` between two addresses on ``threads`` threads.

    The caller keeps both buffers alive until the copy is done (the futures resolved).
    """

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads or default_threads()
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="mmsched-copy")

    def start(
        self, dst: int, src: int, nbytes: int, *, pieces: int | None = None
    ) -> list[Future[int]]:
        """Begin the copy in up to ``pieces`` chunks (default: one per thread); it is done
        when every returned future is."""
        chunk = _chunk_size(nbytes, pieces or self.threads)
        futures: list[Future[int]] = []
        try:
            for at in range(0, nbytes, chunk):
                futures.append(
                    self._pool.submit(ctypes.memmove, dst + at, src + at, min(chunk, nbytes - at))
                )
        except BaseException:
            # A submit refused (the pool shut down) with chunks already running: they finish
            # first, so that a caller who gives the room up on this error (ArenaWriter.put)
            # gives up none that a copy still writes into.
            wait_all(futures)
            raise
        return futures

    def copy(self, dst: int, src: int, nbytes: int) -> None:
        """Copy and wait; a small copy runs on the calling thread. It returns or raises
        only once no chunk of it runs."""
        if nbytes < PARALLEL_MIN_BYTES or self.threads == 1:
            ctypes.memmove(dst, src, nbytes)
            return
        futures = self.start(dst, src, nbytes)
        try:
            wait(futures)
        except BaseException:  # an interrupt while waiting: the chunks still run out
            wait_all(futures)
            raise

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def wait(futures: list[Future[int]]) -> None:
    """Wait for every chunk of a copy (all of them, even if one failed), then raise its error."""
    errors = [f.exception() for f in futures]
    for error in errors:
        if error is not None:
            raise error


def _chunk_size(nbytes: int, threads: int) -> int:
    if nbytes < PARALLEL_MIN_BYTES:
        return max(nbytes, 1)
    chunk = max(_MIN_CHUNK, -(-nbytes // threads))
    return (chunk + _ALIGN - 1) // _ALIGN * _ALIGN


_shared: ParallelCopier | None = None
_shared_lock = threading.Lock()


def shared_copier() -> ParallelCopier:
    """The process's copier, made on first use."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = ParallelCopier()
        return _shared


def _forget_in_child() -> None:
    # A forked child has none of its parent's threads: a pool it inherited would queue
    # copies that no thread ever runs. It makes its own on first use.
    global _shared, _shared_lock
    _shared, _shared_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_in_child)
