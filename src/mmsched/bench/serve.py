"""``mmsched bench serve``: open-loop chat load with images against any OpenAI-compatible server.

Point it at ``mmsched serve``, or at an SGLang or vLLM server, and compare the same traffic:
requests arrive at a fixed mean rate (Poisson arrivals, as SGLang's ``bench_serving`` sends
them), each a streamed ``POST /v1/chat/completions`` with a short text and N images as
``data:`` URLs. By default every request carries images no other request carries, so a
server's caches see fresh bytes; with ``repeat`` a share of the requests resends the images
of an earlier request instead (the server's processed-features cache answers those).

The load generator must not be what saturates: at a thousand requests a second of 1.25 MB
bodies one Python process cannot send them on time. With ``clients`` above 1 the arrival
schedule is drawn once and dealt round-robin to that many client processes; each builds its
share's bodies (and encodes their images) before the clock starts, warms its connections,
then sends each request when it is due. The parent merges their outcomes. Every record says
whether the clients kept to the schedule: the rate they sent at against the rate the
schedule asked for, and how late each request left (its lag).

Measured per request: time to the first streamed content (TTFT) and to the end of the
stream (end to end), from the moment its arrival was due (so a client that falls behind
counts against the server, not in its favour); from ``mmsched serve``, also its own split
(``x-mmsched-timing``: the body's read, the images' keys, their processing, the whole
preparation, then the pipeline). Per run: requests completed and failed, achieved
throughput, percentiles, megabytes of request bodies per second.

Needs ``httpx`` and Pillow (both come with the ``serve`` extra).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import logging
import multiprocessing
import random
import statistics
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import orjson

from mmsched.errors import ConfigError, MmschedError

log = logging.getLogger(__name__)

PROMPT = "Describe the image."
WARMUP_REQUESTS = 2
"""Requests each client sends, one after another and untimed, before the clock starts: its
connections up, the server warm (their images are fresh, and never repeated)."""
LAG_OK_MS = 5.0
"""A client kept up when its p99 lag (a request's start after its due time) is at most this
and it sent at 95% or more of the scheduled rate."""
START_DELAY_S = 0.2
"""From the last client's being ready to the schedule's start: every client gets the start."""


@dataclass
class ServeRecord:
    """One (images per request, offered rate) point of a run. ``arrived_rps`` is the rate
    the random arrivals actually gave; ``keeps_up``: no request failed and the server
    answered at 95% or more of it.

    The clients' side: ``sent_rps``, the rate they actually sent at (requests over the span
    from the start to the last request's leaving); ``client_lag_ms``, how late the requests
    left after their due time (percentiles and ``max``); ``client_keeps_up``: a p99 lag of
    at most [`LAG_OK_MS`][mmsched.bench.serve.LAG_OK_MS] and ``sent_rps`` at 95% or more of
    ``arrived_rps``, so the server, not the load generator, set the figures;
    ``client_cpu_ms_per_request``, the CPU time the client processes spent per request
    (building excluded): a rate times it, over the clients, is the share of a core each
    needs.

    The server's split (``server_*_ms``, from ``x-mmsched-timing``; empty percentiles, all
    zero, from a server that sends none): ``read``, ``key``, ``prepare`` and ``pipeline``
    over every completed request, ``process`` over the requests with fresh images and
    ``process_repeat`` over those that resent earlier ones (``repeated`` of them);
    ``server`` and ``server_repeat``, the server's whole time for a request (its
    ``prepare`` plus its ``pipeline``: from the body's arrival to the answer), over each.

    ``server_images``: what the server's preprocessing stage did with the point's images
    (``processed``, ``cached``, ``joined``, ``refused``: the change in its
    ``mmsched_preprocess_images`` counter over the point, warm-up included, whose
    ``warmup_images`` were all fresh); empty from a server that does not export it.
    ``seed``: the run's, which drew its images and arrivals.
    """

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
    clients: int = 1
    repeat_share: float = 0.0
    repeated: int = 0
    sent_rps: float = 0.0
    client_lag_ms: dict[str, float] = field(default_factory=dict)
    client_keeps_up: bool = True
    client_cpu_ms_per_request: float = 0.0
    server_read_ms: dict[str, float] = field(default_factory=dict)
    server_key_ms: dict[str, float] = field(default_factory=dict)
    server_process_ms: dict[str, float] = field(default_factory=dict)
    server_process_repeat_ms: dict[str, float] = field(default_factory=dict)
    server_ms: dict[str, float] = field(default_factory=dict)
    server_repeat_ms: dict[str, float] = field(default_factory=dict)
    server_images: dict[str, int] = field(default_factory=dict)
    warmup_images: int = 0
    seed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Planned:
    """One request of a point's schedule.

    Attributes:
        index: its place in the schedule.
        due_s: when it is due, in seconds from the point's start.
        images: the ids of its images (an id names the same pixels in every client).
        repeat: its images are an earlier request's.
    """

    index: int
    due_s: float
    images: tuple[int, ...]
    repeat: bool


@dataclass
class _Outcome:
    index: int
    repeat: bool
    nbytes: int
    lag_s: float  # its start after its due time
    sent_s: float  # its start, from the point's start
    ended_s: float  # its end (answered or failed), from the point's start
    ttft_s: float | None
    e2e_s: float | None
    error: str
    server_ms: dict[str, float] | None = None  # mmsched's timing header, where it answers one


@dataclass
class _Share:
    """One client's part of a point: its outcomes, and the CPU its process spent sending."""

    outcomes: list[_Outcome]
    cpu_s: float  # the process's CPU time (every thread) from the start to the last answer


