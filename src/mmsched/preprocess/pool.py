"""The ``cpu`` backend: a pool of worker processes, so that preprocessing scales with cores,
not with one interpreter's GIL.

Each worker ([`mmsched.preprocess.worker`][]) is a process started with ``spawn`` that
decodes and processes one image at a time on one thread. In the server's process one thread
per worker hands it the next image from a shared queue (an idle worker takes the next one)
and waits for its answer, so the event loop never blocks on a pipe.

Under a payload store that lends its memory (``shm``:
[`Pipeline.producer_access`][mmsched.pipeline.Pipeline.producer_access]) a worker writes its
output straight into the store's arena and only a handle comes back,
which the server claims ([`Pipeline.claim_tensor`][mmsched.pipeline.Pipeline.claim_tensor]):
the server's process copies nothing. Under a store that lends nothing (``inline``), the
features come back through the worker's pipe.

Failures stay with their image: a worker that dies (or gives no answer within
``timeout_s``) fails the image it held with
[`PreprocessWorkerLost`][mmsched.errors.PreprocessWorkerLost] and is replaced by a new
process as soon as that image is answered. Closing the pool stops every worker (killing one
that does not stop within a second); workers are daemonic and also exit by themselves when
the server's end of their pipe closes, so none outlives the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
import queue
import threading
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

import numpy as np
import torch

from mmsched.errors import ConfigError, MmschedError, Overloaded, PreprocessWorkerLost
from mmsched.preprocess import worker
from mmsched.preprocess.backend import Backend, Outcome, Processed
from mmsched.preprocess.keys import processor_identity
from mmsched.preprocess.processor import build_processor
from mmsched.serve.media import BadRequest, EncodedImage, MediaLimits

log = logging.getLogger(__name__)

_STOP_GRACE_S = 1.0


_WIRE_DTYPES = {"float32": torch.float32, "uint8": torch.uint8}
"""What a worker may send on its pipe (``("bytes", ...)``), by name."""

class _Job:
    __slots__ = ("future", "image", "loop")

    def __init__(
        self, image: EncodedImage, loop: asyncio.AbstractEventLoop, future: asyncio.Future[Outcome]
    ) -> None:
        self.image, self.loop, self.future = image, loop, future


class ProcessPoolBackend(Backend):
    """``workers`` processes, each running the processor's ``processor_backend``
    (``torchvision``, or ``pil`` where torchvision is absent) on one thread."""

    name = "cpu"

    def __init__(
        self,
        limits: MediaLimits,
        workers: int,
        processor_backend: str,
        *,
        timeout_s: float = 60.0,
        startup_timeout_s: float = 120.0,
        wire_pixels: str = "float32",
    ) -> None:
        if workers < 1:
            raise ConfigError(f"a process pool needs at least 1 worker, got {workers}")
        self.limits = limits
        self.workers = workers
        self.processor_backend = processor_backend
        self.timeout_s = timeout_s
        self.startup_timeout_s = startup_timeout_s
        self._processor = build_processor(processor_backend)
        self.wire_pixels = wire_pixels
        self.identity = processor_identity(
            processor_backend, self._processor, {"wire_pixels": wire_pixels}
        )
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._slots: list[_Slot] = []
        self._closing = False
        self.lends = False  # whether workers write into the payload store (set at start)
        self.replaced = 0  # workers that died and were replaced

    @property
    def processor(self) -> Any:
        return self._processor

    @property
    def pids(self) -> list[int]:
        """The workers' process ids now."""
        return [pid for slot in self._slots if (pid := slot.pid) is not None]

    def busy_pids(self) -> list[int]:
        """The process ids of workers holding an image now."""
        return [pid for slot in self._slots if slot.busy and (pid := slot.pid) is not None]

    async def start(self, pipeline: Any | None) -> None:
        access, claim = None, None
        if pipeline is not None:
            try:
                access = pipeline.producer_access()
                claim = pipeline.claim_tensor
            except ConfigError:  # the store lends no memory: features come back on the pipe
                access = None
        self.lends = access is not None
        spec = worker.WorkerSpec(
            self.processor_backend,
            self.limits.max_bytes,
            self.limits.max_pixels,
            access,
            self.wire_pixels,
        )
        self._slots = [_Slot(self, n, spec, claim) for n in range(self.workers)]
        for slot in self._slots:
            slot.thread.start()
        try:
            await asyncio.to_thread(self._wait_started)
        except BaseException:
            await self.aclose()
            raise
        log.info(
            "preprocessing: %d worker processes (%s backend of the processor), features %s",
            self.workers,
            self.processor_backend,
            "written into the payload store" if self.lends else "returned through pipes",
        )

    def _wait_started(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        for slot in self._slots:
            if not slot.started.wait(max(0.0, deadline - time.monotonic())):
                raise PreprocessWorkerLost(
                    f"preprocessing worker {slot.index} did not start within "
                    f"{self.startup_timeout_s:g} s"
                )
            if slot.start_error is not None:
                raise slot.start_error

    async def process(self, images: Sequence[EncodedImage]) -> list[Outcome]:
        if self._closing or not self._slots:
            raise PreprocessWorkerLost("the preprocessing pool is not running")
        loop = asyncio.get_running_loop()
        futures = []
        for image in images:
            future: asyncio.Future[Outcome] = loop.create_future()
            self._jobs.put(_Job(image, loop, future))
            futures.append(future)
        return list(await asyncio.gather(*futures))

    async def aclose(self) -> None:
        if self._closing:
            return
        self._closing = True
        for _ in self._slots:
            self._jobs.put(None)
        await asyncio.to_thread(self._stop)

    def _stop(self) -> None:
        deadline = time.monotonic() + _STOP_GRACE_S
        for slot in self._slots:
            slot.thread.join(max(0.0, deadline - time.monotonic()))
        for slot in self._slots:
            slot.kill()  # a worker still busy (or wedged) past the grace
        for slot in self._slots:
            slot.thread.join(self.timeout_s)
        # What never reached a worker fails now, not after a timeout.
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                _resolve(job, PreprocessWorkerLost("the preprocessing pool closed"))


class _Slot:
    """One worker process and the server thread that feeds it."""

    def __init__(
        self, pool: ProcessPoolBackend, index: int, spec: worker.WorkerSpec, claim: Any
    ) -> None:
        self.pool, self.index, self.spec, self.claim = pool, index, spec, claim
        self.process: BaseProcess | None = None
        self.conn: Connection | None = None
        self.busy = False
        self.started = threading.Event()
        self.start_error: MmschedError | None = None
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self.thread = threading.Thread(
            target=self._run, name=f"mmsched-preprocess-{index}", daemon=True
        )

    @property
    def pid(self) -> int | None:
        process = self.process
        return process.pid if process is not None else None

    def _spawn(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe(duplex=True)
        process = ctx.Process(
            target=worker.main,
            args=(child, self.spec),
            name=f"mmsched-preprocess-{self.index}",
            daemon=True,
        )
        process.start()
        child.close()  # the worker's end lives in the worker only: its death closes the pipe
        with self._lock:
            self.process, self.conn = process, parent
        if not parent.poll(self.pool.startup_timeout_s):
            self.kill()
            self._reap()  # no zombie, and the slot starts afresh with its next image
            raise PreprocessWorkerLost(
                f"preprocessing worker {self.index} did not start within "
                f"{self.pool.startup_timeout_s:g} s"
            )
        try:
            parent.recv()  # ("ready", pid)
        except (EOFError, OSError):
            code = self._reap()
            raise PreprocessWorkerLost(
                f"preprocessing worker {self.index} exited while starting (code {code}); "
                "its traceback is on stderr"
            ) from None

    def kill(self) -> None:
        with self._lock:
            process = self.process
        if process is not None and process.is_alive():
            process.kill()

    def _reap(self) -> int | None:
        """Wait for the dead worker; its exit code."""
        with self._lock:
            process, conn = self.process, self.conn
            self.process = self.conn = None
        if conn is not None:
            conn.close()
        if process is None:
            return None
        process.join(self.pool.timeout_s)
        code = process.exitcode
        with contextlib.suppress(ValueError):
            process.close()
        return code

    def _run(self) -> None:
        try:
            self._spawn()
        except MmschedError as exc:
            self.start_error = exc
        self.started.set()
        while True:
            job = self.pool._jobs.get()
            if job is None:
                break
            if job.future.done():  # its request went away while it waited
                continue
            _resolve(job, self._serve(job))
            if self.conn is None and not self.pool._closing:
                # The worker died with that image (answered above): its replacement starts
                # now, not when this slot next takes an image, so that the pool is whole
                # again before the next burst (the other slots may take every image till
                # then). A failed start is retried with the next image, which it fails.
                try:
                    self._spawn()
                except MmschedError as exc:
                    log.warning("%s", exc)
        self._shutdown()

    def _serve(self, job: _Job) -> Outcome:
        if self.conn is None:
            if self.pool._closing:
                return PreprocessWorkerLost("the preprocessing pool closed")
            try:
                self._spawn()  # the last one died: its replacement
            except MmschedError as exc:
                return exc
        conn = self.conn
        assert conn is not None
        image = job.image
        self.busy = True
        try:
            data = image.data if isinstance(image.data, bytes) else bytes(image.data)  # picklable
            conn.send((next(self._ids), image.param, data, image.format))
            if not conn.poll(self.pool.timeout_s):
                self.kill()
                pid = self.pid
                self._reap()
                self.pool.replaced += 1
                return PreprocessWorkerLost(
                    f"preprocessing worker {pid} gave no answer within "
                    f"timeout_s={self.pool.timeout_s:g}; it was killed and is replaced"
                )
            return self._answer(conn, conn.recv(), image)
        except (EOFError, OSError):
            pid = self.pid
            code = self._reap()
            self.pool.replaced += 1
            if not self.pool._closing:
                log.warning(
                    "preprocessing worker %s died (exit code %s) holding %s; replacing it",
                    pid,
                    code,
                    image.param,
                )
            return PreprocessWorkerLost(
                f"the preprocessing worker (pid {pid}) died with this image (exit code {code})"
            )
        finally:
            self.busy = False

    def _answer(self, conn: Connection, reply: Any, image: EncodedImage) -> Outcome:
        kind = reply[0]
        if kind == "lent":
            _, _, lent, grid = reply
            try:
                return Processed(self.claim(lent), tuple(grid), owned=False)
            except MmschedError as exc:
                return exc
        if kind == "bytes":
            _, _, shape, dtype, grid = reply
            if dtype not in _WIRE_DTYPES:
                return MmschedError(f"preprocessing {image.param}: a worker sent {dtype!r}")
            pixels = torch.empty(tuple(shape), dtype=_WIRE_DTYPES[dtype])
            # As flat bytes: recv_bytes_into measures a buffer by its first dimension.
            conn.recv_bytes_into(pixels.numpy().reshape(-1).view(np.uint8))
            return Processed(pixels, tuple(grid), owned=True)
        if kind == "bad":
            return BadRequest(image.param, str(reply[2]))
        if kind == "full":
            return Overloaded(f"the payload store had no room for {image.param}: {reply[2]}")
        return MmschedError(f"preprocessing {image.param} failed: {reply[2]}")

    def _shutdown(self) -> None:
        with self._lock:
            conn, process = self.conn, self.process
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.send(None)
        if process is not None:
            process.join(_STOP_GRACE_S)
        self.kill()
        self._reap()


def _resolve(job: _Job, outcome: Outcome) -> None:
    def set_result() -> None:
        if not job.future.done():
            job.future.set_result(outcome)

    with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits any more
        job.loop.call_soon_threadsafe(set_result)
