"""Fixtures shared by test modules."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

RunOnLoop = Callable[[Coroutine[Any, Any, None]], None]


@pytest.fixture(params=["asyncio", "uvloop"])
def on_each_loop(request: pytest.FixtureRequest) -> RunOnLoop:
    """Runs a scenario to completion on a fresh event loop of each kind embedding servers
    use: asyncio's own, and uvloop (skipped where it is not installed)."""
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
