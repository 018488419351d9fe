"""Content hashes of multimodal feature tensors, chosen by name, and a count of every hash.

A hash names the media: equal media get equal ``pad_value`` token ids, so a prefix (radix)
cache hits on a repeated image. Four hashers are registered:

- ``blake3`` (default): BLAKE3 over a preimage of a domain tag, the modality, the dtype and
  the shape, then the raw bytes. Equal bytes under another shape or dtype hash differently,
  which closes the cache-poisoning hole of hashing bytes alone. Large tensors are hashed on
  several threads when no other hash runs (one thread each when several do).
- ``sha256``: ``int.from_bytes(sha256(bytes).digest()[:8], "big")`` over the tensor's raw
  bytes in C order (bf16 included, as stored). No domain tag, dtype or shape: equal bytes
  under another dtype or shape hash alike. Its values equal ``sglang-0.5``'s today.
- ``sglang-0.5``: SGLang's own values, bit for bit, for host tensors: the ``sha256`` hash
  (SGLang's ``tensor_hash`` over raw bytes; a list of tensors is hashed as its tensors'
  bytes one after another, which is what a feature given as a list becomes here) and
  SGLang's pad value ``MM_PAD_SHIFT_VALUE + hash % 2**30`` with the shift of 1,000,000.
  SGLang hashes a tensor that is already on a GPU with a different (Triton) function; this
  mode reproduces the host path only. Choose it where matching SGLang is the point: its
  formula stays pinned to that version whatever mmsched's own defaults become.
- ``xxh3``: XXH3-64 over the same preimage as blake3. Fast but *not cryptographic*: anyone
  who controls inputs can forge collisions. Opt in only where inputs are trusted.

No hasher copies the tensor: bytes are read through a ``memoryview`` of the tensor's storage
(a non-contiguous tensor is made contiguous once).

Every hash is recorded in a process-wide counter ([`hash_stats`][]), which the benchmark
reads to report how many hashes a request cost and how much CPU they took.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

import blake3 as _blake3
import orjson
import torch
import xxhash

from mmsched.errors import UnknownNameError

PAD_VALUE_MODULUS = 2**30
"""``pad_value = PAD_VALUE_SHIFT + hash % PAD_VALUE_MODULUS`` keeps pad ids inside int32."""

PAD_VALUE_SHIFT = 1_000_000
"""Pad values start here, above the vocabulary of every model served today (Qwen2-VL:
151,936 ids), so that a pad id never equals a real token's id; SGLang's
``MM_PAD_SHIFT_VALUE`` is the same number."""

_DOMAIN_TAG = b"mmsched.feature.v1\x00"

# Below this size, spawning hashing threads costs more than it saves.
_BLAKE3_PARALLEL_MIN_BYTES = 1 << 20


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes as a flat ``memoryview``, without copying.

    A non-contiguous tensor is first made contiguous, and one on a GPU is copied into page-
    locked host memory (one copy, unavoidable: the hashers run on the CPU; page-locked, it
    goes at the bus's speed). The view keeps the storage alive.
    """
    flat = tensor.detach()
    if not flat.is_contiguous():
        flat = flat.contiguous()
    if flat.device.type == "cuda":
        host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
        host.copy_(flat)
        flat = host
    elif flat.device.type != "cpu":
        flat = flat.cpu()
    # view(uint8) reinterprets any dtype, bf16 included, as its raw bytes.
    return flat.reshape(-1).view(torch.uint8).numpy().data


def _preimage_header(modality: str, tensor: torch.Tensor) -> bytes:
    # Length-prefixed so that no header can be confused with the start of another's bytes.
    meta = orjson.dumps([modality, str(tensor.dtype).removeprefix("torch."), list(tensor.shape)])
    return _DOMAIN_TAG + len(meta).to_bytes(4, "big") + meta


@dataclass(frozen=True)
class HashStats:
    """Hashes computed by this process so far and the process CPU time they took."""

    count: int = 0
    cpu_seconds: float = 0.0
    nbytes: int = 0

    def __add__(self, other: HashStats) -> HashStats:
        return HashStats(
            self.count + other.count,
            self.cpu_seconds + other.cpu_seconds,
            self.nbytes + other.nbytes,
        )

    def __sub__(self, other: HashStats) -> HashStats:
        return HashStats(
            self.count - other.count,
            self.cpu_seconds - other.cpu_seconds,
            self.nbytes - other.nbytes,
        )


class _HashCounter:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats = HashStats()

    def record(self, cpu_seconds: float, nbytes: int) -> None:
        with self._lock:
            s = self._stats
            self._stats = HashStats(s.count + 1, s.cpu_seconds + cpu_seconds, s.nbytes + nbytes)

    def snapshot(self) -> HashStats:
        with self._lock:
            return self._stats


_COUNTER = _HashCounter()


def hash_stats() -> HashStats:
    """Hashes computed in this process since it started (all threads)."""
    return _COUNTER.snapshot()


class Hasher(ABC):
    """Turns a feature tensor into a 64-bit content hash, and a hash into a pad value."""

    name: str

    def pad_value(self, hash_value: int) -> int:
        """The token id that stands for the media of this hash in the input ids."""
        return PAD_VALUE_SHIFT + hash_value % PAD_VALUE_MODULUS

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


class SglangHasher(Sha256Hasher):
    """SGLang's hash and pad value for host tensors, as its sources compute them since
    ``tensor_hash`` reads raw bytes (bf16 as stored) and pad values are shifted by
    ``MM_PAD_SHIFT_VALUE``: ``sha256(raw bytes)[:8]`` big-endian, and
    ``1_000_000 + hash % 2**30``."""

    name = "sglang-0.5"
    # SGLang's constants, pinned here: mmsched's own pad values may change, these may not.
    MM_PAD_SHIFT_VALUE = 1_000_000
    MODULUS = 1 << 30

    def pad_value(self, hash_value: int) -> int:
        return self.MM_PAD_SHIFT_VALUE + hash_value % self.MODULUS


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


def get_hasher(name: str) -> Hasher:
    """The hasher registered under ``name``.

    Raises:
        UnknownNameError: no hasher of that name; the message lists the known ones.
    """
    try:
        return HASHERS[name]
    except KeyError:
        raise UnknownNameError("hasher", name, list(HASHERS)) from None


def pad_value_of(hash_value: int, hasher: str = DEFAULT_HASHER) -> int:
    """The token id that stands for this media in the input ids, as ``hasher`` computes it."""
    return get_hasher(hasher).pad_value(hash_value)
