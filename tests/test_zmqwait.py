"""Waiting for a ZMQ socket's message by its descriptor, on a socket that is also sent on."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path
from types import SimpleNamespace

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


async def _reply(dealer: zmq.Socket[bytes], timeout_s: float = 1.0) -> dict[str, object] | None:
    """The next answer on ``dealer``, waited for on the loop (the engine runs there)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if dealer.poll(0):
            answer: dict[str, object] = json.loads(dealer.recv())
            return answer
        await asyncio.sleep(0.01)
    return None


def test_the_engine_answers_a_call_that_arrived_while_it_answered_another(
    tmp_path: Path,
) -> None:
    """The hazard above, in the engine of ``--api-servers``: its every answer rechecks."""
    from mmsched.serve.apiservers import Engine

    async def main() -> list[dict[str, object] | None]:
        pipeline = SimpleNamespace(running=True)
        engine = Engine(SimpleNamespace(), SimpleNamespace(), pipeline, b"id", False)  # type: ignore[arg-type]
        address = f"ipc://{tmp_path}/engine"
        engine.bind(address)
        serving = asyncio.create_task(engine.serve())
        context = zmq.Context()
        try:
            dealer = context.socket(zmq.DEALER)
            dealer.setsockopt(zmq.IDENTITY, b"http-0-1")
            dealer.connect(address)
            dealer.send_multipart([b"hello", b'{"id": 1}'])
            assert await _reply(dealer) == {"id": 1, "identity": b"id".hex(), "headers": False}
            await asyncio.sleep(0.05)  # the engine waits now
            dealer.send_multipart([b"health", b'{"id": 2}'])
            time.sleep(0.05)  # the call is there before the loop looks again
            engine._send(b"http-0-1", {"id": 0})  # as an earlier call's answer goes
            return [await _reply(dealer), await _reply(dealer)]
        finally:
            serving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await serving
            await engine.aclose()
            context.destroy(linger=0)

    assert asyncio.run(main()) == [{"id": 0}, {"id": 2, "running": True}]
