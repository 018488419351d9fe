"""Content hashes of multimodal feature tensors, chosen by name, and a count of every hash.

A hash names the media: equal media get equal pad values, the token ids that replace the
media's placeholder tokens in the input ids, so a prefix (radix) cache hits on a repeated
image. Four hashers are registered:

- ``blake3`` (default): BLAKE3 over a preimage of a domain tag, the modality, the dtype and
  the shape, then the raw bytes. Equal bytes under another shape or dtype hash differently,
  which closes the cache-poisoning hole of hashing bytes alone. Large tensors are hashed on
  several threads when no other hash runs (one thread each when several do).
- ``sha256``: ``int.from_bytes(sha256(bytes).digest()[:8], "big")`` over the tensor's raw
  bytes in C order (bf16 included, as stored). No domain tag, dtype or shape: equal bytes
  under another dtype or shape hash alike. For one tensor in native byte order its hash is
  SGLang's; its pad value is mmsched's own.
- ``sglang-0.5.23``: SGLang 0.5.23's own values, checked against that release's code (golden
  vectors made by ``scripts/sglang_golden/make_golden.py`` from the PyPI wheel's functions):
  the item hash of its ``hash_feature`` (SHA-256 over the feature's bytes *as given*: a numpy
  array in its stored byte order, each part of a (nested) list in turn), its four pad values
  (``_compute_pad_values`` in ``schedule_batch.py``) and the padded span that cycles through
  them (``padding_sequence``). It stops where SGLang's host path stops: a feature already on
  a GPU is hashed there by a Triton kernel that this mode does not reproduce, and a list whose
  first part is not a torch tensor is refused, as SGLang's ``hash_feature`` raises on it.
  ``sglang-0.5``, the name this mode had when it used an older formula (one pad value,
  ``1,000,000 + hash % 2**30``, never checked against SGLang's code), is a deprecated alias.
- ``xxh3``: XXH3-64 over the same preimage as blake3. Fast but *not cryptographic*: anyone
  who controls inputs can forge collisions. Opt in only where inputs are trusted.

**Pad values.** mmsched's own hashers give each item one pad value,
``PAD_VALUE_SHIFT + (hash & (2**62 - 1))``: above every vocabulary and below ``2**63``, so it
needs int64 token ids (which every frame of ids is). Two distinct images share a pad value
with probability about ``n**2 / 2**63`` after ``n`` distinct images (the birthday bound over
62 bits): about 1e-7 after a million, 1e-3 after a hundred million. The former 30-bit values
reached even odds after about 38,000 images, after which the prefix cache could match the
wrong image.

No hasher copies the tensor: bytes are read through a ``memoryview`` of the tensor's storage
(a non-contiguous tensor is made contiguous once).

Every hash is recorded in a process-wide counter ([`hash_stats`][]), which the benchmark
reads to report how many hashes a request cost and how much CPU they took.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import blake3 as _blake3
import numpy as np
import orjson
import torch
import xxhash

from mmsched.errors import InvalidMultimodalInput, UnknownNameError

log = logging.getLogger("mmsched.hashing")

PAD_VALUE_SHIFT = 1_000_000
"""Pad values start here, above the vocabulary of every model served today (Qwen2-VL:
151,936 ids), so that a pad id never equals a real token's id; SGLang's
``MM_PAD_SHIFT_VALUE`` is the same number."""

PAD_VALUE_MASK = (1 << 62) - 1
"""``pad_value = PAD_VALUE_SHIFT + (hash & PAD_VALUE_MASK)``: 62 bits of the hash, so that
two of ``n`` distinct images share a pad value with probability about ``n**2 / 2**63``, and
the shifted value stays below ``2**63`` (an int64 token id)."""

_DOMAIN_TAG = b"mmsched.feature.v1\x00"

# Below this size, spawning hashing threads costs more than it saves.
_BLAKE3_PARALLEL_MIN_BYTES = 1 << 20


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes as a flat ``memoryview``, without copying.

    A non-contiguous tensor is first made contiguous, and one on a GPU is copied into page-
    locked host memory (one copy, unavoidable: the hashers run on the CPU; page-locked, it
    goes at the bus's speed). The view keeps the storage alive.
    """
    flat = raw_bytes(tensor)
    if flat.device.type == "cuda":
        host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
        host.copy_(flat)
        flat = host
    elif flat.device.type != "cpu":
        flat = flat.cpu()
    return flat.numpy().data


