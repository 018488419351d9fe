"""The preprocessing stage of ``mmsched serve``: content keys, the processed-features cache,
and the backend that decodes and processes what the cache does not hold.

For each image of a request, [`Preprocessor.process`][mmsched.preprocess.stage.Preprocessor.process]
takes its content key ([`mmsched.preprocess.keys`][]) over the encoded bytes, before any
decoding; looks the key up in the cache ([`mmsched.preprocess.cache`][]): a hit is neither
decoded nor processed; joins an image with the same key already being processed for another
request; and sends the rest to the backend chosen by ``preprocess_backend``:

- ``cpu``: worker processes ([`mmsched.preprocess.pool`][]), each on one core, writing into
  the payload store;
- ``threads``: Pillow on threads of this process ([`mmsched.preprocess.threads`][]);
- ``cuda``: GPU decoding and processing in micro-batches ([`mmsched.preprocess.cuda`][]);
- ``auto`` (the default): ``cpu`` where torchvision imports, else ``threads`` (said once at
  start).

Each processed image carries its key; the server passes the key's first 8 bytes to the
pipeline as the item's ``content_hash``, so the pipeline hashes no feature a second time
(except under the ``sglang-*`` hashers, whose hash must be SGLang's own over the features).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

from mmsched.config import PREPROCESS_BACKENDS as BACKENDS
from mmsched.config import Config
from mmsched.errors import ConfigError, MmschedError
from mmsched.preprocess.backend import Backend, Outcome, Processed
from mmsched.preprocess.cache import ProcessedCache, ProcessedCacheStats
from mmsched.preprocess.keys import content_key
from mmsched.preprocess.processor import PIL, TORCHVISION, torchvision_available
from mmsched.serve.media import EncodedImage, MediaLimits

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageSettings:
    """The stage's settings (``Config``'s ``preprocess_*`` fields, resolved)."""

    backend: str = "auto"
    workers: int | None = None
    device: str = "cuda:0"
    gpu_mb: int = 2048
    batch_ms: float = 2.0
    batch_images: int = 32
    cache_mb: int = 1024
    timeout_s: float = 60.0
    startup_timeout_s: float = 120.0
    ranks: int = 1  # this host's ranks: the cores they take are not the pool's
    http_processes: int = 1  # api_servers: with several, their cores are not the pool's either
    supply_keys: bool = True
    wire_pixels: str = "float32"  # what the backends make: the processor's output, or uint8

    @classmethod
    def of(cls, config: Config) -> StageSettings:
        """The settings a pipeline ``Config`` holds."""
        return cls(
            backend=config.preprocess_backend,
            workers=config.preprocess_workers,
            device=config.preprocess_device,
            gpu_mb=config.preprocess_gpu_mb,
            batch_ms=config.preprocess_batch_ms,
            batch_images=config.preprocess_batch_images,
            cache_mb=config.preprocess_cache_mb,
            timeout_s=config.timeout_s,
            startup_timeout_s=config.startup_timeout_s,
            ranks=config.ranks_per_node,
            http_processes=config.api_servers,
            # SGLang's hashers must hash the features themselves to give SGLang's values.
            supply_keys=not config.hasher.startswith("sglang"),
            wire_pixels=config.wire_pixels,
        )


def default_workers(ranks: int, http_processes: int = 1) -> int:
    """The ``cpu`` pool's size by default: the cores left after the server's process (one),
    its HTTP processes where it runs several (one each: each parses, decodes base64 and keys
    its requests) and this host's ranks (one each), at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    http = http_processes if http_processes > 1 else 0  # one: the server's own process
    return max(1, (cores or 1) - 1 - http - ranks)


