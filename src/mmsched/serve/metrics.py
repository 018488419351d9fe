"""The server's counters for ``GET /metrics``, kept and written by ``prometheus-client``.

Two kinds of figure:

- the HTTP side's ([`ServerMetrics`][mmsched.serve.metrics.ServerMetrics]): responses by
  endpoint and status, the chat latency histogram, images and feature bytes delivered,
  requests in flight. Each process that answers HTTP counts its own;
- the engine's ([`engine_families`][mmsched.serve.metrics.engine_families]): bytes sent to
  the entry rank, the feature cache, the preprocessing stage. Read from the pipeline and the
  stage when ``/metrics`` is asked, where they run.

With several HTTP processes (``mmsched serve --api-servers N``) the HTTP side's figures are
``prometheus-client``'s multiprocess values: every process writes its own into files under
``PROMETHEUS_MULTIPROC_DIR`` (set before ``prometheus_client`` is first imported: its value
class is chosen then), and whichever process answers ``/metrics`` sums them all (requests
in flight: over the processes alive). In one process they are plain in-memory values, in a
registry of the application's own (two applications in one process count apart).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mmsched.cache import CacheStats

if TYPE_CHECKING:
    from mmsched.preprocess.stage import PreprocessStats

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess() -> bool:
    """Whether this process's values are multiprocess ones (the environment says where)."""
    return bool(os.environ.get(MULTIPROC_ENV))


class ServerMetrics:
    """What the HTTP side counts; every method may be called from any thread."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._responses = Counter(
            "mmsched_http_responses",
            "Responses by endpoint and HTTP status.",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self._latency = Histogram(
            "mmsched_request_latency_seconds",
            "Chat completions: arrival to answer from every rank, seconds.",
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self._images = Counter("mmsched_images", "Images processed.", registry=self.registry)
        self._feature_bytes = Counter(
            "mmsched_feature_bytes",
            "Bytes of processed image features delivered to the ranks.",
            registry=self.registry,
        )
        # livesum: the processes alive, summed (a dead process's requests are not in flight).
        self._inflight = Gauge(
            "mmsched_inflight_requests",
            "Chat requests in progress.",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self._count = 0
        self._lock = threading.Lock()

    @property
    def inflight(self) -> int:
        """Chat requests in progress in this process."""
        return self._count

    @inflight.setter
    def inflight(self, value: int) -> None:
        with self._lock:
            self._count = value
            self._inflight.set(value)

    def answered(self, endpoint: str, status: int) -> None:
        self._responses.labels(endpoint=endpoint, status=str(status)).inc()

    def completed(self, seconds: float, images: int, feature_bytes: int) -> None:
        """A chat completion that reached every rank, ``seconds`` after it arrived."""
        self._images.inc(images)
        self._feature_bytes.inc(feature_bytes)
        self._latency.observe(seconds)

    def render(self, engine: Iterable[Metric] = ()) -> bytes:
        """The Prometheus text of the HTTP side's figures (every process's, summed, when
        multiprocess), then ``engine``'s families."""
        if multiprocess():
            from prometheus_client import multiprocess as mp

            registry = CollectorRegistry()
            mp.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            text = generate_latest(registry)
        else:
            text = generate_latest(self.registry)
        return text + render_families(engine)


class _Families(Collector):
    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def render_families(families: Iterable[Metric]) -> bytes:
    """``families`` in the Prometheus text format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    return generate_latest(registry)


def engine_families(
    *,
    request_bytes_sent: int,
    cache: CacheStats | None,
    preprocess: PreprocessStats | None = None,
) -> list[Metric]:
    """The engine's figures: what the pipeline sent, its feature cache, the stage's work."""
    families: list[Metric] = [
        CounterMetricFamily(
            "mmsched_request_bytes_sent",
            "Bytes the tokenizer sent to the entry rank (payload-store tensors count a reference).",
            value=request_bytes_sent,
        )
    ]
    if cache is not None:
        for name, value, text in (
            ("hits", cache.hits, "Features the ranks had cached."),
            ("misses", cache.misses, "Features that had to travel."),
            ("bytes_saved", cache.bytes_saved, "Feature bytes a hit kept off the wire."),
        ):
            families.append(CounterMetricFamily(f"mmsched_feature_cache_{name}", text, value))
    if preprocess is not None:
        images = CounterMetricFamily(
            "mmsched_preprocess_images",
            "Images by what the preprocessing stage did.",
            labels=["outcome"],
        )
        for outcome, value in (
            ("processed", preprocess.processed),
            ("cached", preprocess.cached),
            ("joined", preprocess.joined),
            ("refused", preprocess.refused),
        ):
            images.add_metric([outcome], value)
        families += [
            images,
            CounterMetricFamily(
                "mmsched_preprocess_workers_replaced",
                "Worker processes that died.",
                value=preprocess.workers_replaced,
            ),
        ]
        if preprocess.cache is not None:
            families += [
                GaugeMetricFamily(
                    "mmsched_preprocess_cache_bytes",
                    "Bytes the processed-features cache holds.",
                    value=preprocess.cache.bytes_held,
                ),
                CounterMetricFamily(
                    "mmsched_preprocess_cache_evictions",
                    "Entries evicted for room.",
                    value=preprocess.cache.evictions,
                ),
            ]
    return families
