"""A scripted model for the tests of the way back: module-level, so spawned ranks import it.

Each request's ``sampling_params["script"]`` says what the model returns for it, so one
pipeline serves every case: ``whole`` (its ids reversed, then the rank that answered),
``stream`` (``n`` chunks of one id, a pause of ``pause_s`` before each, the last with the
finish reason ``length``; closed early, it leaves ``closed-<rid>-rank<N>`` in
``$MODEL_HOOKS_DIR``), ``broken-stream`` (two chunks, then an exception), ``not-ids`` (a
string), ``missing`` (nothing for it), ``stub`` (the callback returns ``None`` when every
request of the iteration asks for it).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from mmsched import TokenizedGenerateReqInput
from mmsched.outputs import ModelOutput


async def _stream(rid: str, rank: int, n: int, pause_s: float) -> AsyncIterator[Any]:
    try:
        for i in range(n - 1):
            await asyncio.sleep(pause_s)
            yield [i]
        await asyncio.sleep(pause_s)
        yield ModelOutput([n - 1], "length")
    except GeneratorExit:
        # Closed before its end (the request was aborted): say so where the test looks.
        where = os.environ.get("MODEL_HOOKS_DIR")
        if where:
            (Path(where) / f"closed-{rid}-rank{rank}").touch()
        raise


async def _broken() -> AsyncIterator[list[int]]:
    yield [1]
    yield [2]
    raise RuntimeError("the model's kernel failed")


def scripted_model(
    rank: int, iteration: int, requests: list[TokenizedGenerateReqInput]
) -> dict[str, Any] | None:
    scripts = [req.sampling_params.get("script") for req in requests]
    if all(s == "stub" for s in scripts):
        return None
    outputs: dict[str, Any] = {}
    for req, script in zip(requests, scripts, strict=True):
        if script == "whole":
            outputs[req.rid] = [*reversed(req.input_ids), rank]
        elif script == "stream":
            params = req.sampling_params
            pause_s = float(params.get("pause_s", 0))
            outputs[req.rid] = _stream(req.rid, rank, int(params["n"]), pause_s)
        elif script == "broken-stream":
            outputs[req.rid] = _broken()
        elif script == "not-ids":
            outputs[req.rid] = "forty-two"
    return outputs