@dataclass(frozen=True)
class PreprocessStats:
    """What the stage did so far.

    Attributes:
        backend: the backend running (``cpu``, ``threads``, ``cuda``).
        processed: images decoded and processed.
        cached: images served from the cache (neither decoded nor processed).
        joined: images that waited for the same key being processed for another request.
        refused: images that failed (HTTP 400 or 503).
        workers_replaced: ``cpu`` workers that died and were replaced.
        cache: the cache's own counters (``None`` without a cache).
    """

    backend: str
    processed: int
    cached: int
    joined: int
    refused: int
    workers_replaced: int
    cache: ProcessedCacheStats | None


@dataclass(frozen=True)
class Result:
    """One image's features with its content key (32 bytes); ``cached``: from the cache."""

    processed: Processed
    key: bytes
    cached: bool


class Preprocessor:
    """Keys, cache and backend (module docstring). ``start`` before use, ``aclose`` after."""

    def __init__(self, settings: StageSettings, limits: MediaLimits) -> None:
        if settings.backend not in BACKENDS:
            raise ConfigError(
                f"preprocess_backend must be one of {', '.join(BACKENDS)}, got {settings.backend!r}"
            )
        self.settings = settings
        self.limits = limits
        self.backend = self._backend(settings)
        self.cache = ProcessedCache(settings.cache_mb << 20) if settings.cache_mb else None
        self._inflight: dict[bytes, asyncio.Future[Outcome]] = {}
        self._processed = self._cached = self._joined = self._refused = 0

    def _backend(self, settings: StageSettings) -> Backend:
        name = settings.backend
        tv = torchvision_available()
        if name == "auto":
            name = "cpu" if tv else "threads"
            if not tv:
                log.warning(
                    "preprocessing: torchvision is absent, so the Pillow backend of the "
                    "processor runs on threads of this process (preprocess_backend=threads); "
                    "install torchvision for the cpu backend's process pool"
                )
        if name == "threads":
            from mmsched.preprocess.threads import ThreadBackend

            return ThreadBackend(self.limits, wire_pixels=settings.wire_pixels)
        if name == "cuda":
            from mmsched.preprocess.cuda import CudaBackend

            return CudaBackend(
                self.limits,
                settings.device,
                settings.gpu_mb,
                settings.batch_ms,
                settings.batch_images,
                settings.wire_pixels,
            )
        from mmsched.preprocess.pool import ProcessPoolBackend

        if not tv:
            log.warning(
                "preprocessing: torchvision is absent, so the cpu backend's workers run the "
                "Pillow backend of the processor (slower per image than torchvision's)"
            )
        return ProcessPoolBackend(
            self.limits,
            settings.workers or default_workers(settings.ranks, settings.http_processes),
            TORCHVISION if tv else PIL,
            timeout_s=settings.timeout_s,
            startup_timeout_s=settings.startup_timeout_s,
            wire_pixels=settings.wire_pixels,
        )

    @property
    def identity(self) -> bytes:
        """The processor's identity as the backend runs it (part of every key)."""
        return self.backend.identity

    def key(self, image: EncodedImage) -> bytes:
        """``image``'s content key under this stage's processor."""
        return content_key(image.data, image.format, self.backend.identity)

    async def start(self, pipeline: object | None = None) -> None:
        """Start the backend (its workers, its GPU context); ``pipeline``: where features
        go (the ``cpu`` backend's workers write into its payload store when it lends)."""
        await self.backend.start(pipeline)

    async def process(
        self, images: Sequence[EncodedImage], keys: Sequence[bytes] | None = None
    ) -> list[Result | MmschedError]:
        """Each image's features and key, or its own error, in order (``keys``: taken
        already, as the body arrived; else taken here)."""
        keys = list(keys) if keys is not None else [self.key(image) for image in images]
        results: list[Result | MmschedError | None] = [None] * len(images)
        todo: list[int] = []
        joined: list[tuple[int, asyncio.Future[Outcome]]] = []
        owned_here: dict[bytes, asyncio.Future[Outcome]] = {}
        loop = asyncio.get_running_loop()
        for n, key in enumerate(keys):
            hit = self.cache.get(key) if self.cache is not None else None
            if hit is not None:
                self._cached += 1
                results[n] = Result(Processed(hit.pixels, hit.grid), key, cached=True)
                continue
            running = self._inflight.get(key)
            if running is not None and key not in owned_here:
                self._joined += 1
                joined.append((n, running))
                continue
            if key in owned_here:  # the same image twice in one request: processed once
                joined.append((n, owned_here[key]))
                continue
            owned_here[key] = self._inflight[key] = loop.create_future()
            todo.append(n)
        outcomes: list[Outcome] | None = None
        try:
            outcomes = await self.backend.process([images[n] for n in todo]) if todo else []
        except MmschedError as exc:
            outcomes = [exc] * len(todo)
        finally:
            for n in todo:
                self._inflight.pop(keys[n], None)
            if outcomes is None:  # cancelled: whoever joined these images must not wait
                for future in owned_here.values():
                    if not future.done():
                        future.set_result(MmschedError("the request processing it went away"))
        keep: list[tuple[bytes, Processed]] = []
        for n, outcome in zip(todo, outcomes, strict=True):
            owned_here[keys[n]].set_result(outcome)
            results[n] = (
                Result(outcome, keys[n], False) if isinstance(outcome, Processed) else outcome
            )
            if isinstance(outcome, Processed):
                self._processed += 1
                keep.append((keys[n], outcome))
        if self.cache is not None and keep:
            await asyncio.to_thread(self._keep, keep)  # a copy of each: off the event loop
        for n, future in joined:
            outcome = await future
            results[n] = (
                Result(outcome, keys[n], False) if isinstance(outcome, Processed) else outcome
            )
        final = [r for r in results if r is not None]
        self._refused += sum(1 for r in final if isinstance(r, MmschedError))
        return final

    def _keep(self, processed: list[tuple[bytes, Processed]]) -> None:
        assert self.cache is not None
        for key, item in processed:
            self.cache.put(key, item.pixels, item.grid, copy=not item.owned)

    def stats(self) -> PreprocessStats:
        return PreprocessStats(
            backend=self.backend.name,
            processed=self._processed,
            cached=self._cached,
            joined=self._joined,
            refused=self._refused,
            workers_replaced=getattr(self.backend, "replaced", 0),
            cache=self.cache.stats() if self.cache is not None else None,
        )

    def metrics_text(self) -> str:
        """The stage's counters as Prometheus text lines."""
        s = self.stats()
        lines = [
            "# HELP mmsched_preprocess_images_total Images by what the preprocessing stage did.",
            "# TYPE mmsched_preprocess_images_total counter",
        ]
        for outcome, value in (
            ("processed", s.processed),
            ("cached", s.cached),
            ("joined", s.joined),
            ("refused", s.refused),
        ):
            lines.append(f'mmsched_preprocess_images_total{{outcome="{outcome}"}} {value}')
        lines += [
            "# HELP mmsched_preprocess_workers_replaced_total Worker processes that died.",
            "# TYPE mmsched_preprocess_workers_replaced_total counter",
            f"mmsched_preprocess_workers_replaced_total {s.workers_replaced}",
        ]
        if s.cache is not None:
            lines += [
                "# HELP mmsched_preprocess_cache_bytes Bytes the processed-features cache holds.",
                "# TYPE mmsched_preprocess_cache_bytes gauge",
                f"mmsched_preprocess_cache_bytes {s.cache.bytes_held}",
                "# HELP mmsched_preprocess_cache_evictions_total Entries evicted for room.",
                "# TYPE mmsched_preprocess_cache_evictions_total counter",
                f"mmsched_preprocess_cache_evictions_total {s.cache.evictions}",
            ]
        return "\n".join(lines) + "\n"

    async def aclose(self) -> None:
        """Stop the backend: no worker process or thread outlives this."""
        await self.backend.aclose()
