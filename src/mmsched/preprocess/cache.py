"""The front end's processed-features cache: a repeated image is neither decoded nor processed.

Entries are keyed by the image's content key ([`mmsched.preprocess.keys`][]) and hold its
``pixel_values`` and patch grid, bounded in bytes (``preprocess_cache_mb``), least recently
used out first. It holds one copy of each feature in memory of its own (host memory, or the
GPU's under the ``cuda`` backend), never a view of the payload store's arena: a cached view
would hold the arena's room, and everything written after it, for as long as it stays.

Cached tensors are shared by every request that hits them: nothing downstream may modify a
feature in place (the pipeline does not; a rank callback receives its own copy or a
read-only view).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CachedImage:
    """One image's processed features, as the cache keeps them."""

    pixels: torch.Tensor
    grid: tuple[int, int, int]

    @property
    def nbytes(self) -> int:
        return self.pixels.numel() * self.pixels.element_size()


@dataclass(frozen=True)
class ProcessedCacheStats:
    """What the cache did so far.

    Attributes:
        hits: images served from the cache: not decoded, not processed.
        misses: images looked up and not found (then decoded and processed).
        insertions: entries added.
        evictions: entries dropped to make room.
        bytes_held: bytes of features held now.
        entries: entries held now.
        capacity_bytes: the budget.
    """

    hits: int = 0
    misses: int = 0
    insertions: int = 0
    evictions: int = 0
    bytes_held: int = 0
    entries: int = 0
    capacity_bytes: int = 0


class ProcessedCache:
    """A byte-bounded LRU of processed images by content key (thread-safe)."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[bytes, CachedImage] = OrderedDict()
        self._held = 0
        self._lock = threading.Lock()
        self._hits = self._misses = self._insertions = self._evictions = 0

    def get(self, key: bytes) -> CachedImage | None:
        """The entry of ``key`` (now the most recently used), or ``None``."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self._misses += 1
                return None
            self._entries.move_to_end(key)
            self._hits += 1
            return entry

    def put(
        self, key: bytes, pixels: torch.Tensor, grid: tuple[int, int, int], *, copy: bool = True
    ) -> bool:
        """Keep ``pixels`` under ``key``, evicting the least recently used to make room;
        ``copy``: keep a copy (the caller's tensor may live in a store's arena, or count in
        a GPU budget), else the tensor itself. Returns whether it was kept (an entry larger
        than the whole budget is not)."""
        nbytes = pixels.numel() * pixels.element_size()
        if nbytes > self.capacity_bytes:
            return False
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return True
        owned = CachedImage(pixels.detach().clone() if copy else pixels, grid)  # unlocked
        with self._lock:
            if key in self._entries:
                return True
            while self._held + nbytes > self.capacity_bytes:
                _, old = self._entries.popitem(last=False)
                self._held -= old.nbytes
                self._evictions += 1
            self._entries[key] = owned
            self._held += nbytes
            self._insertions += 1
        return True

    def stats(self) -> ProcessedCacheStats:
        with self._lock:
            return ProcessedCacheStats(
                hits=self._hits,
                misses=self._misses,
                insertions=self._insertions,
                evictions=self._evictions,
                bytes_held=self._held,
                entries=len(self._entries),
                capacity_bytes=self.capacity_bytes,
            )