@dataclass(frozen=True)
class _Job:
    """What one client needs for one point: its share of the schedule and how to send it."""

    url: str
    model: str
    max_tokens: int
    size: tuple[int, int]
    image_format: str
    seed: int
    client: int
    images_per_request: int
    timeout_s: float
    planned: tuple[Planned, ...]


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


def make_image(words: Sequence[int], size: tuple[int, int], fmt: str) -> str:
    """One image of random pixels, seeded by ``words``, as a data URL."""
    if fmt not in ("png", "jpeg"):
        raise ConfigError(f"image format {fmt!r}: png or jpeg")
    from PIL import Image

    pixels = np.random.default_rng(list(words)).integers(
        0, 256, (size[1], size[0], 3), dtype=np.uint8
    )
    out = io.BytesIO()
    Image.fromarray(pixels).save(
        out, format=fmt.upper(), **({"quality": 90} if fmt == "jpeg" else {})
    )
    return f"data:image/{fmt};base64," + base64.b64encode(out.getvalue()).decode()


def make_images(count: int, size: tuple[int, int], fmt: str, seed: int) -> list[str]:
    """``count`` distinct images as data URLs (random pixels: no two alike)."""
    with ThreadPoolExecutor() as pool:  # Pillow encodes without the GIL
        return list(pool.map(lambda i: make_image((seed, i), size, fmt), range(count)))


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


def plan(requests: int, images: int, rate: float, repeat: float, seed: int) -> list[Planned]:
    """A point's schedule: Poisson arrivals at ``rate``; each request fresh images, or with
    probability ``repeat`` (never the first) the images of an earlier request.

    Raises:
        ConfigError: a rate that is not positive, or a share outside [0, 1].
    """
    if rate <= 0:
        raise ConfigError(f"a rate must be positive, got {rate:g}")
    if not 0 <= repeat <= 1:
        raise ConfigError(f"the repeat share must be in [0, 1], got {repeat:g}")
    arrivals, repeats = random.Random(seed), random.Random(f"{seed}-repeat")
    planned: list[Planned] = []
    due, fresh = 0.0, 0
    for index in range(requests):
        due += arrivals.expovariate(rate)
        if planned and repeats.random() < repeat:
            planned.append(Planned(index, due, repeats.choice(planned).images, True))
            continue
        planned.append(Planned(index, due, tuple(range(fresh, fresh + images)), False))
        fresh += images
    return planned


