"""The content-addressed feature cache: a repeated feature crosses to the ranks once.

Chat clients resend the whole conversation, images included, on every turn; the same image
or video is sent by many users. Each rank keeps the features it received in a
[`FeatureCache`][mmsched.cache.FeatureCache] bounded in bytes (``feature_cache_mb``), keyed
by the feature's content hash (with its dtype and shape), least recently used out first.
The tokenizer keeps a [`CacheMirror`][mmsched.cache.CacheMirror] of exactly what every rank
holds: same capacity, same order, driven by the same sequence of operations. For each
request it decides, per feature, *hit* (the ranks have it: only the key travels, and the
feature in the message is an empty placeholder), or *insert* (the bytes travel, and every
rank keeps them), and which entries go to make room; the request carries these operations
in order ([`CacheOps`][mmsched.cache.CacheOps]) and every rank applies them in the same
order. Requests reach the ranks in the order the mirror planned them: the tokenizer sends
them in that order ([`Sequencer`][mmsched.cache.Sequencer]).

A rank that misses nevertheless (a restart, a bug) fails that request with
[`RequestFailed`][mmsched.errors.RequestFailed] (kind ``CacheMiss``) and reports it; the
tokenizer then starts a new *epoch*: its mirror empties, and every rank empties its cache
when the first request of the new epoch arrives. Never wrong bytes, never a hang.

Trust: the key is the pipeline's content hash. Only a collision-resistant hasher may key a
cache whose hits skip the bytes (``blake3`` or ``sha256``; ``xxh3`` is refused): with a
forgeable hash, one user could make another's request use their image. Cached tensors are
shared by every request that hits them: callbacks must not modify features in place.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mmsched.errors import CodecError, MmschedError
from mmsched.frames import DTYPES, dtype_name
from mmsched.inputs import MultimodalDataItem, MultimodalInputs

CacheKey = tuple[int, str, tuple[int, ...]]
"""A feature's content hash, dtype name and shape."""


class CacheMiss(MmschedError):
    """A rank did not hold a feature the tokenizer's mirror says it holds."""


def key_of(item: MultimodalDataItem) -> CacheKey:
    """The cache key of ``item``'s feature."""
    return (item.hash, dtype_name(item.feature.dtype), tuple(item.feature.shape))


@dataclass
class CacheOps:
    """What one request does to every rank's cache, in order.

    ``ops`` holds ``("hit", item index, key)`` (the feature comes from the cache),
    ``("evict", key)`` and ``("insert", item index, key)`` (the feature is kept once the
    rank holds it), in the order the mirror applied them.
    """

    epoch: int
    ops: list[tuple[Any, ...]] = field(default_factory=list)

    def to_tree(self) -> list[Any]:
        """JSON-able values (what travels in the request)."""
        return [self.epoch, [[op[0], *op[1:-1], _key_tree(op[-1])] for op in self.ops]]

    @classmethod
    def from_tree(cls, tree: Any, items: int) -> CacheOps:
        """The operations a decoded request carries, checked against its ``items`` items.

        Raises:
            CodecError: they are malformed.
        """
        try:
            epoch, raw = tree
            if type(epoch) is not int or not isinstance(raw, list):
                raise ValueError("epoch and operations")
            ops: list[tuple[Any, ...]] = []
            for op in raw:
                kind = op[0]
                if kind == "evict" and len(op) == 2:
                    ops.append(("evict", _key(op[1])))
                elif kind in ("hit", "insert") and len(op) == 3:
                    if type(op[1]) is not int or not 0 <= op[1] < items:
                        raise ValueError(f"item index {op[1]!r}")
                    ops.append((kind, op[1], _key(op[2])))
                else:
                    raise ValueError(f"operation {str(op)[:80]}")
        except (TypeError, ValueError) as exc:
            raise CodecError(f"malformed feature cache operations: {exc}") from exc
        return cls(epoch, ops)


def _key_tree(key: CacheKey) -> list[Any]:
    return [key[0], key[1], list(key[2])]


def _key(tree: Any) -> CacheKey:
    digest, dtype, shape = tree
    if (
        type(digest) is not int
        or dtype not in DTYPES
        or not isinstance(shape, list)
        or not all(type(d) is int and d >= 0 for d in shape)
    ):
        raise ValueError(f"key {str(tree)[:80]}")
    return (digest, dtype, tuple(shape))


