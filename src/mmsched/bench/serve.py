"""``mmsched bench serve``: open-loop chat load with images against any OpenAI-compatible server.

Point it at ``mmsched serve``, or at an SGLang or vLLM server, and compare the same traffic:
requests arrive at a fixed mean rate (Poisson arrivals, as SGLang's ``bench_serving`` sends
them), each a streamed ``POST /v1/chat/completions`` with a short text and N images as
``data:`` URLs. Every request carries images no other request carries (made and encoded
before the clock starts, one set per request), so a server's caches see fresh bytes.

Measured per request: time to the first streamed content (TTFT) and to the end of the
stream (end to end), from the moment its arrival was due (so a client that falls behind
counts against the server, not in its favour); from ``mmsched serve``, also its own split
(``x-mmsched-timing``: image decoding and processing, then the pipeline). Per run: requests
completed and failed, achieved throughput, percentiles, megabytes of request bodies per
second.

Needs ``httpx`` and Pillow (both come with the ``serve`` extra).
"""

from __future__ import annotations

import asyncio
import base64
import io
import random
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import orjson

from mmsched.errors import ConfigError

PROMPT = "Describe the image."
WARMUP_REQUESTS = 2


@dataclass
class ServeRecord:
    """One (images per request, offered rate) point of a run. ``arrived_rps`` is the rate
    the random arrivals actually gave; ``keeps_up``: no request failed and the server
    answered at 95% or more of it."""

    bench: str
    base_url: str
    model: str
    images_per_request: int
    image_size: str
    image_format: str
    mb_per_request: float
    offered_rps: float
    arrived_rps: float
    requests: int
    completed: int
    failed: int
    duration_s: float
    achieved_rps: float
    mb_sent_per_s: float
    ttft_ms: dict[str, float]
    e2e_ms: dict[str, float]
    server_prepare_ms: dict[str, float]
    server_pipeline_ms: dict[str, float]
    keeps_up: bool
    first_error: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Outcome:
    ttft_s: float | None
    e2e_s: float | None
    error: str
    server_ms: dict[str, float] | None = None  # mmsched's timing header, where it answers one


def _server_timing(value: str | None) -> dict[str, float] | None:
    """``prepare=1.2;pipeline=3.4`` as a dict; ``None`` from servers that send none."""
    if not value:
        return None
    try:
        return {k.strip(): float(v) for k, v in (p.split("=") for p in value.split(";"))}
    except ValueError:
        return None


def parse_size(text: str) -> tuple[int, int]:
    """``"1024x768"`` as ``(1024, 768)``.

    Raises:
        ConfigError: not two positive integers joined by ``x``.
    """
    try:
        width, height = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"image size {text!r} is not WIDTHxHEIGHT") from None
    if width < 1 or height < 1:
        raise ConfigError(f"image size {text!r} is not WIDTHxHEIGHT")
    return width, height


def make_images(count: int, size: tuple[int, int], fmt: str, seed: int) -> list[str]:
    """``count`` distinct images as data URLs (random pixels: no two alike)."""
    if fmt not in ("png", "jpeg"):
        raise ConfigError(f"image format {fmt!r}: png or jpeg")
    from PIL import Image

    def one(index: int) -> str:
        rng = np.random.default_rng([seed, index])
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        out = io.BytesIO()
        Image.fromarray(pixels).save(
            out, format=fmt.upper(), **({"quality": 90} if fmt == "jpeg" else {})
        )
        return f"data:image/{fmt};base64," + base64.b64encode(out.getvalue()).decode()

    with ThreadPoolExecutor() as pool:  # Pillow encodes without the GIL
        return list(pool.map(one, range(count)))


def body_of(model: str, urls: Sequence[str], max_tokens: int) -> bytes:
    parts: list[dict[str, Any]] = [{"type": "text", "text": PROMPT}]
    parts += [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    return orjson.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": parts}],
            "stream": True,
            "max_tokens": max_tokens,
        }
    )


