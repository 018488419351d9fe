"""Waiting on the event loop for a ZMQ socket to have a message, at the cost of one wake-up.

An asyncio socket's ``poll`` makes a poller, a chain of futures (each link resolved in a
later turn of the loop) and a timer for every wait; on the small-request hot path that is
most of the time between a message's arrival and its receiver running. Here the loop
watches the socket's file descriptor itself, and the waiter wakes in the turn the message
is seen: receivers then take what is there without waiting (``zmq.NOBLOCK`` on a plain
socket).

ZMQ's descriptor signals that the socket's events *changed*, not that a message is there,
and it is edge-triggered: the events are read again after each signal, and once more right
after the descriptor is watched, so that a message that came before is not missed.

A socket this process also sends on needs one thing more: a send processes the socket's
pending commands, an arrival's among them, and takes the descriptor's edge with it, so a
waiter would sleep beside a message. [`RecvWaiter`][mmsched.zmqwait.RecvWaiter] is woken
by every send (``recheck`` after it) for that.
"""

from __future__ import annotations

import asyncio
from typing import Any

import zmq

# Plain ints: zmq's flags are enums, whose every ``&`` costs a call into the enum module.
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_FD = int(zmq.FD)


def has_message(sock: zmq.Socket[Any]) -> bool:
    """Whether a message can be received from ``sock`` now, without waiting."""
    return bool(int(sock.getsockopt(_EVENTS)) & _POLLIN)


async def wait_readable(sock: zmq.Socket[Any], timeout_s: float | None) -> bool:
    """Wait until ``sock`` has a message (``True``) or ``timeout_s`` passes (``False``).

    ``sock`` must not also be waited on through an asyncio socket's own futures: the loop
    watches one reader per descriptor.
    """
    if has_message(sock):
        return True
    if timeout_s is not None and timeout_s <= 0:
        return False
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[bool] = loop.create_future()

    def signalled() -> None:
        if not ready.done() and has_message(sock):
            ready.set_result(True)

    def expired() -> None:
        if not ready.done():
            ready.set_result(False)

    fd = int(sock.getsockopt(_FD))
    loop.add_reader(fd, signalled)
    timer = loop.call_later(timeout_s, expired) if timeout_s is not None else None
    try:
        if has_message(sock):  # came between the first look and the watch: no edge left
            return True
        return await ready
    finally:
        if timer is not None:
            timer.cancel()
        loop.remove_reader(fd)


class RecvWaiter:
    """[`wait_readable`][mmsched.zmqwait.wait_readable] for a socket that is sent on too
    (a ROUTER answering its peers): call ``recheck`` after each send, which may have
    taken the edge of a message that arrived meanwhile (module docstring)."""

    def __init__(self, sock: zmq.Socket[Any]) -> None:
        self.sock = sock
        self._ready: asyncio.Future[bool] | None = None

    async def wait(self) -> None:
        """Until ``sock`` has a message."""
        if has_message(self.sock):
            return
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[bool] = loop.create_future()
        self._ready = ready
        fd = int(self.sock.getsockopt(_FD))
        loop.add_reader(fd, self.recheck)
        try:
            if has_message(self.sock):  # came between the first look and the watch
                return
            await ready
        finally:
            self._ready = None
            loop.remove_reader(fd)

    def recheck(self) -> None:
        """Wake the waiter if a message is there (after a send, or on the descriptor)."""
        ready = self._ready
        if ready is not None and not ready.done() and has_message(self.sock):
            ready.set_result(True)