@dataclass
class CacheStats:
    """What a cache did so far (the tokenizer's mirror: the ranks' caches by construction).

    Attributes:
        hits: features served from the cache (their bytes did not travel).
        misses: features whose bytes travelled (not cached yet, or too large to cache).
        evictions: entries dropped to make room.
        bytes_saved: bytes of the hits.
        bytes_sent: feature bytes that travelled.
        bytes_held: bytes in the cache now.
        entries: entries in the cache now.
        resyncs: times the caches were emptied after a rank missed.
    """

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes_saved: int = 0
    bytes_sent: int = 0
    bytes_held: int = 0
    entries: int = 0
    resyncs: int = 0

    @property
    def hit_rate(self) -> float:
        """Hits over all features seen (0 before any)."""
        seen = self.hits + self.misses
        return self.hits / seen if seen else 0.0


class CacheMirror:
    """The tokenizer's copy of every rank's cache bookkeeping (keys and sizes, no bytes)."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[CacheKey, int] = OrderedDict()
        self._held = 0
        self._epoch = 0
        self._lock = threading.Lock()
        self._stats = CacheStats()
        self.sequencer = Sequencer()

    def plan(self, inputs: MultimodalInputs) -> tuple[MultimodalInputs, int]:
        """The request as it must travel (hit features replaced by empty placeholders, the
        operations in its ``cache`` field), and its ticket: it must be sent in the
        [`sequencer`][mmsched.cache.CacheMirror.sequencer]'s order. The mirror is updated
        as every rank will be."""
        ops: list[tuple[Any, ...]] = []
        items = list(inputs.mm_items)
        inserted: set[CacheKey] = set()
        with self._lock:
            for index, item in enumerate(items):
                key = key_of(item)
                nbytes = item.nbytes
                if key in inserted:
                    # The same feature twice in one request: the ranks keep the first copy
                    # only once it has arrived, so the second travels too (and changes
                    # nothing in the caches).
                    self._stats.misses += 1
                    self._stats.bytes_sent += nbytes
                    continue
                if key in self._entries:
                    self._entries.move_to_end(key)
                    ops.append(("hit", index, key))
                    self._stats.hits += 1
                    self._stats.bytes_saved += nbytes
                    items[index] = _placeholder(item)
                    continue
                self._stats.misses += 1
                self._stats.bytes_sent += nbytes
                if nbytes > self.capacity_bytes:
                    continue  # never cached: it travels every time
                while self._held + nbytes > self.capacity_bytes:
                    old, size = self._entries.popitem(last=False)
                    self._held -= size
                    self._stats.evictions += 1
                    ops.append(("evict", old))
                self._entries[key] = nbytes
                self._held += nbytes
                inserted.add(key)
                ops.append(("insert", index, key))
            planned = CacheOps(self._epoch, ops)
            ticket = self.sequencer.take()
        sent = MultimodalInputs(
            mm_items=items,
            hasher=inputs.hasher,
            special_token_ids=inputs.special_token_ids,
            mrope_positions=inputs.mrope_positions,
            mrope_position_delta=inputs.mrope_position_delta,
            cache=planned.to_tree(),
        )
        return sent, ticket

    def keys(self) -> list[CacheKey]:
        """The keys every rank's cache holds once it has applied the requests planned so
        far, least recently used first (the next to be evicted first)."""
        with self._lock:
            return list(self._entries)

    def reset(self) -> None:
        """Start a new epoch: empty here, and on every rank at its next request."""
        with self._lock:
            self._entries.clear()
            self._held = 0
            self._epoch += 1
            self._stats.resyncs += 1

    def stats(self) -> CacheStats:
        """A snapshot of the counters, with what the caches hold now."""
        with self._lock:
            return CacheStats(
                **{
                    **vars(self._stats),
                    "bytes_held": self._held,
                    "entries": len(self._entries),
                }
            )


def _placeholder(item: MultimodalDataItem) -> MultimodalDataItem:
    return MultimodalDataItem(
        modality=item.modality,
        feature=torch.empty(0, dtype=item.feature.dtype),
        offsets=list(item.offsets),
        hash=item.hash,
        pad_value=item.pad_value,
        model_specific_data=item.model_specific_data,
        pad_values=item.pad_values,
    )


class FeatureCache:
    """One rank's cache: applies each request's [`CacheOps`][mmsched.cache.CacheOps]."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[CacheKey, torch.Tensor | None] = OrderedDict()
        self._epoch = 0

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[CacheKey]:
        """The keys this rank holds or has reserved for a feature on its way, least
        recently used first: the tokenizer's [`CacheMirror.keys`][mmsched.cache.CacheMirror.keys]
        in the same order, by construction."""
        return list(self._entries)

    def clear(self) -> None:
        """Forget everything (a rank restarted: what a test simulates with this)."""
        self._entries.clear()

    def fetch(self, inputs: MultimodalInputs, ops: CacheOps) -> list[int]:
        """Apply ``ops`` in order: hits fill their items' features from the cache, evictions
        drop entries, inserts reserve their place. Returns the item indices to
        [`keep`][mmsched.cache.FeatureCache.keep] once the rank holds them.

        Raises:
            CacheMiss: a hit on a key this rank does not hold (or holds with other bytes'
                shape); nothing of the request is used.
        """
        if ops.epoch != self._epoch:
            self._entries.clear()  # the tokenizer started over: so does every rank
            self._epoch = ops.epoch
        inserts: list[int] = []
        for op in ops.ops:
            if op[0] == "evict":
                self._entries.pop(op[1], None)
                continue
            index, key = op[1], op[2]
            if op[0] == "insert":
                self._entries[key] = None
                self._entries.move_to_end(key)
                inserts.append(index)
                continue
            tensor = self._entries.get(key)
            if tensor is None or tuple(tensor.shape) != key[2]:
                raise CacheMiss(f"feature {key[0]:016x} is not in this rank's cache")
            self._entries.move_to_end(key)
            inputs.mm_items[index].feature = tensor
        return inserts

    def keep(self, inputs: MultimodalInputs, inserts: Sequence[int], ops: CacheOps) -> None:
        """Keep the features of ``inserts`` (after they reached the rank's device).

        A host tensor is copied first: it may view a store's shared memory or a transport's
        buffer, and a cached view would hold that memory (and, in a ring, everything after
        it) for as long as it stays cached. A GPU tensor is the rank's own copy already.
        """
        keys = {op[1]: op[2] for op in ops.ops if op[0] == "insert"}
        for index in inserts:
            key = keys[index]
            if key not in self._entries:
                continue  # evicted again by the same request (it did not fit with the rest)
            feature = inputs.mm_items[index].feature
            self._entries[key] = feature if feature.device.type == "cuda" else _owned(feature)


