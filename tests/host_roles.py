"""Node 0 of the multi-host fault tests, run on simulated host 0 by ``test_hosts.py``.

``python host_roles.py SPEC_JSON``: starts a pipeline of the spec's config, writes the
``ready`` file, then keeps ``concurrency`` requests of fresh 4 MB features in flight until
the pipeline stops serving (the test cuts a link or kills a host meanwhile), closes it and
writes every request's outcome (``time.monotonic()`` start and end: one clock for every
simulated host, which share a kernel) to the ``out`` file.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mmsched import Config, MmschedError, Pipeline


async def node0(spec: dict[str, Any]) -> None:
    config = Config.from_dict(spec["config"])
    outcomes: list[dict[str, Any]] = []
    pipeline = Pipeline(config)
    await pipeline.start()
    Path(spec["ready"]).write_text("ready")

    async def one(i: int) -> None:
        feature = torch.rand(1 << 20)  # fresh bytes, made before the clock
        items = {"mm_items": [{"modality": "image", "feature": feature, "offsets": [[1, 3]]}]}
        start = time.monotonic()
        try:
            await pipeline.generate(f"r{i}", [7, 9, 9, 7], items)
            kind = "ok"
        except MmschedError as exc:
            kind = type(exc).__name__
        outcomes.append({"rid": f"r{i}", "start": start, "end": time.monotonic(), "kind": kind})

    running: set[asyncio.Task[None]] = set()
    sent = 0
    deadline = time.monotonic() + spec["run_for_s"]
    while pipeline.running and time.monotonic() < deadline:
        while len(running) < spec["concurrency"]:
            running.add(asyncio.create_task(one(sent)))
            sent += 1
        _, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
    await asyncio.gather(*running)
    closing = time.monotonic()
    await pipeline.aclose()
    result = {"outcomes": outcomes, "close_s": time.monotonic() - closing}
    Path(spec["out"]).write_text(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(node0(json.loads(sys.argv[1])))