def raw_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat, contiguous uint8 tensor on its own device: a view, or
    one copy where it was not contiguous. ``view(uint8)`` reinterprets any dtype, bf16
    included, as its raw bytes."""
    flat = tensor.detach()
    if not flat.is_contiguous():
        flat = flat.contiguous()
    return flat.reshape(-1).view(torch.uint8)


def _preimage_header(modality: str, tensor: torch.Tensor) -> bytes:
    # Length-prefixed so that no header can be confused with the start of another's bytes.
    meta = orjson.dumps([modality, str(tensor.dtype).removeprefix("torch."), list(tensor.shape)])
    return _DOMAIN_TAG + len(meta).to_bytes(4, "big") + meta


@dataclass(frozen=True)
class HashStats:
    """Hashes computed by this process so far and the process CPU time they took;
    ``supplied``: items whose hash the caller supplied (``content_hash``), not computed."""

    count: int = 0
    cpu_seconds: float = 0.0
    nbytes: int = 0
    supplied: int = 0

    def __add__(self, other: HashStats) -> HashStats:
        return HashStats(
            self.count + other.count,
            self.cpu_seconds + other.cpu_seconds,
            self.nbytes + other.nbytes,
            self.supplied + other.supplied,
        )

    def __sub__(self, other: HashStats) -> HashStats:
        return HashStats(
            self.count - other.count,
            self.cpu_seconds - other.cpu_seconds,
            self.nbytes - other.nbytes,
            self.supplied - other.supplied,
        )


class _HashCounter:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats = HashStats()
        self.uncounted = threading.local()  # .depth > 0: this thread's hashes are not counted

    def record(self, cpu_seconds: float, nbytes: int) -> None:
        if getattr(self.uncounted, "depth", 0):
            return
        with self._lock:
            s = self._stats
            self._stats = HashStats(
                s.count + 1, s.cpu_seconds + cpu_seconds, s.nbytes + nbytes, s.supplied
            )

    def record_supplied(self) -> None:
        if getattr(self.uncounted, "depth", 0):
            return
        with self._lock:
            s = self._stats
            self._stats = HashStats(s.count, s.cpu_seconds, s.nbytes, s.supplied + 1)

    def snapshot(self) -> HashStats:
        with self._lock:
            return self._stats


_COUNTER = _HashCounter()


def record_supplied_hash() -> None:
    """Count one item whose hash its caller supplied (in [`hash_stats`][]'s ``supplied``)."""
    _COUNTER.record_supplied()


def hash_stats() -> HashStats:
    """Hashes computed in this process since it started (all threads), but those of
    [`uncounted`][mmsched.hashing.uncounted] blocks."""
    return _COUNTER.snapshot()


@contextlib.contextmanager
def uncounted() -> Iterator[None]:
    """Hashes on this thread inside the block are left out of [`hash_stats`][]: for a
    benchmark's own hashes (its floor, its checks), so that the count is the pipeline's."""
    local = _COUNTER.uncounted
    local.depth = getattr(local, "depth", 0) + 1
    try:
        yield
    finally:
        local.depth -= 1


def padding_sequence(pad_values: Sequence[int], length: int) -> list[int]:
    """The ids of one media span of ``length`` tokens: ``pad_values`` over and over from the
    span's first token, the last round cut short (SGLang's ``padding_sequence``)."""
    repeats, remainder = divmod(length, len(pad_values))
    return list(pad_values) * repeats + list(pad_values[:remainder])


class Hasher(ABC):
    """Turns a feature into a 64-bit content hash, and a hash into its pad values."""

    name: str

    def pad_values(self, hash_value: int) -> tuple[int, ...]:
        """The token ids that stand for the media of this hash in the input ids, in the
        order a span cycles through them (see [`padding_sequence`][]). mmsched's own: one
        62-bit value (see [`PAD_VALUE_MASK`][mmsched.hashing.PAD_VALUE_MASK])."""
        return (PAD_VALUE_SHIFT + (hash_value & PAD_VALUE_MASK),)

    def pad_value(self, hash_value: int) -> int:
        """The first of [`pad_values`][mmsched.hashing.Hasher.pad_values]: the one value a
        consumer that takes a single id per item reads."""
        return self.pad_values(hash_value)[0]

    def hash_feature(self, modality: str, feature: torch.Tensor, given: Any = None) -> int:
        """Hash an item's feature; ``feature`` is the tensor mmsched carries (a list joined,
        an array in native byte order), ``given`` the feature as the processor handed it
        over. mmsched's own hashers hash ``feature``; a hasher that must match another
        system's values over the bytes as given reads ``given``."""
        return self.hash_tensor(modality, feature)

    def hash_tensor(self, modality: str, tensor: torch.Tensor) -> int:
        """Hash ``tensor`` (a feature of ``modality``) and record the cost in [`hash_stats`][]."""
        data = tensor_bytes(tensor)
        with self._threads_for(data.nbytes) as threads:
            # A hash on the calling thread is timed on that thread's clock, so that other
            # threads of the process (an event loop, socket I/O) are not counted; a
            # multi-threaded hash on the process clock, so that its worker threads are.
            clock = time.process_time if threads > 1 else time.thread_time
            start = clock()
            value = self._digest64(modality, tensor, data, threads)
            _COUNTER.record(clock() - start, data.nbytes)
        return value

    @contextlib.contextmanager
    def _threads_for(self, nbytes: int) -> Iterator[int]:
        yield 1

    @abstractmethod
    def _digest64(
        self, modality: str, tensor: torch.Tensor, data: memoryview, threads: int
    ) -> int: ...


class _CoreShares:
    """Gives a large hash every core when it runs alone, and one thread when others run.

    Alone, a hash on every core has the lowest latency. Under load, the tokenizer's workers
    hash several requests side by side, and each on its own thread costs least: BLAKE3 then
    needs no pool to wake or keep spinning (splitting the cores between the hashes in
    flight was tried first, and used more CPU per request for less throughput).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running = 0

    @property
    def running(self) -> int:
        return self._running

    @contextlib.contextmanager
    def share(self) -> Iterator[int]:
        with self._lock:
            self._running += 1
            alone = self._running == 1
        try:
            yield (os.cpu_count() or 1) if alone else 1
        finally:
            with self._lock:
                self._running -= 1


_CORES = _CoreShares()


def large_hashes_running() -> int:
    """Hashes of 1 MB or more running in this process now (a sign of load)."""
    return _CORES.running


class Blake3Hasher(Hasher):
    """BLAKE3 over a preimage of modality, dtype and shape, then the bytes; multi-threaded
    for large tensors. The default."""

    name = "blake3"

    @contextlib.contextmanager
    def _threads_for(self, nbytes: int) -> Iterator[int]:
        if nbytes < _BLAKE3_PARALLEL_MIN_BYTES:
            yield 1
            return
        with _CORES.share() as threads:
            yield threads

    def _digest64(self, modality: str, tensor: torch.Tensor, data: memoryview, threads: int) -> int:
        h = _blake3.blake3(_preimage_header(modality, tensor), max_threads=threads)
        h.update(data)
        return int.from_bytes(h.digest(8), "big")


class Sha256Hasher(Hasher):
    """SHA-256 of the raw bytes, first 8 bytes big-endian (SGLang's ``data_hash`` formula
    over the bytes as stored); no dtype or shape in the preimage."""

    name = "sha256"

    def _digest64(self, modality: str, tensor: torch.Tensor, data: memoryview, threads: int) -> int:
        return int.from_bytes(hashlib.sha256(data).digest()[:8], "big")


def _sglang_parts(feature: Any) -> list[memoryview]:
    """The buffers SGLang 0.5.23's ``hash_feature`` feeds to SHA-256, in order."""
    if isinstance(feature, np.ndarray):
        # Its numpy branch: the array made C-contiguous, its bytes in the stored byte order.
        return [np.ascontiguousarray(feature).data.cast("B")]
    if isinstance(feature, torch.Tensor):
        return [tensor_bytes(feature)]
    if isinstance(feature, list) and feature and isinstance(feature[0], torch.Tensor):
        # Its tensor-list branch: nested lists flattened, each part's bytes in turn.
        parts = list(_flatten(feature))
        for i, part in enumerate(parts):
            if not isinstance(part, torch.Tensor):
                raise InvalidMultimodalInput(
                    f"feature[{i}]",
                    f"a {type(part).__name__} in a list of tensors: SGLang 0.5.23 cannot hash "
                    "it (its tensor_hash calls .detach() on every part)",
                )
        return [tensor_bytes(part) for part in parts]
    raise InvalidMultimodalInput(
        "feature",
        f"SGLang 0.5.23 cannot hash a {type(feature).__name__} feature"
        + (
            " whose first part is not a torch tensor (its hash_feature hashes such a list "
            "as plain data, and SHA-256 refuses it); give torch tensors or one array"
            if isinstance(feature, list)
            else ""
        ),
    )


def _flatten(value: Any) -> Iterator[Any]:
    if isinstance(value, list):
        for inner in value:
            yield from _flatten(inner)
    else:
        yield value


class SglangHasher(Hasher):
    """SGLang 0.5.23's item hash, pad values and padded span, for features on the host.

    The hash is ``hash_feature``'s: SHA-256 over the feature's bytes as given (a numpy array
    in its stored byte order; each part of a nested list in turn), the first 8 bytes big-
    endian. The pad values are ``_compute_pad_values``': the SHA-256 digest of
    ``b"sglang-mm-wide-pad-v1"`` and the hash's 8 big-endian bytes, cut into four 8-byte
    words, each read big-endian, masked to 62 bits and shifted by ``MM_PAD_SHIFT_VALUE``. A
    span of the input ids cycles through the four from its first token. The constants are
    pinned here: mmsched's own pad values may change, these may not.
    """

    name = "sglang-0.5.23"
    MM_PAD_SHIFT_VALUE = 1_000_000
    WIDE_PAD_TAG = b"sglang-mm-wide-pad-v1"
    WIDE_PAD_MASK = (1 << 62) - 1
    _warned_gpu = False

    def pad_values(self, hash_value: int) -> tuple[int, ...]:
        digest = hashlib.sha256(self.WIDE_PAD_TAG + hash_value.to_bytes(8, "big")).digest()
        return tuple(
            self.MM_PAD_SHIFT_VALUE
            + (int.from_bytes(digest[i : i + 8], "big") & self.WIDE_PAD_MASK)
            for i in range(0, 32, 8)
        )

    def hash_feature(self, modality: str, feature: torch.Tensor, given: Any = None) -> int:
        return self.hash_given(feature if given is None else given)

    def hash_given(self, feature: Any) -> int:
        """SGLang's hash of ``feature`` in any form its host path takes: a tensor, a numpy
        array, or a (nested) list of tensors, ragged or of mixed dtypes included.

        Raises:
            InvalidMultimodalInput: a form SGLang 0.5.23 cannot hash (a list whose first
                part is not a torch tensor, a list mixing tensors with other values).
        """
        if not self._warned_gpu and any(
            isinstance(p, torch.Tensor) and p.device.type != "cpu" for p in _flatten([feature])
        ):
            # SGLang hashes a CUDA tensor with its Triton kernel, whose values differ.
            SglangHasher._warned_gpu = True
            log.warning(
                "sglang-0.5.23 hashes a GPU feature's bytes on the host; SGLang hashes it "
                "on the GPU with another function, so this hash will not equal SGLang's"
            )
        start = time.thread_time()
        parts = _sglang_parts(feature)
        digest = hashlib.sha256()
        for part in parts:
            digest.update(part)
        _COUNTER.record(time.thread_time() - start, sum(p.nbytes for p in parts))
        return int.from_bytes(digest.digest()[:8], "big")

    def _digest64(self, modality: str, tensor: torch.Tensor, data: memoryview, threads: int) -> int:
        return int.from_bytes(hashlib.sha256(data).digest()[:8], "big")


class Xxh3Hasher(Hasher):
    """XXH3-64 over the same preimage as BLAKE3: fast, not collision-resistant against an
    adversary. For deployments that trust every input."""

    name = "xxh3"

    def _digest64(self, modality: str, tensor: torch.Tensor, data: memoryview, threads: int) -> int:
        h = xxhash.xxh3_64(_preimage_header(modality, tensor))
        h.update(data)
        return int(h.intdigest())


HASHERS: dict[str, Hasher] = {
    h.name: h for h in (Blake3Hasher(), Sha256Hasher(), SglangHasher(), Xxh3Hasher())
}
DEFAULT_HASHER = "blake3"

DEPRECATED_HASHERS: dict[str, str] = {"sglang-0.5": "sglang-0.5.23"}
"""Old hasher names, and the hasher each now resolves to. ``sglang-0.5`` was chosen to get
SGLang's values; its formula did not give them (no pad value matched SGLang 0.5.23's), so it
resolves to the hasher that does rather than keep an unchecked formula under SGLang's name."""

_warned_names: set[str] = set()


def hasher_names() -> list[str]:
    """Every name [`get_hasher`][] accepts, deprecated aliases included, sorted."""
    return sorted([*HASHERS, *DEPRECATED_HASHERS])


def get_hasher(name: str) -> Hasher:
    """The hasher registered under ``name`` (a deprecated alias resolves, with a warning).

    Raises:
        UnknownNameError: no hasher of that name; the message lists the known ones.
    """
    target = DEPRECATED_HASHERS.get(name)
    if target is not None:
        if name not in _warned_names:
            _warned_names.add(name)
            log.warning("hasher %r is deprecated; it now means %r", name, target)
        name = target
    try:
        return HASHERS[name]
    except KeyError:
        raise UnknownNameError("hasher", name, list(HASHERS)) from None


def pad_values_of(hash_value: int, hasher: str = DEFAULT_HASHER) -> tuple[int, ...]:
    """The token ids that stand for this media in the input ids, as ``hasher`` computes
    them; a media span cycles through them (see [`padding_sequence`][])."""
    return get_hasher(hasher).pad_values(hash_value)


def pad_value_of(hash_value: int, hasher: str = DEFAULT_HASHER) -> int:
    """The first of [`pad_values_of`][]: the one id per item that scalar consumers read."""
    return get_hasher(hasher).pad_value(hash_value)