def _owned(feature: torch.Tensor) -> torch.Tensor:
    """A copy of a host tensor in memory of its own: with numpy, not torch, whose thread
    team would keep spinning on every core of a rank after the copy."""
    data = feature.detach().contiguous()
    if data.dtype in _NUMPY_UNSAFE:  # numpy has no bfloat16: copy the raw bytes
        raw = data.view(torch.uint8) if data.dim() else data.reshape(1).view(torch.uint8)
        return torch.from_numpy(raw.numpy().copy()).view(data.dtype).reshape(data.shape)
    return torch.from_numpy(data.numpy().copy())


_NUMPY_UNSAFE = {torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2}


class Sequencer:
    """Sends happen in the order tickets were taken (the order the mirror planned)."""

    def __init__(self) -> None:
        self._next_ticket = 0
        self._turn = 0
        self._done: set[int] = set()
        self._lock = threading.Lock()
        self._waiters: dict[int, asyncio.Future[None]] = {}

    def take(self) -> int:
        """A ticket: take it while holding the mirror's order (any thread)."""
        with self._lock:
            ticket = self._next_ticket
            self._next_ticket += 1
            return ticket

    async def wait_turn(self, ticket: int, timeout_s: float) -> bool:
        """Wait until every earlier ticket is [`done`][mmsched.cache.Sequencer.done].

        Returns ``False`` if that took longer than ``timeout_s``: the earlier ones are then
        skipped (the caller starts the caches over; keys are content hashes, so requests
        that go out of plan order can only miss, never get another feature's bytes).
        """
        if ticket <= self._turn:
            return True
        future = asyncio.get_running_loop().create_future()
        self._waiters[ticket] = future
        try:
            await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            self._turn = ticket
            self._done = {t for t in self._done if t > ticket}
            return False
        finally:
            self._waiters.pop(ticket, None)
        return True

    def done(self, ticket: int) -> None:
        """``ticket`` was sent, or will never be (event loop thread)."""
        self._done.add(ticket)
        while self._turn in self._done:
            self._done.discard(self._turn)
            self._turn += 1
        waiter = self._waiters.get(self._turn)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
