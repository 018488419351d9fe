"""The way back: what the rank callback returns reaches ``generate()``'s caller.

Real rank processes (TP=2, the default transports); the model is
``tests/model_hooks.scripted_model``, told per request what to return.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from tests.model_hooks import scripted_model

from mmsched import Config, GenerateOutput, Pipeline, RequestFailed
from mmsched.errors import ModelOutputError
from mmsched.outputs import ModelOutput, checked_output, stub_model

pytestmark = pytest.mark.asyncio(loop_scope="module")

TIMEOUT_S = 1.5


@pytest.fixture(scope="module")
def closed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("closed")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pipeline(closed_dir: Path) -> AsyncIterator[Pipeline]:
    os.environ["MODEL_HOOKS_DIR"] = str(closed_dir)  # the rank processes inherit it
    config = Config(tp_size=2, timeout_s=TIMEOUT_S, shm_arena_mb=16)
    try:
        async with Pipeline(config, on_iteration=scripted_model) as p:
            yield p
    finally:
        del os.environ["MODEL_HOOKS_DIR"]


async def test_the_models_ids_are_the_answer(pipeline: Pipeline) -> None:
    out = await pipeline.generate("whole", [1, 2, 3], sampling_params={"script": "whole"})
    assert out.output_ids == [3, 2, 1, 0]  # reversed, then the rank that answered: 0
    assert out.finished and out.finish_reason == "stop"


async def test_a_stream_arrives_chunk_by_chunk(pipeline: Pipeline) -> None:
    params = {"script": "stream", "n": 4, "pause_s": 0.2}
    seen: list[tuple[float, GenerateOutput]] = []
    async for chunk in pipeline.generate_stream("stream", [5, 6], sampling_params=params):
        seen.append((time.monotonic(), chunk))
    ids = [i for _, c in seen for i in c.output_ids]
    assert ids == [0, 1, 2, 3]
    assert [c.finished for _, c in seen][-1] is True
    assert not any(c.finished for _, c in seen[:-1])
    assert seen[-1][1].finish_reason == "length"
    # Chunks came as the model made them, not all at once at the end.
    streamed = [t for t, c in seen if c.output_ids]
    assert streamed[-1] - streamed[0] > 0.3


async def test_generate_collects_every_streamed_id(pipeline: Pipeline) -> None:
    params = {"script": "stream", "n": 5}
    out = await pipeline.generate("collected", [1], sampling_params=params)
    assert out.output_ids == [0, 1, 2, 3, 4] and out.finish_reason == "length"


async def test_a_stream_longer_than_timeout_s_lives_while_chunks_come(
    pipeline: Pipeline,
) -> None:
    params = {"script": "stream", "n": 6, "pause_s": TIMEOUT_S / 3}
    started = time.monotonic()
    out = await pipeline.generate("long", [1], sampling_params=params)
    assert time.monotonic() - started > TIMEOUT_S
    assert out.output_ids == list(range(6))


async def test_a_stream_holds_up_no_request_behind_it(pipeline: Pipeline) -> None:
    # A slow stream (6 chunks, 0.3 s apart) and, just after it, a whole answer and a
    # second stream: neither waits for the first stream's end.
    slow = {"script": "stream", "n": 6, "pause_s": 0.3}
    started = time.monotonic()
    first = asyncio.ensure_future(pipeline.generate("slow", [1], sampling_params=slow))
    ended: dict[str, float] = {}
    first.add_done_callback(lambda _: ended.setdefault("slow", time.monotonic() - started))
    await asyncio.sleep(0.2)
    whole = await pipeline.generate("behind", [1, 2], sampling_params={"script": "whole"})
    whole_at = time.monotonic() - started
    second = await pipeline.generate(
        "second", [1], sampling_params={"script": "stream", "n": 2, "pause_s": 0.3}
    )
    second_at = time.monotonic() - started
    slow_out = await first
    assert whole.output_ids == [2, 1, 0] and second.output_ids == [0, 1]
    assert slow_out.output_ids == list(range(6))
    assert whole_at < 1.0, whole_at  # not after the slow stream's 1.8 s
    assert second_at < ended["slow"], (second_at, ended)  # it went side by side


async def test_closing_a_stream_early_closes_the_models_generator(
    pipeline: Pipeline, closed_dir: Path
) -> None:
    params = {"script": "stream", "n": 40, "pause_s": 0.1}
    async with contextlib.aclosing(
        pipeline.generate_stream("dropped", [1], sampling_params=params)
    ) as chunks:
        async for chunk in chunks:
            if chunk.output_ids == [1]:
                break
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and len(list(closed_dir.glob("closed-dropped-*"))) < 2:
        await asyncio.sleep(0.05)
    assert sorted(p.name for p in closed_dir.glob("closed-dropped-*")) == [
        "closed-dropped-rank0",
        "closed-dropped-rank1",
    ]
    after = await pipeline.generate("after-drop", [3], sampling_params={"script": "whole"})
    assert after.output_ids == [3, 0]


async def test_bad_outputs_fail_their_request_alone(pipeline: Pipeline) -> None:
    results = await asyncio.gather(
        pipeline.generate("bad-type", [1], sampling_params={"script": "not-ids"}),
        pipeline.generate("missing", [1], sampling_params={"script": "missing"}),
        pipeline.generate("broken", [1], sampling_params={"script": "broken-stream"}),
        pipeline.generate("good", [1, 2], sampling_params={"script": "whole"}),
        return_exceptions=True,
    )
    bad_type, missing, broken, good = results
    for failed in (bad_type, missing, broken):
        assert isinstance(failed, RequestFailed), failed
    assert isinstance(bad_type, RequestFailed) and bad_type.kind == "ModelOutputError"
    assert isinstance(missing, RequestFailed) and "no output" in str(missing)
    assert isinstance(broken, RequestFailed) and "kernel failed" in str(broken)
    assert isinstance(good, GenerateOutput) and good.output_ids == [2, 1, 0]
    # The pipeline goes on.
    again = await pipeline.generate("after", [4], sampling_params={"script": "whole"})
    assert again.output_ids == [4, 0]


async def test_a_callback_that_returns_none_answers_as_the_stub(pipeline: Pipeline) -> None:
    out = await pipeline.generate("stub", [9, 8, 7], sampling_params={"script": "stub"})
    assert out.output_ids == [9, 8, 7]


async def test_checked_output_refuses_what_is_not_ids() -> None:
    assert checked_output("r", [1, 2]) == ModelOutput([1, 2])
    for bad in ("text", [1.5], [True], ModelOutput([1], "tired"), 42):
        with pytest.raises(ModelOutputError):
            checked = checked_output("r", bad)
            if not isinstance(checked, ModelOutput):
                async for _ in checked:
                    pass
    assert stub_model(0, 0, []) == {}
