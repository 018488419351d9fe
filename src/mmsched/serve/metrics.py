"""The server's counters, written in the Prometheus text format for ``GET /metrics``.

Written by hand (a few counters and one histogram) rather than with a client library: the
format is small and stable, and the server then needs no other dependency.
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter
from dataclasses import dataclass, field

from mmsched.cache import CacheStats

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class ServerMetrics:
    """What the server counts; every method may be called from any thread."""

    responses: Counter[tuple[str, int]] = field(default_factory=Counter)
    images: int = 0
    feature_bytes: int = 0
    inflight: int = 0
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_S) + 1))
    latency_sum_s: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def answered(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.responses[(endpoint, status)] += 1

    def completed(self, seconds: float, images: int, feature_bytes: int) -> None:
        """A chat completion that reached every rank, ``seconds`` after it arrived."""
        with self._lock:
            self.images += images
            self.feature_bytes += feature_bytes
            self.latency_counts[bisect.bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
            self.latency_sum_s += seconds

    def render(self, *, request_bytes_sent: int, cache: CacheStats | None) -> str:
        """The Prometheus text exposition of every counter."""
        with self._lock:
            lines = [
                "# HELP mmsched_http_responses_total Responses by endpoint and HTTP status.",
                "# TYPE mmsched_http_responses_total counter",
            ]
            for (endpoint, status), count in sorted(self.responses.items()):
                lines.append(
                    f'mmsched_http_responses_total{{endpoint="{endpoint}",status="{status}"}} '
                    f"{count}"
                )
            lines += _histogram(
                "mmsched_request_latency_seconds",
                "Chat completions: arrival to answer from every rank, seconds.",
                self.latency_counts,
                self.latency_sum_s,
            )
            lines += _single("mmsched_images_total", "counter", "Images processed.", self.images)
            lines += _single(
                "mmsched_feature_bytes_total",
                "counter",
                "Bytes of processed image features delivered to the ranks.",
                self.feature_bytes,
            )
            lines += _single(
                "mmsched_inflight_requests", "gauge", "Chat requests in progress.", self.inflight
            )
        lines += _single(
            "mmsched_request_bytes_sent_total",
            "counter",
            "Bytes the tokenizer sent to the entry rank (payload-store tensors count a reference).",
            request_bytes_sent,
        )
        if cache is not None:
            for name, value, text in (
                ("hits", cache.hits, "Features the ranks had cached."),
                ("misses", cache.misses, "Features that had to travel."),
                ("bytes_saved", cache.bytes_saved, "Feature bytes a hit kept off the wire."),
            ):
                lines += _single(f"mmsched_feature_cache_{name}_total", "counter", text, value)
        return "\n".join(lines) + "\n"


def _single(name: str, kind: str, text: str, value: float) -> list[str]:
    return [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {value}"]


def _histogram(name: str, text: str, counts: list[int], total: float) -> list[str]:
    lines = [f"# HELP {name} {text}", f"# TYPE {name} histogram"]
    cumulative = 0
    for bound, count in zip((*LATENCY_BUCKETS_S, float("inf")), counts, strict=True):
        cumulative += count
        le = "+Inf" if bound == float("inf") else repr(bound)
        lines.append(f'{name}_bucket{{le="{le}"}} {cumulative}')
    lines += [f"{name}_sum {total}", f"{name}_count {cumulative}"]
    return lines
