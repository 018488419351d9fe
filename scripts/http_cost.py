"""What one chat request's HTTP layer costs the server's CPU, before any preprocessing.

The body is what ``mmsched bench serve`` sends (``--image-size`` JPEG of random pixels,
quality 90, ``--images`` of them, base64 in ``data:`` URLs: about 1.25 MB of JSON for one
1024x768 image). Two measurements:

1. **stages**, on one thread of this process (median of ``--repeats``): ``orjson.loads`` of
   the body, the options check, the messages' layout (text tokenized), each image's base64
   decoded out of its URL, and its BLAKE3 content key: the server's own functions, the same
   calls its chat route makes before the preprocessing stage;
2. **http**: a real uvicorn + FastAPI process (uvicorn's defaults, as ``mmsched serve`` runs
   it, in a process of its own) whose chat route does exactly what ``mmsched serve``'s does
   up to the preprocessing stage (read the body within its limit, parse, check the options
   and the model, lay out the messages, decode and key every image) and answers a small JSON
   object; ``--connections`` keep-alive clients send it ``--requests`` bodies (after
   ``--warmup``). The figure is the server process's CPU time (user + system, every thread)
   per request, so the client's own cost, on the same cores, is not in it; ``ceiling_rps``
   is 1 / that: the requests per second one such process can take at most, its cores
   permitting, since the GIL serializes all of it but BLAKE3 and socket copies.

``--api-servers N`` runs that route in N processes on one port (SO_REUSEPORT), as
``mmsched serve --api-servers N`` does, and sums their CPU. One line of JSON per figure, then
a summary. Run it with the project's Python (the serve extra).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import orjson
import psutil
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from mmsched.bench.serve import body_of, make_images, parse_size
from mmsched.preprocess.keys import content_key, processor_identity
from mmsched.serve.app import DEFAULT_MODEL, ServeSettings, _HttpError, _options, _read_json
from mmsched.serve.chat import ChatProcessor
from mmsched.serve.media import BadRequest, MediaLimits, read_image_url
from mmsched.serve.options import chat_options


def median_ms(job: Callable[[], Any], repeats: int) -> float:
    job()  # warm: first-call costs are not the steady state
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        job()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


class _Keys:
    """The stage's ``key`` without its backend: BLAKE3 under the Pillow processor's identity."""

    def __init__(self, chat: ChatProcessor) -> None:
        self.identity = processor_identity("pil", chat.image_processor)

    def key(self, image: Any) -> bytes:
        return content_key(image.data, image.format, self.identity)


def stages(body: bytes, repeats: int) -> dict[str, float]:
    """The median milliseconds of each step of the chat route before preprocessing."""
    chat = ChatProcessor()
    keys = _Keys(chat)
    parsed = orjson.loads(body)
    _, images = chat._layout(parsed["messages"])
    encoded = [read_image_url(param, url, chat.limits) for param, url in images]
    return {
        "json_parse_ms": median_ms(lambda: orjson.loads(body), repeats),
        "options_ms": median_ms(lambda: chat_options(parsed), repeats),
        "layout_ms": median_ms(lambda: chat._layout(parsed["messages"]), repeats),
        "base64_decode_ms": median_ms(
            lambda: [read_image_url(p, u, chat.limits) for p, u in images], repeats
        ),
        "blake3_key_ms": median_ms(lambda: [keys.key(image) for image in encoded], repeats),
    }


def serve_front(port: int) -> None:
    """Serve the chat route's front half on ``port`` (this script's server processes)."""
    import uvicorn

    settings = ServeSettings()
    chat = ChatProcessor(limits=MediaLimits(settings.max_image_mb << 20))
    keys = _Keys(chat)
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        try:
            body = await _read_json(request, settings.max_body_mb << 20)
            _options(body, settings.model)
            # As prepare_async: layout, base64 and keys on a worker thread.
            read = await asyncio.to_thread(chat.read, body.get("messages"), keys.key)
        except _HttpError as exc:
            return exc.response()
        except BadRequest as exc:
            return _HttpError(400, "invalid_request_error", exc.problem, exc.param).response()
        keys_hex = [k.hex() for k in read.keys]
        return JSONResponse({"images": len(read.images), "keys": keys_hex})

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    config = uvicorn.Config(app, log_level="warning")
    uvicorn.Server(config).run(sockets=[sock])


async def _client(port: int, request: bytes, count: int, latencies: list[float]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for _ in range(count):
            start = time.perf_counter()
            writer.write(request)
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            status = head.split(b" ", 2)[1]
            if status != b"200":
                raise SystemExit(f"the server answered {status.decode()}: {head!r}")
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - start)
    finally:
        writer.close()


async def _drive(port: int, request: bytes, requests: int, connections: int) -> list[float]:
    latencies: list[float] = []
    share = [requests // connections + (i < requests % connections) for i in range(connections)]
    await asyncio.gather(*(_client(port, request, n, latencies) for n in share if n))
    return latencies


def _wait(port: int, processes: list[subprocess.Popen[bytes]], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in processes):
            raise SystemExit("a server process exited while starting")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise SystemExit("the server did not start")


def http(body: bytes, args: argparse.Namespace) -> dict[str, float]:
    """The server processes' CPU per request and what the clients saw."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    command = [sys.executable, __file__, "--serve-front", str(port)]
    processes = [subprocess.Popen(command) for _ in range(args.api_servers)]
    try:
        _wait(port, processes)
        time.sleep(1.0)  # every process listening, not only the first
        request = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        asyncio.run(_drive(port, request, args.warmup, args.connections))
        watched = [psutil.Process(p.pid) for p in processes]
        before = [w.cpu_times() for w in watched]
        start = time.perf_counter()
        latencies = asyncio.run(_drive(port, request, args.requests, args.connections))
        wall = time.perf_counter() - start
        after = [w.cpu_times() for w in watched]
    finally:
        for p in processes:
            p.terminate()
        for p in processes:
            p.wait(30)
    cpu = sum((a.user - b.user) + (a.system - b.system) for a, b in zip(after, before, strict=True))
    user = sum(a.user - b.user for a, b in zip(after, before, strict=True))
    per_request_ms = cpu / args.requests * 1e3
    latencies.sort()
    return {
        "server_cpu_ms_per_request": per_request_ms,
        "server_user_ms_per_request": user / args.requests * 1e3,
        "server_system_ms_per_request": (cpu - user) / args.requests * 1e3,
        "ceiling_rps": 1e3 / per_request_ms * args.api_servers
        if args.api_servers > 1
        else 1e3 / per_request_ms,
        "achieved_rps": args.requests / wall,
        "latency_p50_ms": latencies[len(latencies) // 2] * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", default="1024x768", help="WIDTHxHEIGHT")
    parser.add_argument("--images", type=int, default=1, help="images per request")
    parser.add_argument("--repeats", type=int, default=50, help="of each stage")
    parser.add_argument("--requests", type=int, default=400, help="measured HTTP requests")
    parser.add_argument("--warmup", type=int, default=40, help="HTTP requests first")
    parser.add_argument("--connections", type=int, default=4, help="keep-alive clients")
    parser.add_argument("--api-servers", type=int, default=1, help="HTTP processes, one port")
    parser.add_argument("--serve-front", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_front is not None:
        serve_front(args.serve_front)
        return
    urls = make_images(args.images, parse_size(args.image_size), "jpeg", seed=0)
    body = body_of(DEFAULT_MODEL, urls, 16)
    jpeg = sum(len(base64.b64decode(u.split(",", 1)[1])) for u in urls)
    common = {"body_bytes": len(body), "jpeg_bytes": jpeg, "images": args.images}
    figures = {**stages(body, args.repeats), **http(body, args)}
    for name, value in figures.items():
        print(json.dumps({**common, "figure": name, "value": round(value, 3)}))
    steps = sum(v for k, v in figures.items() if k.endswith("_ms") and k != "latency_p50_ms")
    cpus = os.cpu_count()
    print(
        f"\nbody {len(body) / 1e6:.2f} MB ({args.images} x {args.image_size} JPEG, "
        f"{jpeg / 1e6:.2f} MB), {cpus} CPUs\n"
        f"  stages on one thread: {steps:.2f} ms (parse {figures['json_parse_ms']:.2f}, "
        f"base64 {figures['base64_decode_ms']:.2f}, BLAKE3 {figures['blake3_key_ms']:.2f})\n"
        f"  HTTP process{'es' if args.api_servers > 1 else ''} ({args.api_servers}): "
        f"{figures['server_cpu_ms_per_request']:.2f} ms of CPU per request "
        f"(user {figures['server_user_ms_per_request']:.2f}, "
        f"system {figures['server_system_ms_per_request']:.2f}); ceiling "
        f"{figures['ceiling_rps']:.0f} requests/s; achieved {figures['achieved_rps']:.0f}/s"
    )


if __name__ == "__main__":
    main()
