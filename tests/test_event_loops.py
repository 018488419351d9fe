"""The pipeline under both event loops its embedding servers run: asyncio's own, and uvloop.

Requests are served with ranks as processes and as tasks; the reliability scenarios that
depend on the loop (cancelled callers, background work that stops) run under both loops in
``test_hostile.py``.
"""

from __future__ import annotations

import asyncio

import pytest

from conftest import RunOnLoop
from mmsched import Config, Pipeline
from mmsched.bench.workloads import image_sample


@pytest.mark.parametrize("transport", ["memory", "zmq"])
def test_requests_are_served(transport: str, on_each_loop: RunOnLoop) -> None:
    on_each_loop(_served(transport))


async def _served(transport: str) -> None:
    sample = image_sample(2, 8)
    async with Pipeline(Config(transport=transport, tp_size=2)) as pipeline:
        outputs = await asyncio.gather(
            *(pipeline.generate(f"r{i}", sample.input_ids, sample.mm_inputs) for i in range(8))
        )
    assert [o.rid for o in outputs] == [f"r{i}" for i in range(8)]
