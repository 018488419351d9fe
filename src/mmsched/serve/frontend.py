"""One HTTP process of ``mmsched serve --api-servers N``: it reads, checks and keys requests,
and the engine process answers them.

Each of the N processes listens on the server's port (``SO_REUSEPORT``: the kernel spreads
connections over them) and does, for every chat request, what one process would do before
the preprocessing stage: the body read within its limit, the JSON parsed, the model and
options checked, the messages laid out and their text tokenized, each image's base64 undone
and its size checked, its BLAKE3 content key taken
([`ChatProcessor.read`][mmsched.serve.chat.ChatProcessor.read]).
What is left travels to the engine ([`mmsched.serve.apiservers`][]) over a ZMQ ``ipc://``
socket: a small JSON header and each image's encoded bytes as a frame of its own. The
engine processes the images, runs the pipeline and sends back the reply's content, or the
HTTP error it means (the same status, type and ``param`` one process would answer), or,
for a model's stream, its chunks as they come.

No request waits forever: every message awaited from the engine has ``hop_timeout_s``
(the pipeline's own bounds, with as much again for preprocessing), after which the request
is answered 503 and the engine is told to drop it. The process stops on SIGTERM or SIGINT
within ``shutdown_timeout_s``, as one process does ([`mmsched.serve.shutdown`][]), and on
its own when the process that started it is gone.

Run as ``python -m mmsched.serve.frontend SPEC`` (``SPEC``: a
[`FrontSpec`][mmsched.serve.frontend.FrontSpec] as JSON) by the engine process, never by
hand; ``PROMETHEUS_MULTIPROC_DIR`` is set in its environment, so that its counters are
summed with the others' ([`mmsched.serve.metrics`][]).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import orjson
import zmq
import zmq.asyncio
from fastapi import FastAPI, Request
from fastapi.responses import Response

from mmsched.errors import MmschedError
from mmsched.messages import GenerateOutput
from mmsched.preprocess.keys import content_key
from mmsched.serve.app import (
    ServeSettings,
    _HttpError,
    _model_stream,
    _options,
    _read_json,
    _Reply,
    chat_failure,
    health_response,
    models_response,
    server_chat_processor,
)
from mmsched.serve.chat import ChatProcessor, ReadChat
from mmsched.serve.media import BadRequest, EncodedImage
from mmsched.serve.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from mmsched.serve.metrics import ServerMetrics
from mmsched.serve.shutdown import Drain

log = logging.getLogger("mmsched.serve.frontend")  # its name run as __main__ too

_HEALTH_TIMEOUT_S = 2.0
"""``/health`` is 503 when the engine does not answer within this."""
_PARENT_CHECK_S = 0.5


@dataclass(frozen=True)
class FrontSpec:
    """What an HTTP process needs to know, from the engine process that starts it."""

    index: int
    host: str
    port: int
    engine: str  # the engine's ZMQ address (ipc://...)
    settings: ServeSettings
    max_prompt_tokens: int | None
    wire_pixels: str
    shutdown_timeout_s: float
    hop_timeout_s: float
    generates_text: bool

    def to_json(self) -> str:
        return orjson.dumps(dataclasses.asdict(self)).decode()

    @classmethod
    def from_json(cls, text: str) -> FrontSpec:
        fields = orjson.loads(text)
        return cls(**{**fields, "settings": ServeSettings(**fields["settings"])})


class _EngineSilent(_HttpError):
    """The engine sent nothing within the hop's timeout (HTTP 503)."""