def _bodies(job: _Job) -> tuple[list[bytes], list[bytes]]:
    """The job's warm-up and timed bodies, every image encoded once (in threads: Pillow
    encodes without the GIL)."""
    ids = sorted({i for p in job.planned for i in p.images})
    warm = [(job.seed, 1, job.client, n) for n in range(WARMUP_REQUESTS * job.images_per_request)]
    words = [(job.seed, 0, i) for i in ids] + warm
    with ThreadPoolExecutor() as pool:
        urls = list(pool.map(lambda w: make_image(w, job.size, job.image_format), words))
    by_id = dict(zip(ids, urls[: len(ids)], strict=True))
    n = job.images_per_request
    warmup = [
        body_of(job.model, urls[len(ids) + k * n : len(ids) + (k + 1) * n], job.max_tokens)
        for k in range(WARMUP_REQUESTS)
    ]
    timed = [body_of(job.model, [by_id[i] for i in p.images], job.max_tokens) for p in job.planned]
    return warmup, timed


async def _one(
    client: Any, url: str, body: bytes, due: float, start: float, p: Planned
) -> _Outcome:
    """One streamed request, due at ``due`` (``time.perf_counter``); times from ``due``."""
    began = time.perf_counter()
    ttft = None
    server_ms = None
    error = ""
    try:
        async with client.stream(
            "POST", url, content=body, headers={"Content-Type": "application/json"}
        ) as response:
            server_ms = _server_timing(response.headers.get("x-mmsched-timing"))
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")[:200]
                error = f"HTTP {response.status_code}: {text}"
            else:
                # Read to the stream's end, past [DONE]: a response left unread closes its
                # connection, and a new one per request costs the client a connect and the
                # host a socket in TIME_WAIT.
                async for line in response.aiter_lines():
                    if ttft is None and line.startswith("data: ") and line != "data: [DONE]":
                        choices = orjson.loads(line[6:]).get("choices") or [{}]
                        if choices[0].get("delta", {}).get("content"):
                            ttft = time.perf_counter() - due
    except Exception as exc:  # a dropped connection, a timeout: this request failed
        error = f"{type(exc).__name__}: {exc}"
    ended = time.perf_counter()
    e2e = ended - due
    return _Outcome(
        p.index,
        p.repeat,
        len(body),
        began - due,
        began - start,
        ended - start,
        None if error else (ttft if ttft is not None else e2e),
        None if error else e2e,
        error,
        None if error else server_ms,
    )


async def _drive(
    job: _Job, bodies: tuple[list[bytes], list[bytes]], ready: Callable[[], Awaitable[float]]
) -> _Share:
    """One client's share: its warm-up, then (``ready`` gives the start, a ``time.time()``)
    each request sent when due."""
    import httpx

    warmup, timed = bodies
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=job.timeout_s, limits=limits) as client:
        for body in warmup:
            now = time.perf_counter()
            await _one(client, job.url, body, now, now, Planned(-1, 0.0, (), False))
        start_wall = await ready()
        # Wall clock to this process's perf_counter: the clients share the one start.
        start = time.perf_counter() + (start_wall - time.time())
        cpu = time.process_time()
        tasks = []
        for planned, body in zip(job.planned, timed, strict=True):
            due = start + planned.due_s
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_one(client, job.url, body, due, start, planned)))
        outcomes = list(await asyncio.gather(*tasks))
        return _Share(outcomes, time.process_time() - cpu)


def _client_main(conn: Any) -> None:
    """A client process: for each job received, build, warm up, say ready, wait for the
    start, send; ``None`` ends it."""
    while True:
        try:
            job = conn.recv()
        except EOFError:  # the parent closed its end: nothing more to do
            return
        if job is None:
            return
        try:
            bodies = _bodies(job)

            async def ready() -> float:
                conn.send("ready")
                start = await asyncio.to_thread(conn.recv)
                if not isinstance(start, float):  # another client failed: no start comes
                    raise MmschedError("the run was called off before the start")
                return start

            conn.send(("done", asyncio.run(_drive(job, bodies, ready))))
        except Exception:  # the parent reports it; this client stays for the next job
            conn.send(("error", traceback.format_exc()))


