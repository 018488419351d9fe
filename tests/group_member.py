"""One rank of a server's own group, as its own process, for ``test_rank_group.py``.

``python group_member.py SPEC_JSON``: waits ``delay_s``, joins the group of the spec's
config at ``rendezvous`` as ``rank``, passes one iteration (rank 0 publishes a request
whose feature is ``arange``; the others receive it), closes, and writes what happened to
``out`` as JSON: ``{"ok": true, "rids": [...], "sum": ...}`` or ``{"ok": false, "error":
"Kind: message"}``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mmsched import Config, MmschedError, MultimodalInputs, RankGroup, TokenizedGenerateReqInput


async def member(spec: dict[str, Any]) -> dict[str, Any]:
    await asyncio.sleep(spec.get("delay_s", 0.0))
    config = Config.from_dict(spec["config"])
    started = time.monotonic()
    try:
        group = await RankGroup.join(config, spec["rank"], spec["rendezvous"])
    except MmschedError as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    async with group:
        if spec["rank"] == 0:
            feature = torch.arange(64, dtype=torch.float32)
            mm = {"mm_items": [{"modality": "image", "feature": feature, "offsets": [(0, 1)]}]}
            iteration = await group.publish([TokenizedGenerateReqInput("r", [5] * 4, {}, mm)])
        else:
            iteration = await group.receive()
    (req,) = iteration.requests
    assert isinstance(req.mm_inputs, MultimodalInputs)
    return {
        "ok": True,
        "rids": [r.rid for r in iteration.requests],
        "sum": float(req.mm_inputs.mm_items[0].feature.sum()),
        "join_s": time.monotonic() - started,
    }


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    result = asyncio.run(member(spec))
    Path(spec["out"]).write_text(json.dumps(result))