async def _one(client: Any, url: str, body: bytes, due: float) -> _Outcome:
    """One streamed request; times from ``due`` (its scheduled arrival)."""
    ttft = None
    try:
        async with client.stream(
            "POST", url, content=body, headers={"Content-Type": "application/json"}
        ) as response:
            server_ms = _server_timing(response.headers.get("x-mmsched-timing"))
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")[:200]
                return _Outcome(None, None, f"HTTP {response.status_code}: {text}")
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                if ttft is None:
                    chunk = orjson.loads(data)
                    choices = chunk.get("choices") or [{}]
                    if choices[0].get("delta", {}).get("content"):
                        ttft = time.perf_counter() - due
    except Exception as exc:  # a dropped connection, a timeout: this request failed
        return _Outcome(None, None, f"{type(exc).__name__}: {exc}")
    e2e = time.perf_counter() - due
    return _Outcome(ttft if ttft is not None else e2e, e2e, "", server_ms)


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "mean": 0.0}
    ms = sorted(v * 1000 for v in values)

    def at(q: float) -> float:
        return ms[min(len(ms) - 1, round(q * (len(ms) - 1)))]

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "mean": statistics.fmean(ms)}


async def first_model(base_url: str) -> str:
    """The first model the server lists at ``GET /models``."""
    import httpx

    async with httpx.AsyncClient(timeout=30) as client:
        response = await client.get(f"{base_url.rstrip('/')}/models")
        response.raise_for_status()
        return str(response.json()["data"][0]["id"])


async def run_serve(
    base_url: str,
    *,
    model: str | None,
    rates: Sequence[float],
    images_per_request: Sequence[int],
    requests: int,
    image_size: str = "1024x768",
    image_format: str = "jpeg",
    max_tokens: int = 32,
    seed: int = 0,
    timeout_s: float = 300.0,
    on_record: Callable[[ServeRecord], None] | None = None,
) -> list[ServeRecord]:
    """Every (images, rate) point in turn; returns one record per point."""
    import httpx

    size = parse_size(image_size)
    base = base_url.rstrip("/")
    model = model or await first_model(base)
    url = f"{base}/chat/completions"
    records = []
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        for images in images_per_request:
            for rate in rates:
                count = WARMUP_REQUESTS + requests
                point_seed = hash((seed, images, rate)) & 0xFFFFFFFF
                urls = await asyncio.to_thread(
                    make_images, count * images, size, image_format, point_seed
                )
                bodies = [
                    body_of(model, urls[i * images : (i + 1) * images], max_tokens)
                    for i in range(count)
                ]
                for body in bodies[:WARMUP_REQUESTS]:  # connections up, server warm
                    await _one(client, url, body, time.perf_counter())
                record = await _point(client, url, bodies[WARMUP_REQUESTS:], rate, seed)
                record.update(
                    base_url=base,
                    model=model,
                    images_per_request=images,
                    image_size=image_size,
                    image_format=image_format,
                    offered_rps=rate,
                )
                result = ServeRecord(bench="serve", **record)
                records.append(result)
                if on_record is not None:
                    on_record(result)
    return records


async def _point(
    client: Any, url: str, bodies: list[bytes], rate: float, seed: int
) -> dict[str, Any]:
    arrivals = random.Random(seed)
    start = time.perf_counter()
    due = start
    tasks = []
    for body in bodies:
        due += arrivals.expovariate(rate)
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(_one(client, url, body, due)))
    arrived = len(bodies) / (due - start)  # the rate the Poisson draws actually gave
    outcomes = await asyncio.gather(*tasks)
    duration = time.perf_counter() - start
    done = [o for o in outcomes if not o.error]
    errors = [o.error for o in outcomes if o.error]
    mb = sum(len(b) for b in bodies) / 1e6
    achieved = len(done) / duration if duration > 0 else 0.0
    return {
        "mb_per_request": mb / len(bodies),
        "requests": len(bodies),
        "completed": len(done),
        "failed": len(errors),
        "duration_s": duration,
        "achieved_rps": achieved,
        "arrived_rps": arrived,
        "mb_sent_per_s": mb / duration if duration > 0 else 0.0,
        "ttft_ms": _percentiles([o.ttft_s for o in done if o.ttft_s is not None]),
        "e2e_ms": _percentiles([o.e2e_s for o in done if o.e2e_s is not None]),
        "server_prepare_ms": _percentiles(
            [o.server_ms["prepare"] / 1e3 for o in done if o.server_ms and "prepare" in o.server_ms]
        ),
        "server_pipeline_ms": _percentiles(
            [
                o.server_ms["pipeline"] / 1e3
                for o in done
                if o.server_ms and "pipeline" in o.server_ms
            ]
        ),
        "keeps_up": not errors and achieved >= 0.95 * arrived,
        "first_error": errors[0] if errors else "",
    }
