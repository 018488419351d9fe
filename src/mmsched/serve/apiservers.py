"""``mmsched serve --api-servers N``: N HTTP processes on one port, feeding one engine.

One process's event loop reads every request body, parses its JSON, undoes its base64 and
keys its images: 8.3-8.7 ms of CPU for a 1.26 MB body with one JPEG on a small Xeon core
(``scripts/http_cost.py``), so near 115 requests/s at most, whatever the ranks could take.
With ``api_servers > 1`` that work is spread over N processes
([`mmsched.serve.frontend`][]), each listening on the server's port with ``SO_REUSEPORT``
and each applying every limit and check itself, while this process (the engine) keeps what
must be one: the preprocessing stage (its workers, its cache), the pipeline and its ranks.
A request crosses one local ZMQ ``ipc://`` hop, in a directory of its own.

[`Engine`][mmsched.serve.apiservers.Engine] answers the HTTP processes' calls: ``chat``
(images processed, the pipeline run, the reply's content or the HTTP error it means, in the
one-process server's own mapping), a model's stream chunk by chunk, ``health``, ``metrics``
(the pipeline's and the stage's figures), ``cancel`` (the HTTP side gave up: the request is
dropped). [`serve_api_servers`][mmsched.serve.apiservers.serve_api_servers] starts it all
and watches: an HTTP process that dies is logged and replaced (one that dies before it ever
served stops the server: a port in use, say); SIGTERM or SIGINT stops every HTTP process
(each has ``shutdown_timeout_s`` for its requests in progress, as one process does), then
the stage and the pipeline, and removes the socket's directory and the metrics' files
(``PROMETHEUS_MULTIPROC_DIR``, [`mmsched.serve.metrics`][]).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import zmq

from mmsched.config import Config
from mmsched.errors import MmschedError
from mmsched.outputs import IterationCallback
from mmsched.pipeline import Pipeline
from mmsched.scheduler import RankStartCallback
from mmsched.serve.app import (
    ServeSettings,
    _describe,
    _generate,
    _HttpError,
    _pieces,
    _pipeline_errors,
    _prepared,
    server_chat_processor,
)
from mmsched.serve.chat import ChatProcessor, PreparedChat, ReadChat
from mmsched.serve.frontend import FrontSpec
from mmsched.serve.media import BadRequest, EncodedImage, ImageHeader, MediaLimits
from mmsched.serve.metrics import MULTIPROC_ENV, engine_families, render_families
from mmsched.zmqwait import RecvWaiter

log = logging.getLogger(__name__)

_WATCH_S = 0.25
"""How often the HTTP processes are looked at."""
_DRAIN = 64
"""Most calls taken off the engine's socket in one turn of its loop."""
_STOP_MARGIN_S = 3.0
"""An HTTP process's stop: its shutdown_timeout_s, uvicorn's own second, and this; then
it is killed."""


def hop_timeout_s(config: Config) -> float:
    """How long an HTTP process waits for each message of the engine: the pipeline's own
    bounds (a rank's silence, the backpressure wait) and as much again for preprocessing.
    Past it the engine is wedged, and the request is answered 503."""
    return 2 * config.timeout_s + config.backpressure_wait_s