class _Clients:
    """``count`` client processes (spawned: no state of the parent's loop or threads)."""

    def __init__(self, count: int) -> None:
        log.info("bench serve: %d client processes", count)
        context = multiprocessing.get_context("spawn")
        self._conns = []
        self._procs = []
        for n in range(count):
            parent, child = context.Pipe()
            proc = context.Process(
                target=_client_main, args=(child,), name=f"mmsched-bench-client-{n}", daemon=True
            )
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)

    async def run(self, jobs: Sequence[_Job]) -> list[_Share]:
        """Every job on its client, all started at one moment; their outcomes merged.

        Raises:
            MmschedError: a client failed (its traceback in the message) or died.
        """
        for conn, job in zip(self._conns, jobs, strict=True):
            conn.send(job)
        for conn in self._conns:
            answer = await asyncio.to_thread(self._recv, conn)
            if answer != "ready":
                raise MmschedError(f"a bench client failed before the start: {answer[1]}")
        start = time.time() + START_DELAY_S
        for conn in self._conns:
            conn.send(start)
        shares: list[_Share] = []
        for conn in self._conns:
            kind, value = await asyncio.to_thread(self._recv, conn)
            if kind != "done":
                raise MmschedError(f"a bench client failed: {value}")
            shares.append(value)
        return shares

    @staticmethod
    def _recv(conn: Any) -> Any:
        try:
            return conn.recv()
        except EOFError:
            raise MmschedError("a bench client process died") from None

    def close(self) -> None:
        for conn in self._conns:
            with contextlib.suppress(OSError):  # one already gone
                conn.send(None)  # the end, or (to one waiting for a start) no start
            conn.close()  # a client still sending its error then reads the end
        for proc in self._procs:
            proc.join(10)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)


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


