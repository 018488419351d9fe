"""A scripted model for the tests of the way back: module-level, so spawned ranks import it.

Each request's ``sampling_params["script"]`` says what the model returns for it, so one
pipeline serves every case: ``whole`` (its ids reversed, then the rank that answered),
``stream`` (``n`` chunks of one id, a pause of ``pause_s`` before each, the last with the
finish reason ``length``), ``broken-stream`` (two chunks, then an exception), ``not-ids`` (a
string), ``missing`` (nothing for it), ``stub`` (the callback returns ``None`` when every
request of the iteration asks for it).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from mmsched import TokenizedGenerateReqInput
from mmsched.outputs import ModelOutput


async def _stream(n: int, pause_s: float) -> AsyncIterator[Any]:
    for i in range(n - 1):
        await asyncio.sleep(pause_s)
        yield [i]
    await asyncio.sleep(pause_s)
    yield ModelOutput([n - 1], "length")


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
            outputs[req.rid] = _stream(int(params["n"]), float(params.get("pause_s", 0)))
        elif script == "broken-stream":
            outputs[req.rid] = _broken()
        elif script == "not-ids":
            outputs[req.rid] = "forty-two"
    return outputs