class EngineClient:
    """This process's end of the hop: one DEALER socket, replies routed by call id."""

    def __init__(self, address: str, index: int, timeout_s: float) -> None:
        self.address, self.timeout_s = address, timeout_s
        self._context = zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.RCVHWM, 0)  # the engine's answers are never dropped here
        self._socket.setsockopt(zmq.IDENTITY, f"http-{index}-{os.getpid()}".encode())
        self._ids = itertools.count()
        self._pending: dict[int, asyncio.Queue[dict[str, Any]]] = {}
        self._reader: asyncio.Task[None] | None = None

    def connect(self) -> None:
        """Connect, and route the replies from now on (on the running loop)."""
        self._socket.connect(self.address)
        self._reader = asyncio.create_task(self._read())

    async def start(self) -> dict[str, Any]:
        """Connect, and the engine's hello (its processor's identity, for the keys)."""
        self.connect()
        hello: dict[str, Any] = await self.call(b"hello", {})
        return hello

    async def _read(self) -> None:
        while True:
            frames = await self._socket.recv_multipart()
            message = orjson.loads(frames[0])
            queue = self._pending.get(message.get("id", -1))
            if queue is not None:  # else: a call given up already
                queue.put_nowait(message)

    def open(
        self, op: bytes, header: dict[str, Any], frames: Sequence[bytes | memoryview] = ()
    ) -> tuple[int, asyncio.Queue[dict[str, Any]]]:
        """Send a call; its replies come on the queue (until ``close``)."""
        call = next(self._ids)
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._pending[call] = queue
        body = orjson.dumps({**header, "id": call})
        # A full pipe (HWM) would block: the socket is unbounded on the send side in
        # effect, the engine's own budgets refuse what it cannot take.
        self._socket.send_multipart([op, body, *frames], copy=False)
        return call, queue

    async def next(self, queue: asyncio.Queue[dict[str, Any]], timeout_s: float) -> dict[str, Any]:
        """The call's next reply; an error reply as the HTTP error it means.

        Raises:
            _HttpError: the engine answered an error, or nothing within ``timeout_s`` (503).
        """
        try:
            message = await asyncio.wait_for(queue.get(), timeout_s)
        except TimeoutError:
            raise _EngineSilent(
                503, "service_unavailable", f"the engine did not answer within {timeout_s:g} s"
            ) from None
        error = message.get("error")
        if error is not None:
            raise _HttpError(error["status"], error["kind"], error["message"], error["param"])
        return message

    def close(self, call: int, *, cancel: bool) -> None:
        """Forget a call; ``cancel``: tell the engine to drop it (nobody waits any more)."""
        if self._pending.pop(call, None) is not None and cancel:
            with contextlib.suppress(zmq.ZMQError):
                self._socket.send_multipart([b"cancel", orjson.dumps({"id": call})])

    async def call(self, op: bytes, header: dict[str, Any], timeout_s: float | None = None) -> Any:
        """One request, one reply."""
        call, queue = self.open(op, header)
        try:
            return await self.next(queue, self.timeout_s if timeout_s is None else timeout_s)
        finally:
            self.close(call, cancel=False)

    async def aclose(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        self._socket.close(linger=0)
        self._context.term()


@dataclass
class _Remote:
    """A chat the engine prepared, as ``_model_stream`` sees it: its size, not its tensors."""

    input_ids: list[int]
    images: int
    feature_bytes: int
    mm_inputs: Any = None


class _HopStream:
    """A model's stream across the hop, as ``_model_stream`` reads a pipeline's."""

    def __init__(
        self,
        engine: EngineClient,
        call: int,
        queue: asyncio.Queue[dict[str, Any]],
        first: dict[str, Any],
        timeout_s: float,
    ) -> None:
        self.engine, self.call, self.queue, self.first = engine, call, queue, first
        self.timeout_s = timeout_s

    def generate_stream(
        self,
        rid: str,
        input_ids: list[int],
        mm_inputs: Any = None,
        sampling_params: dict[str, Any] | None = None,
    ) -> AsyncGenerator[GenerateOutput, None]:
        return self._chunks(rid)

    async def _chunks(self, rid: str) -> AsyncGenerator[GenerateOutput, None]:
        finished = False
        try:
            message = self.first
            while True:
                if "stream_error" in message:
                    raise MmschedError(message["stream_error"])
                chunk = _output(rid, message["chunk"])
                finished = chunk.finished
                yield chunk
                if finished:
                    return
                try:
                    message = await self.engine.next(self.queue, self.timeout_s)
                except _HttpError as exc:  # after the headers: the stream's error event
                    raise MmschedError(exc.message) from None
        finally:
            self.engine.close(self.call, cancel=not finished)


def _output(rid: str, chunk: dict[str, Any]) -> GenerateOutput:
    return GenerateOutput(
        rid=rid,
        output_ids=chunk["ids"],
        finish_reason=chunk["finish_reason"],
        finished=chunk["finished"],
    )


def create_front_app(spec: FrontSpec) -> FastAPI:
    """The application of one HTTP process: the routes of
    [`create_app`][mmsched.serve.app.create_app]'s, answered through the engine."""
    settings = spec.settings
    # For the layout alone (tokenizer, image limits): it decodes nothing here.
    chat = server_chat_processor(settings, spec.max_prompt_tokens, spec.wire_pixels)
    metrics = ServerMetrics()
    drain = Drain(spec.shutdown_timeout_s)
    engine = EngineClient(spec.engine, spec.index, spec.hop_timeout_s)
    identity: list[bytes] = []
    headers: list[bool] = []  # whether the engine's backend wants each image's header read

    def key(image: EncodedImage) -> bytes:
        return content_key(image.data, image.format, identity[0])

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        drain.attach(asyncio.get_running_loop())
        # Watched from the start: an engine gone before its hello stops this process too.
        watch = asyncio.create_task(_watch_parent(os.getppid()))
        try:
            hello = await engine.start()
            identity.append(bytes.fromhex(hello["identity"]))
            headers.append(bool(hello.get("headers", False)))
            yield
        finally:
            watch.cancel()
            await engine.aclose()

    app = FastAPI(title="mmsched", lifespan=lifespan)
    app.state.drain = drain

    @app.get("/health")
    async def health() -> Response:
        try:
            running = (await engine.call(b"health", {}, _HEALTH_TIMEOUT_S))["running"]
        except _HttpError:
            running = False
        return health_response(running)

    @app.get("/v1/models")
    async def models() -> Response:
        return models_response(settings.model)

    @app.get("/metrics")
    async def prometheus() -> Response:
        try:
            engine_text = (await engine.call(b"metrics", {}, _HEALTH_TIMEOUT_S))["text"]
        except _HttpError:
            engine_text = ""  # the HTTP side's figures still count
        text = metrics.render() + engine_text.encode()
        return Response(text, media_type=METRICS_CONTENT_TYPE)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        arrived = time.perf_counter()
        metrics.inflight += 1
        streaming = False
        try:
            async with drain.guard():
                body = await _read_json(request, settings.max_body_mb << 20)
                options = _options(body, settings.model)
                parsed = time.perf_counter()
                read = await _read(chat, body.get("messages"), key, headers[0])
                keyed = time.perf_counter()
                rid = f"chatcmpl-{uuid.uuid4().hex}"
                cap = options.max_tokens
                sampling = {"max_new_tokens": cap} if cap is not None else {}
                model_stream = options.stream and spec.generates_text
                header = {
                    "rid": rid,
                    "layout": read.layout,
                    "images": [_image_entry(image) for image in read.images],
                    "keys": [k.hex() for k in read.keys],
                    "sampling": sampling,
                    "stream": model_stream,
                    "max_tokens": options.max_tokens,
                }
                call, queue = engine.open(b"chat", header, [i.data for i in read.images])
                replied = False  # else the engine still works on it, for nobody: cancel
                try:
                    first = await engine.next(queue, spec.hop_timeout_s)
                    replied = True
                    # As one process writes it (TIMING_HEADER): prepare runs from the
                    # arrival to the inputs' being ready in the engine, the hop included.
                    reply_data = first.get("done", first)
                    ready = time.perf_counter() - reply_data["since_ready_ms"] / 1e3
                    timing = (
                        f"read={(parsed - arrived) * 1e3:.2f};key={(keyed - parsed) * 1e3:.2f};"
                        f"process={reply_data['process_ms']:.2f};"
                        f"prepare={(ready - arrived) * 1e3:.2f}"
                    )
                    if model_stream:
                        hop = _HopStream(engine, call, queue, first, spec.hop_timeout_s)
                        remote = _Remote([0] * first["prompt_tokens"], **first["sizes"])
                        response = await _model_stream(
                            hop,
                            rid,
                            remote,
                            sampling,
                            chat,
                            settings.model,
                            options.include_usage,
                            metrics,
                            arrived,
                            timing,
                        )
                        streaming = True  # the call is the stream's to close now
                        return response
                except _EngineSilent:
                    raise
                except _HttpError:
                    replied = True  # the engine's answer: it is done with the call
                    raise
                finally:
                    if not streaming:
                        engine.close(call, cancel=not replied)
                done = first["done"]
                answered = time.perf_counter()
                metrics.completed(answered - arrived, done["images"], done["feature_bytes"])
        except Exception as exc:  # every failure is this request's answer, never the server's end
            return chat_failure(metrics, exc)
        finally:
            if not streaming:
                metrics.inflight -= 1
        metrics.answered("chat", 200)
        reply = _Reply(
            rid=rid,
            model=settings.model,
            pieces=done["pieces"],
            prompt_tokens=done["prompt_tokens"],
            finish=done["finish"],
            completion_tokens=done["completion_tokens"],
            timing=f"{timing};pipeline={done['pipeline_ms']:.2f}",
        )
        return reply.stream(options.include_usage) if options.stream else reply.completion()

    return app


def _image_entry(image: EncodedImage) -> list[Any]:
    """How the engine is told of an image: its part, its format, and its header where read
    (width, height, orientation)."""
    entry: list[Any] = [image.param, image.format]
    if image.header is not None:
        entry += image.header.fields()
    return entry


async def _read(chat: ChatProcessor, messages: Any, key: Any, headers: bool) -> ReadChat:
    """``chat.read`` off the loop (base64 of a megabyte is milliseconds), as an HTTP error."""
    try:
        return await asyncio.to_thread(chat.read, messages, key, headers=headers)
    except BadRequest as exc:
        raise _HttpError(400, "invalid_request_error", exc.problem, exc.param) from None


async def _watch_parent(parent: int) -> None:
    """Stop this process once the engine process that started it is gone (its ranks and
    stage went with it: nothing here could be answered)."""
    while os.getppid() == parent:
        await asyncio.sleep(_PARENT_CHECK_S)
    log.error("the engine process %d is gone: stopping", parent)
    os.kill(os.getpid(), signal.SIGTERM)


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` with ``SO_REUSEPORT``: every HTTP process binds its
    own, and the kernel spreads new connections over them."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def main(argv: Sequence[str] | None = None) -> int:
    """Serve one HTTP process of ``spec`` until told to stop."""
    from mmsched.serve.shutdown import run

    spec = FrontSpec.from_json((sys.argv[1:] if argv is None else argv)[0])
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        sock = listening_socket(spec.host, spec.port)
    except OSError as exc:  # the engine process sees the exit, and stops the server
        log.error(
            "HTTP process %d cannot listen on %s:%d: %s", spec.index, spec.host, spec.port, exc
        )
        return 2
    run(create_front_app(spec), host=spec.host, port=spec.port, sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