async def preprocess_counts(base_url: str) -> dict[str, int] | None:
    """The server's ``mmsched_preprocess_images`` counter by outcome (``GET /metrics`` at
    the root of ``base_url``'s host); empty where it has counted nothing yet, ``None``
    where there is no such page (another server) or it could not be read."""
    import httpx

    counts: dict[str, int] = {}
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.get(str(httpx.URL(base_url).join("/metrics")))
        if response.status_code != 200:
            return None
        prefix = 'mmsched_preprocess_images_total{outcome="'
        for line in response.text.splitlines():
            if line.startswith(prefix):
                outcome, _, value = line[len(prefix) :].partition('"} ')
                counts[outcome] = int(float(value))
    except (httpx.HTTPError, ValueError):  # a figure the record goes without
        return None
    return counts


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
    clients: int = 1,
    repeat: float = 0.0,
    on_record: Callable[[ServeRecord], None] | None = None,
) -> list[ServeRecord]:
    """Every (images, rate) point in turn; returns one record per point.

    Args:
        clients: processes that send the load (1: this one).
        repeat: the share of requests that resend an earlier request's images.

    Raises:
        ConfigError: a size, format, rate, share or client count that cannot be used.
        MmschedError: a client process failed.
    """
    size = parse_size(image_size)
    if image_format not in ("png", "jpeg"):
        raise ConfigError(f"image format {image_format!r}: png or jpeg")
    if clients < 1:
        raise ConfigError(f"clients must be at least 1, got {clients}")
    if requests < 1:
        raise ConfigError(f"requests must be at least 1, got {requests}")
    for rate in rates:  # refused before any process starts or image is made
        plan(1, 1, rate, repeat, seed)
    base = base_url.rstrip("/")
    model = model or await first_model(base)
    url = f"{base}/chat/completions"
    records = []
    pool = _Clients(clients) if clients > 1 else None
    try:
        for images in images_per_request:
            for rate in rates:
                point_seed = hash((seed, images, rate)) & 0xFFFFFFFF
                planned = plan(requests, images, rate, repeat, point_seed)
                jobs = [
                    _Job(url, model, max_tokens, size, image_format, point_seed, n, images,
                         timeout_s, tuple(planned[n::clients]))
                    for n in range(clients)
                ]  # fmt: skip
                before = await preprocess_counts(base)
                if pool is not None:
                    shares = await pool.run(jobs)
                else:
                    bodies = await asyncio.to_thread(_bodies, jobs[0])

                    async def now() -> float:
                        return time.time() + 0.01

                    shares = [await _drive(jobs[0], bodies, now)]
                record = _summary(planned, shares, repeat, clients)
                after = await preprocess_counts(base)
                # Both scrapes or none: a difference against a failed scrape would count the
                # server's whole life as this point's.
                record["server_images"] = (
                    {}
                    if before is None or after is None
                    else {k: v - before.get(k, 0) for k, v in after.items()}
                )
                record["warmup_images"] = clients * WARMUP_REQUESTS * images
                record.update(
                    seed=seed,
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
    finally:
        if pool is not None:
            await asyncio.to_thread(pool.close)
    return records


def _summary(
    planned: list[Planned], shares: list[_Share], repeat: float, clients: int
) -> dict[str, Any]:
    outcomes = sorted((o for share in shares for o in share.outcomes), key=lambda o: o.index)
    arrived = len(planned) / planned[-1].due_s  # the rate the Poisson draws actually gave
    duration = max(o.ended_s for o in outcomes)
    sent = len(outcomes) / max(o.sent_s for o in outcomes)
    done = [o for o in outcomes if not o.error]
    errors = [o.error for o in outcomes if o.error]
    mb = sum(o.nbytes for o in outcomes) / 1e6
    achieved = len(done) / duration if duration > 0 else 0.0
    lags = [max(0.0, o.lag_s) for o in outcomes]
    lag_ms = {**_percentiles(lags), "max": max(lags) * 1e3}

    def server(part: str, among: list[_Outcome] = done) -> dict[str, float]:
        return _percentiles(
            [o.server_ms[part] / 1e3 for o in among if o.server_ms and part in o.server_ms]
        )

    def whole(among: list[_Outcome]) -> dict[str, float]:
        parts = ("prepare", "pipeline")
        return _percentiles(
            [
                sum(o.server_ms[part] for part in parts) / 1e3
                for o in among
                if o.server_ms and all(part in o.server_ms for part in parts)
            ]
        )

    return {
        "mb_per_request": mb / len(outcomes),
        "requests": len(outcomes),
        "completed": len(done),
        "failed": len(errors),
        "duration_s": duration,
        "achieved_rps": achieved,
        "arrived_rps": arrived,
        "mb_sent_per_s": mb / duration if duration > 0 else 0.0,
        "ttft_ms": _percentiles([o.ttft_s for o in done if o.ttft_s is not None]),
        "e2e_ms": _percentiles([o.e2e_s for o in done if o.e2e_s is not None]),
        "server_prepare_ms": server("prepare"),
        "server_pipeline_ms": server("pipeline"),
        "keeps_up": not errors and achieved >= 0.95 * arrived,
        "first_error": errors[0] if errors else "",
        "clients": clients,
        "repeat_share": repeat,
        "repeated": sum(p.repeat for p in planned),
        "sent_rps": sent,
        "client_lag_ms": lag_ms,
        "client_keeps_up": lag_ms["p99"] <= LAG_OK_MS and sent >= 0.95 * arrived,
        "client_cpu_ms_per_request": sum(share.cpu_s for share in shares) / len(outcomes) * 1e3,
        "server_read_ms": server("read"),
        "server_key_ms": server("key"),
        "server_process_ms": server("process", [o for o in done if not o.repeat]),
        "server_process_repeat_ms": server("process", [o for o in done if o.repeat]),
        "server_ms": whole([o for o in done if not o.repeat]),
        "server_repeat_ms": whole([o for o in done if o.repeat]),
    }
