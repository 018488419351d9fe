"""The processes of the multi-host tests, run on simulated hosts by ``test_hosts.py``.

``python host_roles.py SPEC_JSON``: node 0 of a pipeline. It starts a pipeline of the spec's
config, writes the ``ready`` file, then keeps ``concurrency`` requests of fresh 4 MB
features in flight until the pipeline stops serving (the test cuts a link or kills a host
meanwhile), closes it and writes every request's outcome (``time.monotonic()`` start and
end: one clock for every simulated host, which share a kernel) to the ``out`` file.

With ``"role": "group"`` in the spec: ranks ``ranks`` of a server's own group
([`RankGroup`][mmsched.rank_group.RankGroup]) on one host, tasks of this process, meeting in
``rendezvous``. Rank 0 publishes ``iterations`` iterations of one good request (a fresh
1 MB feature) and one malformed one, then, with ``until_lost``, writes the ``published``
file and keeps publishing empty iterations until a host is lost; every other rank receives
until the group ends. ``out`` gets each rank's iterations (rids and content digests), rank
0's refused rids, and how each rank's part ended.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mmsched import (
    Config,
    EndOfStream,
    MmschedError,
    MultimodalInputs,
    PeerLost,
    Pipeline,
    RankGroup,
    TokenizedGenerateReqInput,
)


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


async def group_ranks(spec: dict[str, Any]) -> None:
    config = Config.from_dict(spec["config"])
    joins = (RankGroup.join(config, rank, spec["rendezvous"]) for rank in spec["ranks"])
    groups = await asyncio.gather(*joins)
    result: dict[str, Any] = {"ranks": {}}

    def seen(requests: list[TokenizedGenerateReqInput]) -> dict[str, Any]:
        mm = [r.mm_inputs for r in requests]
        digests = [m.content_digest() if isinstance(m, MultimodalInputs) else None for m in mm]
        return {"rids": [r.rid for r in requests], "digests": digests}

    async def entry(group: RankGroup) -> dict[str, Any]:
        iterations, refused = [], []
        for i in range(spec["iterations"]):
            good = {
                "mm_items": [
                    {"modality": "image", "feature": torch.rand(1 << 18), "offsets": [[1, 3]]}
                ]
            }
            bad = {
                "mm_items": [{"modality": "image", "feature": torch.rand(64), "offsets": [[1, 40]]}]
            }
            published = await group.publish(
                [
                    TokenizedGenerateReqInput(f"good-{i}", [5, 9, 9, 5], {}, good),
                    TokenizedGenerateReqInput(f"bad-{i}", [5, 9, 9, 5], {}, bad),
                ]
            )
            iterations.append(seen(published.requests))
            refused += [f"{e.rid}: {e.kind}" for e in published.failed]
        ended: dict[str, Any] = {"kind": "closed"}
        if spec.get("until_lost"):
            Path(spec["published"]).write_text("published")
            deadline = time.monotonic() + 60
            try:
                while time.monotonic() < deadline:
                    await group.publish([])  # the per-iteration heartbeat
                    await asyncio.sleep(0.05)
            except PeerLost as exc:
                ended = {"kind": "PeerLost", "at": time.monotonic(), "message": str(exc)}
        await group.aclose()
        return {"iterations": iterations, "refused": refused, "ended": ended}

    async def receiver(group: RankGroup) -> dict[str, Any]:
        iterations = []
        try:
            while True:
                iteration = await group.receive()
                if iteration.requests:
                    iterations.append(seen(iteration.requests))
        except (EndOfStream, PeerLost) as exc:
            ended = {"kind": type(exc).__name__, "at": time.monotonic(), "message": str(exc)}
        await group.aclose()
        return {"iterations": iterations, "ended": ended}

    outcomes = await asyncio.gather(*(entry(g) if g.rank == 0 else receiver(g) for g in groups))
    result["ranks"] = {str(g.rank): o for g, o in zip(groups, outcomes, strict=True)}
    Path(spec["out"]).write_text(json.dumps(result))


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    asyncio.run(group_ranks(spec) if spec.get("role") == "group" else node0(spec))
