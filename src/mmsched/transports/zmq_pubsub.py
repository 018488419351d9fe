"""ZMQ publish-subscribe: the sender publishes each message once; every rank subscribes.

The sender binds an XPUB socket; receivers connect SUB sockets. ``open`` on the sender
returns only after it has seen a subscription from every receiver (XPUB reports each one), so
no message is lost to a slow joiner. ``ipc://`` addresses serve one host, ``tcp://`` several.

Each message goes as one ZMQ multipart message: a one-byte kind frame (``M`` message,
``E`` end of stream), then the frames, sent with ``copy=False`` so that large buffers are
not copied into ZMQ.

Guarantees and limits:

- ordered and lossless: high-water marks are off (unbounded queues), so PUB never drops;
  memory held for a slow receiver grows until it catches up (backpressure is the
  ``shm`` transport's job, whose payloads don't travel here);
- the sender never blocks on receivers;
- the sender's ``open`` waits ``GroupSpec.join_within_s`` for every receiver's subscription;
- a receiver that hears nothing (not even the pipeline's per-iteration heartbeat) for
  ``GroupSpec.timeout_s`` raises [`PeerLost`][]; a dead receiver does not
  disturb the sender or other receivers;
- a pending ``recv()`` can be cancelled without losing a message.

Options ([`TransportOptions`][mmsched.transports.base.TransportOptions]): ``linger_s``, how
long the sender's ``aclose`` waits for queued messages to leave (default ``timeout_s``);
``token``, a secret every receiver must present in the ZMQ handshake (PLAIN credentials
checked by a ZAP handler on the sender): a peer without it is refused before it can
subscribe, so it neither reads the messages nor counts as a receiver. Every group of a
pipeline passes its run's token; without one, any peer that reaches the address may
subscribe.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio
from zmq.auth.thread import ThreadAuthenticator

from mmsched.credentials import check_credentials, present_credentials
from mmsched.errors import PeerLost
from mmsched.transports.base import Buffer, Frames, GroupSpec, Transport
from mmsched.zmqwait import wait_readable

_MESSAGE = b"M"
_END = b"E"


class ZmqTransport(Transport):
    name = "zmq"

    def __init__(
        self,
        rank: int,
        world_size: int,
        context: zmq.asyncio.Context,
        socket: zmq.asyncio.Socket,
        timeout_s: float,
        authenticator: ThreadAuthenticator | None = None,
    ) -> None:
        super().__init__(rank, world_size)
        self._context = context
        self._socket = socket
        self._timeout_s = timeout_s
        self._authenticator = authenticator
        self._now: zmq.Socket[Any] = zmq.Socket.shadow(socket.underlying)  # never waits

    @classmethod
    def new_address(cls, workdir: Path) -> str:
        return f"ipc://{workdir}/zmq-{uuid.uuid4().hex[:8]}"

    @classmethod
    async def open(cls, spec: GroupSpec) -> ZmqTransport:
        token = spec.settings.token
        context = zmq.asyncio.Context()
        if spec.rank == 0:
            socket = context.socket(zmq.XPUB)
            socket.setsockopt(zmq.SNDHWM, 0)
            socket.setsockopt(zmq.XPUB_VERBOSE, 1)  # report every subscription, not the first
            linger = spec.settings.linger_s
            linger_s = spec.timeout_s if linger is None else float(linger)
            socket.setsockopt(zmq.LINGER, int(linger_s * 1000))
            authenticator = None
            if token is not None:
                authenticator = check_credentials(context, str(token))
                socket.plain_server = True
            try:
                socket.bind(spec.address)
            except zmq.ZMQError:
                if authenticator is not None:
                    authenticator.stop()
                context.destroy(linger=0)
                raise
            transport = cls(
                spec.rank, spec.world_size, context, socket, spec.timeout_s, authenticator
            )
            await transport._await_subscribers(spec.world_size - 1, spec.join_within_s)
            return transport
        socket = context.socket(zmq.SUB)
        socket.setsockopt(zmq.RCVHWM, 0)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.SUBSCRIBE, b"")
        if token is not None:
            present_credentials(socket, str(token))
        socket.connect(spec.address)
        return cls(spec.rank, spec.world_size, context, socket, spec.timeout_s)

    async def _await_subscribers(self, expected: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        seen = 0
        while seen < expected:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0 or not await self._socket.poll(timeout=remaining_ms):
                await self.aclose()
                raise PeerLost(
                    f"only {seen} of the {expected} receivers (ranks 1..{expected}) subscribed "
                    f"within {timeout_s} s"
                )
            event = await self._socket.recv()
            if event[:1] == b"\x01":  # a subscription (b"\x00" would be an unsubscription)
                seen += 1

    async def send(self, frames: Sequence[Buffer]) -> None:
        self._check_send()
        await self._socket.send_multipart([_MESSAGE, *frames], copy=False)
        self._count_sent(frames)

    async def recv(self) -> Frames:
        self._check_recv()
        try:  # a message already there is taken at once: no future, no trip through the loop
            parts = self._now.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            if not await wait_readable(self._now, self._timeout_s):
                raise PeerLost(
                    f"rank {self.rank} heard nothing from the sender in {self._timeout_s} s"
                ) from None
            parts = self._now.recv_multipart(zmq.NOBLOCK, copy=False)
        if parts[0].bytes == _END:
            raise self._end_of_stream()
        frames: Frames = [p.buffer for p in parts[1:]]
        self._count_received(frames)
        return frames

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.is_sender:
            # LINGER (timeout_s) lets queued messages and the end marker reach receivers.
            await self._socket.send_multipart([_END])
        self._socket.close()
        if self._authenticator is not None:
            self._authenticator.stop()  # handshakes only: connections made stay up
        if self.is_sender:
            self._context.term()  # waits up to LINGER for delivery
        else:
            self._context.destroy(linger=0)
