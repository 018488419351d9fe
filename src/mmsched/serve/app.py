"""The HTTP server: an OpenAI-compatible chat endpoint in front of an mmsched pipeline.

``POST /v1/chat/completions`` takes OpenAI-style messages whose ``image_url`` parts are
``data:`` URLs (PNG or JPEG). Each request is decoded and processed off the event loop
([`mmsched.serve.chat`][]), then ``Pipeline.generate`` hashes its images once and carries
them to every TP rank, where the rank callback (the model) runs. The answer comes back as a
``chat.completion``, or as server-sent events (``stream: true``) ending in ``[DONE]``.

By default the ranks run the pipeline's stub model: it returns the ids that reached the
model step, each image's span replaced by its pad value, and the reply says what reached the
ranks (each image's size, patches and pad id, and the prompt's text as the ranks saw it): a
check of the whole path, not a language model. With a model of its own (``on_iteration``;
``mmsched serve --model tiny-qwen2-vl``, [`mmsched.models`][]) the reply is the text of the
ids the model returned, decoded by the processor's tokenizer, and ``stream: true`` streams
them as the model makes them.

Also: ``GET /v1/models``, ``GET /health`` (503 until the ranks are up, and once they are
lost), ``GET /metrics`` (Prometheus text, [`mmsched.serve.metrics`][]).

Bad input never reaches the ranks and never stops the server: an undecodable image, a media
type other than PNG or JPEG, a remote URL, a body, image or prompt over its limit, malformed
JSON or messages, a field the server does not honour ([`mmsched.serve.options`][]) get HTTP
400 with an OpenAI-style error body naming the field (``param``); an unknown model 404; a
full pipeline 503; the next request is served as usual. A client that hangs up before its
body is complete is counted as 499 ("client closed request", as nginx counts it), not as a
failure of the server's.

Stopping (SIGTERM, SIGINT) is bounded by ``shutdown_timeout_s`` ([`mmsched.serve.shutdown`][]):
requests still in progress then are answered 503, and the pipeline closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.requests import ClientDisconnect

from mmsched.config import Config
from mmsched.errors import (
    InvalidMultimodalInput,
    MmschedError,
    NotRunning,
    Overloaded,
    PeerLost,
    PreprocessWorkerLost,
    RequestFailed,
)
from mmsched.hashing import PAD_VALUE_SHIFT
from mmsched.messages import GenerateOutput
from mmsched.models import STUB_MODEL
from mmsched.outputs import IterationCallback
from mmsched.pipeline import Pipeline
from mmsched.scheduler import RankStartCallback
from mmsched.serve.chat import ChatProcessor, PreparedChat
from mmsched.serve.media import BadRequest, MediaLimits
from mmsched.serve.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from mmsched.serve.metrics import ServerMetrics, engine_families
from mmsched.serve.options import ChatOptions, chat_options
from mmsched.serve.shutdown import Drain, ShuttingDown

if TYPE_CHECKING:
    from mmsched.preprocess import Preprocessor

log = logging.getLogger(__name__)

DEFAULT_MODEL = STUB_MODEL
TIMING_HEADER = "x-mmsched-timing"
"""Response header: where a request's time went, in ms, as
``read=<ms>;key=<ms>;process=<ms>;prepare=<ms>;pipeline=<ms>``: ``read``, its body read and
parsed; ``key``, its images read from their URLs and keyed; ``process``, the cache or
decoding and the image processor; ``prepare``, everything from its arrival to its inputs
ready (``read``, ``key`` and ``process`` among it); ``pipeline``, the pipeline's part
(hashing, placement, delivery to every rank and the answer). ``key`` and ``process`` come
through a preprocessing stage only; a model's stream, whose headers leave before its answer,
carries no ``pipeline``."""
CLIENT_CLOSED = 499
"""The status counted for a request whose client hung up before its body was complete
(nginx's "client closed request"): nobody receives it, and it is no failure of the server's."""
_PARSE_OFF_LOOP_BYTES = 1 << 20
"""Bodies at least this large are parsed on a worker thread, so ``/health`` stays prompt."""


@dataclass(frozen=True)
class ServeSettings:
    """The HTTP side's settings (the pipeline's are its [`Config`][mmsched.config.Config]).

    Attributes:
        model: the model id the server answers to (``GET /v1/models``).
        max_body_mb: largest request body accepted.
        max_images: most images in one request.
        max_image_mb: largest encoded image.
        max_image_pixels: most pixels of a decoded image.
    """

    model: str = DEFAULT_MODEL
    max_body_mb: int = 100
    max_images: int = 16
    max_image_mb: int = 20
    max_image_pixels: int = 40_000_000

    def media_limits(self) -> MediaLimits:
        """The limits every image of a request is read and decoded within."""
        return MediaLimits(self.max_image_mb << 20, self.max_image_pixels)


class _HttpError(Exception):
    def __init__(self, status: int, kind: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.message, self.param = status, kind, message, param

    def response(self) -> JSONResponse:
        # The message names the field too: clients often show the message alone.
        message = f"{self.param}: {self.message}" if self.param else self.message
        error = {"message": message, "type": self.kind, "param": self.param}
        return JSONResponse({"error": {**error, "code": self.status}}, status_code=self.status)


def create_app(
    config: Config,
    settings: ServeSettings | None = None,
    *,
    processor: ChatProcessor | None = None,
    on_iteration: IterationCallback | None = None,
    on_rank_start: RankStartCallback | None = None,
    generates_text: bool | None = None,
) -> FastAPI:
    """The FastAPI application; its lifespan starts the pipeline and closes it.

    Args:
        config: the pipeline's config (strategy, transport, payload store, TP size...).
        settings: limits and the model id.
        processor: messages to ids and images (default: Qwen2-VL's image processor and the
            byte tokenizer, sending the config's ``wire_pixels``; one of your own decides
            what it sends).
        on_iteration: the model step on every rank (default: the stub).
        on_rank_start: per-rank set-up, where a model loads.
        generates_text: the model's output ids are text, decoded into the reply (and
            streamed as they come); otherwise the reply describes what reached the ranks,
            as for the stub. Default: whether ``on_iteration`` is given.
    """
    settings = settings or ServeSettings()
    chat = processor or server_chat_processor(
        settings, config.max_prompt_tokens, config.wire_pixels
    )
    metrics = ServerMetrics()
    state: dict[str, Pipeline] = {}
    stages: dict[str, Preprocessor] = {}
    if generates_text is None:
        generates_text = on_iteration is not None  # a model's own ids, not the stub's echo
    drain = Drain(config.shutdown_timeout_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        drain.attach(asyncio.get_running_loop())
        pipeline = Pipeline(config, on_iteration=on_iteration, on_rank_start=on_rank_start)
        await pipeline.start()
        stage: Preprocessor | None = None
        try:
            if processor is None:  # the default processor: through the preprocessing stage
                from mmsched.preprocess import Preprocessor, StageSettings  # (a cycle, at import)

                stage = Preprocessor(StageSettings.of(config), settings.media_limits())
                await stage.start(pipeline)
                chat.attach(stage)
                stages["preprocess"] = stage
        except BaseException:
            await pipeline.aclose()
            raise
        state["pipeline"] = pipeline
        log.info("serving %s: %s", settings.model, config.as_dict())
        try:
            yield
        finally:
            state.pop("pipeline", None)
            stages.pop("preprocess", None)
            if stage is not None:
                await stage.aclose()  # its workers first: they write into the pipeline's store
            log.info("closing the pipeline")
            await pipeline.aclose()

    app = FastAPI(title="mmsched", lifespan=lifespan)
    app.state.drain = drain  # mmsched.serve.shutdown.run starts the stop through it

    @app.get("/health")
    async def health() -> Response:
        pipeline = state.get("pipeline")
        return health_response(pipeline is not None and pipeline.running)

    @app.get("/v1/models")
    async def models() -> Response:
        return models_response(settings.model)

    @app.get("/metrics")
    async def prometheus() -> Response:
        pipeline = state.get("pipeline")
        stage = stages.get("preprocess")
        engine = engine_families(
            request_bytes_sent=pipeline.request_bytes_sent if pipeline else 0,
            cache=pipeline.cache_stats() if pipeline else None,
            preprocess=stage.stats() if stage is not None else None,
        )
        return Response(metrics.render(engine), media_type=METRICS_CONTENT_TYPE)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        arrived = time.perf_counter()
        metrics.inflight += 1
        streaming = False  # a model's stream is in flight until its last event
        try:
            async with drain.guard():
                body = await _read_json(request, settings.max_body_mb << 20)
                options = _options(body, settings.model)
                stream, include_usage, max_tokens = (
                    options.stream,
                    options.include_usage,
                    options.max_tokens,
                )
                pipeline = state.get("pipeline")
                if pipeline is None:
                    raise _HttpError(503, "service_unavailable", "the pipeline is not running")
                parsed = time.perf_counter()
                prepared = await _prepare(chat, body.get("messages"), config.max_prompt_tokens)
                processed = time.perf_counter()
                timing = _timing(prepared, arrived, parsed, processed)
                rid = f"chatcmpl-{uuid.uuid4().hex}"
                sampling = {"max_new_tokens": max_tokens} if max_tokens is not None else {}
                if stream and generates_text:
                    # The model's ids, streamed as they come: only the first chunk is awaited
                    # here, so that a request refused on its way in is still an HTTP error.
                    # From then on the stream counts it (answered, in flight, completed).
                    response = await _model_stream(
                        pipeline,
                        rid,
                        prepared,
                        sampling,
                        chat,
                        settings.model,
                        include_usage,
                        metrics,
                        arrived,
                        timing,
                    )
                    streaming = True
                    return response
                output = await _generate(pipeline, rid, prepared, sampling)
                delivered = time.perf_counter()
                # Decoding and filtering are O(prompt): off the loop, as the preparation.
                if generates_text:
                    pieces = [await asyncio.to_thread(chat.tokenizer.decode, output.output_ids)]
                else:
                    pieces = await asyncio.to_thread(
                        lambda: _pieces(
                            _describe(chat, prepared, output, config.tp_size), max_tokens
                        )
                    )
                metrics.completed(delivered - arrived, prepared.images, prepared.feature_bytes)
        except Exception as exc:  # every failure is this request's answer, never the server's end
            return chat_failure(metrics, exc)
        finally:
            if not streaming:
                metrics.inflight -= 1
        metrics.answered("chat", 200)
        reply = _Reply(
            rid=rid,
            model=settings.model,
            pieces=pieces,
            prompt_tokens=len(prepared.input_ids),
            finish=output.finish_reason
            if generates_text
            else "length"
            if max_tokens is not None and len(pieces) == max_tokens
            else "stop",
            completion_tokens=len(output.output_ids) if generates_text else None,
            # Where the time went, for load generators (TIMING_HEADER).
            timing=f"{timing};pipeline={(delivered - processed) * 1e3:.2f}",
        )
        return reply.stream(include_usage) if stream else reply.completion()

    return app


@dataclass
class _Reply:
    """A finished completion, written whole or as server-sent events."""

    rid: str
    model: str
    pieces: list[str]
    prompt_tokens: int
    finish: str
    timing: str
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))
    # The model's ids (a real model); None: one per piece (the stub's words).
    completion_tokens: int | None = None

    @property
    def usage(self) -> dict[str, int]:
        done = len(self.pieces) if self.completion_tokens is None else self.completion_tokens
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": done,
            "total_tokens": self.prompt_tokens + done,
        }

    def completion(self) -> Response:
        message = {"role": "assistant", "content": "".join(self.pieces)}
        body = {
            "id": self.rid,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "message": message, "finish_reason": self.finish}],
            "usage": self.usage,
        }
        return JSONResponse(body, headers={TIMING_HEADER: self.timing})

    def stream(self, include_usage: bool) -> Response:
        return StreamingResponse(
            self._events(include_usage),
            media_type="text/event-stream",
            headers={TIMING_HEADER: self.timing},
        )

    async def _events(self, include_usage: bool) -> AsyncIterator[bytes]:
        """As OpenAI streams: a role, the pieces, the finish, the usage if asked, [DONE]."""
        yield self._chunk({"role": "assistant", "content": ""}, None)
        for piece in self.pieces:
            yield self._chunk({"content": piece}, None)
        yield self._chunk({}, self.finish)
        if include_usage:
            yield self._data({"choices": [], "usage": self.usage})
        yield b"data: [DONE]\n\n"

    def _chunk(self, delta: dict[str, Any], finish: str | None) -> bytes:
        return self._data({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

    def _data(self, fields: dict[str, Any]) -> bytes:
        head = {"id": self.rid, "object": "chat.completion.chunk", "created": self.created}
        return b"data: " + orjson.dumps({**head, "model": self.model, **fields}) + b"\n\n"


async def _read_json(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object, read no further than ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _HttpError(400, "invalid_request_error", f"body larger than {limit >> 20} MB")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _HttpError(400, "invalid_request_error", f"body larger than {limit >> 20} MB")
            chunks.append(chunk)
    except ClientDisconnect:
        raise _HttpError(
            CLIENT_CLOSED,
            "client_closed_request",
            f"the client closed the connection after {size:,} bytes of its body",
        ) from None
    data = b"".join(chunks)
    try:
        if len(data) >= _PARSE_OFF_LOOP_BYTES:
            body = await asyncio.to_thread(orjson.loads, data)
        else:
            body = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise _HttpError(400, "invalid_request_error", f"the body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise _HttpError(400, "invalid_request_error", "the body must be a JSON object")
    return body


def _options(body: dict[str, Any], model: str) -> ChatOptions:
    """The request's options, each checked ([`mmsched.serve.options`][]); the model must be
    ours."""
    if body.get("model") != model:
        raise _HttpError(
            404, "model_not_found", f"the model {body.get('model')!r} does not exist", "model"
        )
    try:
        return chat_options(body)
    except BadRequest as exc:
        raise _HttpError(400, "invalid_request_error", exc.problem, exc.param) from None


async def _prepare(chat: ChatProcessor, messages: Any, max_tokens: int | None) -> PreparedChat:
    """``chat.prepare_async(messages)`` (the preprocessing stage); its prompt at most
    ``max_tokens`` long (a processor of the default kind refuses a longer one on its way,
    another is checked here)."""
    return await _prepared(chat.prepare_async(messages), max_tokens)


async def _prepared(work: Awaitable[PreparedChat], max_tokens: int | None) -> PreparedChat:
    """What ``work`` prepares, its errors as the HTTP errors they mean (``_prepare``'s)."""
    try:
        prepared = await work
        if max_tokens is not None and len(prepared.input_ids) > max_tokens:
            raise BadRequest(
                "messages",
                f"the prompt is {len(prepared.input_ids):,} tokens, more than "
                f"max_prompt_tokens={max_tokens:,}",
            )
        return prepared
    except BadRequest as exc:
        raise _HttpError(400, "invalid_request_error", exc.problem, exc.param) from None
    except Overloaded as exc:  # a preprocessing budget
        raise _HttpError(503, "overloaded_error", str(exc)) from None
    except PreprocessWorkerLost as exc:
        raise _HttpError(503, "service_unavailable", str(exc)) from None
    except Exception as exc:  # a processor bug, not the client's: still this request alone
        log.exception("processing a chat request failed")
        raise _HttpError(500, "internal_error", f"{type(exc).__name__}: {exc}") from None


def _timing(prepared: PreparedChat, arrived: float, parsed: float, processed: float) -> str:
    """The [`TIMING_HEADER`][mmsched.serve.app.TIMING_HEADER] up to the inputs' being ready."""
    parts = {"read": parsed - arrived, **prepared.timings, "prepare": processed - arrived}
    return ";".join(f"{name}={seconds * 1e3:.2f}" for name, seconds in parts.items())


async def _generate(
    pipeline: Pipeline, rid: str, prepared: PreparedChat, sampling: dict[str, Any]
) -> GenerateOutput:
    with _pipeline_errors():
        return await pipeline.generate(rid, prepared.input_ids, prepared.mm_inputs, sampling)


class _Streams(Protocol):
    """What ``_model_stream`` needs of a pipeline (an engine's hop serves it too)."""

    def generate_stream(
        self,
        rid: str,
        input_ids: list[int],
        mm_inputs: Any = None,
        sampling_params: dict[str, Any] | None = None,
    ) -> AsyncGenerator[GenerateOutput, None]: ...


class _Prepared(Protocol):
    """What ``_model_stream`` needs of a prepared chat."""

    @property
    def input_ids(self) -> list[int]: ...
    @property
    def mm_inputs(self) -> Any: ...
    @property
    def images(self) -> int: ...
    @property
    def feature_bytes(self) -> int: ...


async def _model_stream(
    pipeline: _Streams,
    rid: str,
    prepared: _Prepared,
    sampling: dict[str, Any],
    chat: ChatProcessor,
    model: str,
    include_usage: bool,
    metrics: ServerMetrics,
    arrived: float,
    timing: str,
) -> Response:
    """A model's streamed answer as server-sent events, text decoded as the ids come.

    Raises:
        _HttpError: the request failed before its first chunk (the stream is closed).
    """
    chunks = pipeline.generate_stream(rid, prepared.input_ids, prepared.mm_inputs, sampling)
    try:
        with _pipeline_errors():
            first = await anext(chunks)
    except BaseException:
        await chunks.aclose()
        raise
    metrics.answered("chat", 200)  # the status line goes now; what follows is the stream's
    reply = _Reply(rid, model, [], len(prepared.input_ids), "stop", timing=timing)

    async def events() -> AsyncIterator[bytes]:
        ids: list[int] = []
        sent = ""
        chunk: GenerateOutput | None = first
        try:
            yield reply._chunk({"role": "assistant", "content": ""}, None)
            while chunk is not None:
                ids.extend(chunk.output_ids)
                text = chat.tokenizer.decode(ids)
                # A character whose bytes are not all here yet decodes as U+FFFD: wait.
                ready = text if chunk.finished else text.rstrip("\ufffd")
                if len(ready) > len(sent):
                    yield reply._chunk({"content": ready[len(sent) :]}, None)
                    sent = ready
                if chunk.finished:
                    reply.finish, reply.completion_tokens = chunk.finish_reason, len(ids)
                    break
                chunk = await anext(chunks, None)
            yield reply._chunk({}, reply.finish)
            if include_usage:
                yield reply._data({"choices": [], "usage": reply.usage})
            yield b"data: [DONE]\n\n"
            metrics.completed(
                time.perf_counter() - arrived, prepared.images, prepared.feature_bytes
            )
        except MmschedError as exc:  # after the headers went: an error event ends it
            log.warning("stream of %s failed: %s", rid, exc)
            yield reply._data({"error": {"message": str(exc), "type": type(exc).__name__}})
            yield b"data: [DONE]\n\n"
        finally:
            metrics.inflight -= 1
            await chunks.aclose()

    return StreamingResponse(events(), media_type="text/event-stream")


@contextlib.contextmanager
def _pipeline_errors() -> Iterator[None]:
    """The pipeline's errors as the HTTP errors they mean."""
    try:
        yield
    except InvalidMultimodalInput as exc:
        raise _HttpError(400, "invalid_request_error", str(exc), exc.field) from None
    except Overloaded as exc:
        raise _HttpError(503, "overloaded_error", str(exc)) from None
    except (PeerLost, NotRunning) as exc:
        raise _HttpError(503, "service_unavailable", str(exc)) from None
    except (RequestFailed, MmschedError) as exc:
        raise _HttpError(500, "internal_error", f"{type(exc).__name__}: {exc}") from None


def _describe(chat: ChatProcessor, prepared: PreparedChat, output: GenerateOutput, tp: int) -> str:
    """What the stub model's output says reached the ranks, in words."""
    # Every pad id is at least PAD_VALUE_SHIFT, above any vocabulary (under sglang-0.5.23 a
    # span cycles through four values, of which pad_values names the first).
    prompt = chat.tokenizer.decode([i for i in output.output_ids if i < PAD_VALUE_SHIFT])
    parts = [f"{prepared.images} image(s) reached all {tp} rank(s)."]
    patch = int(chat.image_processor.patch_size)
    for n, ((t, h, w), pad) in enumerate(
        zip(prepared.image_grids, output.pad_values, strict=False)
    ):
        parts.append(
            f"Image {n + 1}: resized to {w * patch}x{h * patch}, {t * h * w} patches, pad id {pad}."
        )
    last_user = prompt.rsplit("user\n", 1)[-1].split("assistant\n", 1)[0]
    words = "".join(ch for ch in last_user if ch.isprintable()).strip()
    parts.append(f"Prompt: {words!r}.")
    return " ".join(parts)


def _pieces(text: str, max_tokens: int | None) -> list[str]:
    """The reply in stream-sized pieces (words with their space); at most ``max_tokens``."""
    words = text.split(" ")
    pieces = [w if i == 0 else " " + w for i, w in enumerate(words)]
    return pieces[:max_tokens] if max_tokens is not None else pieces


def chat_failure(metrics: ServerMetrics, exc: Exception) -> Response:
    """The answer to a chat request that failed with ``exc``, counted and logged: a
    shutdown's 503, an :class:`_HttpError`'s own status, or a 500 for a bug of ours."""
    if isinstance(exc, ShuttingDown):
        metrics.answered("chat", 503)
        log.warning("chat request cut short: %s", exc)
        return _HttpError(503, "service_unavailable", str(exc)).response()
    if isinstance(exc, _HttpError):
        metrics.answered("chat", exc.status)
        if exc.status == CLIENT_CLOSED:
            log.info("chat request abandoned: %s", exc.message)
        elif exc.status >= 500:
            log.warning("chat request failed: %s", exc.message)
        else:  # the client's mistake: worth a line, not a warning
            log.info("chat request refused (%d): %s", exc.status, exc.message)
        return exc.response()
    log.error("chat request failed", exc_info=exc)
    metrics.answered("chat", 500)
    return _HttpError(500, "internal_error", f"{type(exc).__name__}: {exc}").response()


def server_chat_processor(
    settings: ServeSettings, max_prompt_tokens: int | None, wire_pixels: str
) -> ChatProcessor:
    """The server's default chat processor: Qwen2-VL's image processor and the byte
    tokenizer, within ``settings``' image limits."""
    return ChatProcessor(
        limits=settings.media_limits(),
        max_images=settings.max_images,
        max_prompt_tokens=max_prompt_tokens,
        wire_pixels=wire_pixels,
    )


def health_response(running: bool) -> Response:
    """``/health``: 200 while the pipeline runs, else 503."""
    if not running:
        return JSONResponse({"status": "unavailable"}, status_code=503)
    return JSONResponse({"status": "ok"})


def models_response(model: str) -> Response:
    """``/v1/models``: the one model this server serves."""
    card = {"id": model, "object": "model", "created": 0, "owned_by": "mmsched"}
    return JSONResponse({"object": "list", "data": [card]})
