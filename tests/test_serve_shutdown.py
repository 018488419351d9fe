"""The stop's bound on requests in progress, in-process: what ``mmsched.serve.run`` relies on
(``tests/test_serve.py`` checks it end to end with SIGTERM)."""

from __future__ import annotations

import asyncio
import time

import pytest

pytest.importorskip("uvicorn", reason="the serve extra installs uvicorn")

from mmsched.serve.shutdown import Drain, ShuttingDown


def test_a_request_in_progress_is_cut_at_the_deadline_and_a_later_one_at_once() -> None:
    async def main() -> None:
        drain = Drain(0.2)
        drain.attach(asyncio.get_running_loop())

        async def request(seconds: float) -> str:
            async with drain.guard():
                await asyncio.sleep(seconds)
            return "done"

        assert await request(0.01) == "done"  # no stop: no deadline
        slow = asyncio.create_task(request(30))
        quick = asyncio.create_task(request(0.05))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        drain.begin()
        assert await quick == "done"  # what ends within the bound is answered as usual
        with pytest.raises(ShuttingDown, match=r"shutdown_timeout_s=0\.2"):
            await slow
        assert 0.15 < time.monotonic() - started < 1.0
        with pytest.raises(ShuttingDown):
            await request(30)  # arriving after the deadline: cut at once

    asyncio.run(main())


def test_a_timeout_of_the_request_s_own_is_not_the_stop() -> None:
    async def main() -> None:
        drain = Drain(5)
        drain.attach(asyncio.get_running_loop())
        with pytest.raises(TimeoutError):
            async with drain.guard():
                await asyncio.wait_for(asyncio.sleep(30), 0.01)
        drain.begin_threadsafe()  # from a signal handler: lands on the loop
        await asyncio.sleep(0.05)
        with pytest.raises(TimeoutError):
            async with drain.guard():
                await asyncio.wait_for(asyncio.sleep(30), 0.01)

    asyncio.run(main())
