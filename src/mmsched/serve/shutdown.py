"""Stopping the server within a bound: SIGTERM (``docker stop``) or SIGINT.

uvicorn, told to stop, closes its listening socket and idle connections, then waits for the
requests in progress; on its own it waits for as long as they take, so one client that
keeps a request open (a body it never finishes) holds the server and its rank processes up
until the container runtime kills them all, leaving the shared memory behind.

[`Drain`][mmsched.serve.shutdown.Drain] bounds that wait: once the stop begins, every request
in progress (and any that still arrives) has until ``shutdown_timeout_s`` to finish; one that
has not is answered 503 there, and the pipeline then closes (its ranks exit, its segments are
removed). [`run`][mmsched.serve.shutdown.run] serves an application of
[`create_app`][mmsched.serve.app.create_app] with that bound. uvicorn's own cancellation,
one second later, ends what cannot be answered any more (a stream whose client stopped
reading).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
from collections.abc import AsyncIterator
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

_MARGIN_S = 1.0
"""uvicorn's own cancellation comes this long after the 503s: time to write them."""


class ShuttingDown(Exception):
    """The request was still in progress when the server's shutdown bound ran out."""


class Drain:
    """The server's stop, seen by the requests in progress.

    Every method runs on the event loop, except
    [`begin_threadsafe`][mmsched.serve.shutdown.Drain.begin_threadsafe].
    """

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._deadline: float | None = None
        self._scopes: set[asyncio.Timeout] = set()

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop the requests run on (the application's lifespan calls this)."""
        self._loop = loop

    def begin_threadsafe(self) -> None:
        """Start the stop from a signal handler or another thread."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.begin)

    def begin(self) -> None:
        """Start the stop: what is in progress now has ``timeout_s`` left."""
        if self._loop is None or self._deadline is not None:
            return
        self._deadline = self._loop.time() + self.timeout_s
        log.info(
            "stopping: %d request(s) in progress get %.1f s", len(self._scopes), self.timeout_s
        )
        for scope in self._scopes:
            scope.reschedule(self._deadline)

    @contextlib.asynccontextmanager
    async def guard(self) -> AsyncIterator[None]:
        """Run the block until it ends or the stop's deadline passes.

        Raises:
            ShuttingDown: the deadline passed first (the block was cancelled).
        """
        scope = asyncio.timeout_at(self._deadline)  # None: no deadline until the stop begins
        try:
            async with scope:
                self._scopes.add(scope)
                try:
                    yield
                finally:
                    self._scopes.discard(scope)
        except TimeoutError:
            if scope.expired():
                raise ShuttingDown(
                    f"the server is stopping (shutdown_timeout_s={self.timeout_s:g})"
                ) from None
            raise


def run(
    app: Any,
    *,
    host: str,
    port: int,
    log_level: str = "warning",
    sockets: list[socket.socket] | None = None,
) -> None:
    """Serve ``app`` (from [`create_app`][mmsched.serve.app.create_app]) until a signal, then
    stop within its config's ``shutdown_timeout_s``: requests still in progress then are
    answered 503, and the pipeline closes. ``sockets``: listen on these, bound already
    (an HTTP process of several sharing a port), rather than on ``host:port``."""
    import uvicorn

    drain: Drain = app.state.drain

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            super().handle_exit(sig, frame)
            drain.begin_threadsafe()  # a signal handler: the loop may be mid-step

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=math.ceil(drain.timeout_s + _MARGIN_S),
    )
    # SIGINT comes back as KeyboardInterrupt once all is closed (uvicorn re-raises the
    # signal it caught); it ends the server as asked, as uvicorn.run treats it.
    with contextlib.suppress(KeyboardInterrupt):
        Server(config).run(sockets=sockets)