class Engine:
    """The calls of the HTTP processes, answered on this process's loop (module docstring)."""

    def __init__(
        self,
        config: Config,
        chat: ChatProcessor,
        pipeline: Pipeline,
        identity: bytes,
        generates_text: bool,
        headers: bool = False,
    ) -> None:
        self.config, self.chat, self.pipeline = config, chat, pipeline
        self.identity, self.generates_text = identity, generates_text
        self.headers = headers
        """Whether the HTTP processes read each image's header (the backend wants them)."""
        # A plain socket, watched by its descriptor ([`mmsched.zmqwait`][]): at hundreds of
        # calls a second an asyncio socket's futures per message cost this one loop (which
        # also runs the stage and the pipeline) more than the messages themselves.
        self._context = zmq.Context()
        self._socket: zmq.Socket[Any] = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        # A ROUTER at its high-water mark drops what it sends without an error: a stream
        # would lose chunks, a call its answer. No limit here: what waits is the answers of
        # requests in flight, and each HTTP process reads its socket all the time.
        self._socket.setsockopt(zmq.SNDHWM, 0)
        self._readable = RecvWaiter(self._socket)  # woken by the answers' sends too
        self._tasks: dict[tuple[bytes, int], asyncio.Task[None]] = {}
        self.greeted: set[str] = set()
        """The HTTP processes (``http-INDEX-PID``) that said hello: they are serving."""

    def bind(self, address: str) -> None:
        self._socket.bind(address)

    async def serve(self) -> None:
        """Answer calls until cancelled."""
        while True:
            await self._readable.wait()
            # What has arrived, at most _DRAIN calls before the loop's other work runs.
            for _ in range(_DRAIN):
                try:
                    message = self._socket.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                try:
                    self._dispatch(message)
                except Exception:  # a malformed call: that call's loss, never the engine's
                    log.exception("an HTTP process's call could not be read")
                del message  # its call holds what it needs: the frames not kept past it
            else:
                await asyncio.sleep(0)

    def _dispatch(self, message: list[zmq.Frame]) -> None:
        peer, op, body, *frames = message
        who, header = peer.bytes, orjson.loads(body.buffer)
        call, kind = header["id"], op.bytes
        if kind == b"chat":
            task = asyncio.create_task(self._chat(who, call, header, frames))
            self._tasks[(who, call)] = task
            task.add_done_callback(self._forget(who, call))
        elif kind == b"cancel":
            running = self._tasks.pop((who, call), None)
            if running is not None:
                running.cancel()
        elif kind == b"hello":
            self.greeted.add(who.decode())
            hello = {"id": call, "identity": self.identity.hex(), "headers": self.headers}
            self._send(who, hello)
        elif kind == b"health":
            self._send(who, {"id": call, "running": self.pipeline.running})
        elif kind == b"metrics":
            self._send(who, {"id": call, "text": self._metrics()})

    def drop(self, who: bytes) -> int:
        """Cancel every call of the HTTP process ``who`` (it is gone: nobody would read the
        answers); the number cancelled."""
        calls = [key for key in self._tasks if key[0] == who]
        for key in calls:
            self._tasks.pop(key).cancel()
        return len(calls)

    def _forget(self, who: bytes, call: int) -> Callable[[asyncio.Task[None]], None]:
        def forget(_: asyncio.Task[None]) -> None:
            self._tasks.pop((who, call), None)

        return forget

    def _metrics(self) -> str:
        stage = self.chat.preprocessor
        families = engine_families(
            request_bytes_sent=self.pipeline.request_bytes_sent,
            cache=self.pipeline.cache_stats(),
            preprocess=stage.stats() if stage is not None else None,
        )
        return render_families(families).decode()

    def _send(self, who: bytes, message: dict[str, Any]) -> None:
        # A ROUTER with no high-water mark never blocks a send (nor drops one for room).
        self._socket.send_multipart([who, orjson.dumps(message)], zmq.NOBLOCK)
        self._readable.recheck()  # the send may have taken the edge of a call's arrival

    async def _chat(
        self, who: bytes, call: int, header: dict[str, Any], frames: list[zmq.Frame]
    ) -> None:
        rid = "?"  # for the log, should the header itself be malformed
        try:
            rid = str(header["rid"])
            sampling = header["sampling"]
            try:
                images = _received_images(header["images"], frames, self.chat.limits)
            except BadRequest as exc:
                raise _HttpError(400, "invalid_request_error", exc.problem, exc.param) from None
            keys = [bytes.fromhex(k) for k in header["keys"]]
            read = ReadChat(header["layout"], images, keys)
            prepared = await _prepared(self.chat.process_read(read), self.config.max_prompt_tokens)
            # Processed: the images' bytes (the frames, and the views of them) go now, not
            # when the request ends, a whole generation later.
            del frames, images, read
            processed = time.perf_counter()
            if header["stream"]:
                await self._stream(who, call, rid, prepared, sampling, processed)
                return
            output = await _generate(self.pipeline, rid, prepared, sampling)
            delivered = time.perf_counter()
            max_tokens = header["max_tokens"]
            if self.generates_text:
                pieces = [await asyncio.to_thread(self.chat.tokenizer.decode, output.output_ids)]
                finish = output.finish_reason
                completion: int | None = len(output.output_ids)
            else:
                described = _describe(self.chat, prepared, output, self.config.tp_size)
                pieces = await asyncio.to_thread(_pieces, described, max_tokens)
                full = max_tokens is not None and len(pieces) == max_tokens
                finish, completion = ("length" if full else "stop"), None
            done = {
                "pieces": pieces,
                "prompt_tokens": len(prepared.input_ids),
                "finish": finish,
                "completion_tokens": completion,
                "images": prepared.images,
                "feature_bytes": prepared.feature_bytes,
                "pipeline_ms": (delivered - processed) * 1e3,
                **_times(prepared, processed),
            }
            self._send(who, {"id": call, "done": done})
        except _HttpError as exc:
            self._send(who, {"id": call, "error": _error(exc)})
        except asyncio.CancelledError:
            raise  # the HTTP side gave up: nobody to answer
        except Exception as exc:  # a bug of ours: this request's 500, never the engine's end
            log.exception("chat request %s failed", rid)
            failure = _HttpError(500, "internal_error", f"{type(exc).__name__}: {exc}")
            self._send(who, {"id": call, "error": _error(failure)})

    async def _stream(
        self,
        who: bytes,
        call: int,
        rid: str,
        prepared: PreparedChat,
        sampling: dict[str, Any],
        processed: float,
    ) -> None:
        """A model's stream: the first chunk (or the error it meets) answers the call, the
        others follow as they come; an error after the first is the stream's last message."""
        input_ids = prepared.input_ids
        chunks = self.pipeline.generate_stream(rid, input_ids, prepared.mm_inputs, sampling)
        try:
            with _pipeline_errors():
                chunk = await anext(chunks)
            sizes = {"images": prepared.images, "feature_bytes": prepared.feature_bytes}
            first = {"prompt_tokens": len(input_ids), "sizes": sizes}
            first |= _times(prepared, processed)
            self._send(who, {"id": call, **first, "chunk": _chunk(chunk)})
            try:
                while not chunk.finished:
                    following = await anext(chunks, None)
                    if following is None:
                        break
                    chunk = following
                    self._send(who, {"id": call, "chunk": _chunk(chunk)})
            except MmschedError as exc:
                self._send(who, {"id": call, "stream_error": str(exc)})
        finally:
            await chunks.aclose()

    async def aclose(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        self._socket.close(linger=0)
        self._context.term()


def _received_images(
    entries: Any, frames: list[zmq.Frame], limits: MediaLimits
) -> list[EncodedImage]:
    """A chat call's images: the bytes as they came off the socket (no copy), with the
    header the HTTP process read where the backend wants one (``frontend._image_entry``),
    checked: the backend sizes its work by it before it opens the bytes.

    Raises:
        BadRequest: naming the image: a header that is not one, or one of too many pixels.
    """
    images = []
    for (param, fmt, *fields), frame in zip(entries, frames, strict=True):
        header = ImageHeader.from_fields(param, fields, limits) if fields else None
        images.append(EncodedImage(param, frame.buffer, fmt, header))
    return images


def _times(prepared: PreparedChat, processed: float) -> dict[str, float]:
    """For the timing header: the images' processing, and how long ago the inputs were
    ready (the HTTP process takes it off what it waited, to tell its ``prepare``)."""
    return {
        "process_ms": prepared.timings.get("process", 0.0) * 1e3,
        "since_ready_ms": (time.perf_counter() - processed) * 1e3,
    }


def _chunk(output: Any) -> dict[str, Any]:
    return {
        "ids": list(output.output_ids),
        "finished": output.finished,
        "finish_reason": output.finish_reason,
    }


def _error(exc: _HttpError) -> dict[str, Any]:
    return {"status": exc.status, "kind": exc.kind, "message": exc.message, "param": exc.param}


@dataclass
class _Front:
    """One HTTP process and what is known of it."""

    index: int
    process: subprocess.Popen[bytes]
    started: float = field(default_factory=time.monotonic)

    @property
    def name(self) -> str:
        return f"http-{self.index}-{self.process.pid}"


def serve_api_servers(
    config: Config,
    settings: ServeSettings,
    *,
    host: str,
    port: int,
    on_iteration: IterationCallback | None = None,
    on_rank_start: RankStartCallback | None = None,
    generates_text: bool | None = None,
) -> int:
    """Serve with ``config.api_servers`` HTTP processes on ``host:port`` until SIGTERM or
    SIGINT (module docstring). Returns the exit status: 0 once stopped as asked, 1 when an
    HTTP process could not start."""
    if generates_text is None:
        generates_text = on_iteration is not None
    return asyncio.run(
        _Supervisor(
            config, settings, host, port, on_iteration, on_rank_start, generates_text
        ).main()
    )


def _port_is_free(host: str, port: int) -> bool:
    """Whether ``host:port`` binds without ``SO_REUSEPORT``: it fails while any socket holds
    the port, one of another server's HTTP processes included."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no holder
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


class _Supervisor:
    def __init__(
        self,
        config: Config,
        settings: ServeSettings,
        host: str,
        port: int,
        on_iteration: IterationCallback | None,
        on_rank_start: RankStartCallback | None,
        generates_text: bool,
    ) -> None:
        self.config, self.settings, self.host, self.port = config, settings, host, port
        self.on_iteration, self.on_rank_start = on_iteration, on_rank_start
        self.generates_text = generates_text
        self.fronts: list[_Front] = []

    async def main(self) -> int:
        if self.port and not _port_is_free(self.host, self.port):
            # The HTTP processes bind with SO_REUSEPORT, which would let them join another
            # server's processes on this port (another instance, or one still draining).
            log.error("%s:%d is in use: not serving", self.host, self.port)
            return 1
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        workdir = Path(tempfile.mkdtemp(prefix="mmsched-serve-"))
        try:
            return await self._run(workdir, stop)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    async def _run(self, workdir: Path, stop: asyncio.Event) -> int:
        from mmsched.preprocess import Preprocessor, StageSettings  # (a cycle, at import)

        config, settings = self.config, self.settings
        chat = server_chat_processor(settings, config.max_prompt_tokens, config.wire_pixels)
        pipeline = Pipeline(
            config, on_iteration=self.on_iteration, on_rank_start=self.on_rank_start
        )
        await pipeline.start()
        stage: Preprocessor | None = None
        engine: Engine | None = None
        serving: asyncio.Task[None] | None = None
        try:
            stage = Preprocessor(StageSettings.of(config), settings.media_limits())
            await stage.start(pipeline)
            chat.attach(stage)
            backend = stage.backend
            engine = Engine(
                config, chat, pipeline, backend.identity, self.generates_text, backend.wants_headers
            )
            address = f"ipc://{workdir}/engine"
            engine.bind(address)
            serving = asyncio.create_task(engine.serve())
            metrics_dir = workdir / "metrics"
            metrics_dir.mkdir()
            log.info(
                "serving %s with %d HTTP processes: %s",
                settings.model,
                config.api_servers,
                config.as_dict(),
            )
            spec = FrontSpec(
                index=0,
                host=self.host,
                port=self.port,
                engine=address,
                settings=settings,
                max_prompt_tokens=config.max_prompt_tokens,
                wire_pixels=config.wire_pixels,
                shutdown_timeout_s=config.shutdown_timeout_s,
                hop_timeout_s=hop_timeout_s(config),
                generates_text=self.generates_text,
            )
            env = {**os.environ, MULTIPROC_ENV: str(metrics_dir)}
            # One at a time: if a start fails, those already started are stopped below.
            for i in range(config.api_servers):
                self.fronts.append(self._start(spec, i, env))
            return await self._watch(spec, env, engine, serving, metrics_dir, stop)
        finally:
            await self._stop_fronts()
            if serving is not None:
                serving.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await serving
            if engine is not None:
                await engine.aclose()
            if stage is not None:
                await stage.aclose()  # its workers first: they write into the pipeline's store
            log.info("closing the pipeline")
            await pipeline.aclose()

    def _start(self, spec: FrontSpec, index: int, env: dict[str, str]) -> _Front:
        spec = FrontSpec(**{**spec.__dict__, "index": index})
        command = [sys.executable, "-m", "mmsched.serve.frontend", spec.to_json()]
        # A session of its own: a terminal's Ctrl-C reaches this process alone, which then
        # stops the HTTP processes in order (they would otherwise race it, and be replaced).
        process = subprocess.Popen(command, env=env, start_new_session=True)
        return _Front(index, process)

    async def _watch(
        self,
        spec: FrontSpec,
        env: dict[str, str],
        engine: Engine,
        serving: asyncio.Task[None],
        metrics_dir: Path,
        stop: asyncio.Event,
    ) -> int:
        from prometheus_client import multiprocess

        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), _WATCH_S)
            if stop.is_set():
                return 0
            if serving.done():  # the engine's receiver ended: no call could be answered
                error = None if serving.cancelled() else serving.exception()
                log.error("the engine stopped answering the HTTP processes: %r", error)
                return 1
            for n, front in enumerate(self.fronts):
                status = front.process.poll()
                if status is None:
                    continue
                # Its requests in flight are not in flight any more (livesum gauges).
                multiprocess.mark_process_dead(front.process.pid, str(metrics_dir))  # type: ignore[no-untyped-call]
                dropped = engine.drop(front.name.encode())
                if front.name not in engine.greeted:
                    log.error(
                        "HTTP process %d exited (status %s) before it served: stopping",
                        front.index,
                        status,
                    )
                    return 1
                log.error(
                    "HTTP process %d (pid %d) exited (status %s), %d requests with it: "
                    "starting another",
                    front.index,
                    front.process.pid,
                    status,
                    dropped,
                )
                self.fronts[n] = self._start(spec, front.index, env)

    async def _stop_fronts(self) -> None:
        """SIGTERM to every HTTP process; each drains within shutdown_timeout_s, and one
        still there past its bound is killed."""
        for front in self.fronts:
            if front.process.poll() is None:
                front.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.config.shutdown_timeout_s + _STOP_MARGIN_S
        for front in self.fronts:
            while front.process.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if front.process.poll() is None:
                log.warning("HTTP process %d did not stop in time: killed", front.index)
                front.process.kill()
                await asyncio.to_thread(front.process.wait)
