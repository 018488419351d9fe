"""Waiting for a ZMQ socket's message by its descriptor, on a socket that is also sent on."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import zmq

from mmsched.zmqwait import RecvWaiter, wait_readable


async def _answer_while_a_call_arrives(address: str, use_waiter: bool) -> bool:
    """Whether a waiting ROUTER wakes for a call that arrived just before it sent an answer
    (the send processes the arrival and takes the descriptor's edge with it)."""
    context = zmq.Context()
    try:
        router = context.socket(zmq.ROUTER)
        router.bind(address)
        dealer = context.socket(zmq.DEALER)
        dealer.connect(address)
        dealer.send(b"hello")
        peer, _ = router.recv_multipart()
        waiter = RecvWaiter(router)
        task = asyncio.ensure_future(waiter.wait() if use_waiter else wait_readable(router, None))
        await asyncio.sleep(0.05)  # the router waits now
        dealer.send(b"call")
        time.sleep(0.05)  # the call is there before the loop looks again
        router.send_multipart([peer, b"an earlier call's answer"])
        if use_waiter:
            waiter.recheck()
        try:
            await asyncio.wait_for(task, 1.0)
        except TimeoutError:
            return False
        return router.recv_multipart(zmq.NOBLOCK) == [peer, b"call"]
    finally:
        context.destroy(linger=0)


def test_a_send_does_not_hide_an_arrival_from_the_waiter(tmp_path: Path) -> None:
    address = f"ipc://{tmp_path}/router"
    # The hazard itself: the descriptor alone misses the call (this is what hung an engine
    # answering hundreds of calls a second) ...
    assert not asyncio.run(_answer_while_a_call_arrives(address, use_waiter=False))
    # ... and a waiter rechecked after each send takes it.
    assert asyncio.run(_answer_while_a_call_arrives(address, use_waiter=True))
