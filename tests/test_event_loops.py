"""The pipeline under both event loops its embedding servers run: asyncio's own, and uvloop.

The same scenarios under each: requests served with ranks as processes and as tasks,
cancelled callers that give their bytes back, and background work that stops and fails
every waiting caller at once.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from mmsched import Config, PeerLost, Pipeline
from mmsched.bench.workloads import image_sample
from mmsched.testing import SlowRank

Run = Callable[[Coroutine[Any, Any, None]], None]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Run:
    """Runs a scenario to completion on a fresh loop of the kind the parameter names."""
    factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop
    if request.param == "uvloop":
        uvloop = pytest.importorskip("uvloop", reason="uvloop is not installed")
        factory = uvloop.new_event_loop

    def run(scenario: Coroutine[Any, Any, None]) -> None:
        async def checked() -> None:
            module = type(asyncio.get_running_loop()).__module__.split(".")[0]
            assert module == request.param  # the scenario really runs on that loop
            await scenario

        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(checked())

    return run


@pytest.mark.parametrize("transport", ["memory", "zmq"])
def test_requests_are_served(transport: str, run: Run) -> None:
    run(_served(transport))


async def _served(transport: str) -> None:
    sample = image_sample(2, 8)
    async with Pipeline(Config(transport=transport, tp_size=2)) as pipeline:
        outputs = await asyncio.gather(
            *(pipeline.generate(f"r{i}", sample.input_ids, sample.mm_inputs) for i in range(8))
        )
    assert [o.rid for o in outputs] == [f"r{i}" for i in range(8)]


def test_cancelled_callers_give_their_bytes_back(run: Run) -> None:
    run(_cancelled_callers())


async def _cancelled_callers() -> None:
    sample = image_sample(2, 20)
    config = Config(transport="memory", tp_size=2, max_inflight_mb=4)
    rng = random.Random(3)
    async with Pipeline(config) as pipeline:
        stage = pipeline._stage
        assert stage is not None

        async def cancelled_after(i: int, delay: float) -> None:
            task = asyncio.create_task(
                pipeline.generate(f"c{i}", sample.input_ids, sample.mm_inputs)
            )
            await asyncio.sleep(delay)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

        await asyncio.gather(*(cancelled_after(i, rng.uniform(0, 0.05)) for i in range(100)))
        await pipeline.generate("last", sample.input_ids, sample.mm_inputs)
        for _ in range(100):
            if not stage.inflight_bytes:
                break
            await asyncio.sleep(0.05)
        assert stage.inflight_bytes == 0


def test_stopped_background_work_fails_waiting_callers(run: Run) -> None:
    run(_stopped_background())


async def _stopped_background() -> None:
    config = Config(transport="memory", tp_size=2, timeout_s=5)
    sample = image_sample(2, 4)
    async with Pipeline(config, on_iteration=SlowRank(rank=0, seconds=3.0)) as pipeline:
        waiting = [
            asyncio.create_task(pipeline.generate(f"w{i}", sample.input_ids, sample.mm_inputs))
            for i in range(3)
        ]
        await asyncio.sleep(0.2)
        assert pipeline._stage is not None
        pipeline._stage._results.close()  # the result router's socket fails under it
        results = await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), 5)
    assert all(isinstance(r, PeerLost) and "router" in str(r) for r in results), results
