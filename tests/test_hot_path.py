"""The request's hot path: forwarded once, placed through its own handle, no needless hops.

What these check is the structure that keeps a small request cheap (no figure is timed
here: the targets are met in ``mmsched bench fanout``).
"""

from __future__ import annotations

import asyncio
import threading
import time

import orjson
import pytest
import torch
import zmq

from mmsched import (
    Batch,
    CodecError,
    Config,
    Decoder,
    GenerateOutput,
    Pipeline,
    TokenizedGenerateReqInput,
    encode,
)
from mmsched.errors import ArenaFull
from mmsched.probes import RankTimings
from mmsched.stores import StoreOptions
from mmsched.stores.shm import ShmStore
from mmsched.tokenizer import IDLE_INLINE_MAX_BYTES, INLINE_MAX_BYTES
from mmsched.zmqwait import has_message, wait_readable


def _request(rid: str, ids: int) -> TokenizedGenerateReqInput:
    return TokenizedGenerateReqInput(
        rid=rid,
        input_ids=list(range(ids)),
        sampling_params={"temperature": 0.5},
        mm_inputs={
            "mm_items": [{"modality": "image", "feature": torch.randn(64), "offsets": [[1, 2]]}]
        },
    )


def test_a_batch_carries_each_request_as_the_frames_it_came_in() -> None:
    first, second = _request("a", 100), _request("b", 3)
    sent = {id(r): encode(r) for r in (first, second)}
    batch = Batch(iteration=7, requests=[first, second], aborted=["x"])
    frames = encode(batch, forward=sent)
    # The requests' own frames, the very objects, follow the batch's header: nothing of them
    # was walked or encoded again.
    assert frames[1:] == [*sent[id(first)], *sent[id(second)]]
    assert all(
        a is b for a, b in zip(frames[1:], [*sent[id(first)], *sent[id(second)]], strict=True)
    )
    got = Decoder().decode(frames)
    assert isinstance(got, Batch) and got.iteration == 7 and got.aborted == ["x"]
    for mine, theirs in zip(got.requests, (first, second), strict=True):
        assert isinstance(mine, TokenizedGenerateReqInput)
        assert mine.rid == theirs.rid and mine.input_ids == theirs.input_ids
        assert mine.sampling_params == theirs.sampling_params
        assert isinstance(mine.mm_inputs, dict) and isinstance(theirs.mm_inputs, dict)
        assert torch.equal(
            mine.mm_inputs["mm_items"][0]["feature"], theirs.mm_inputs["mm_items"][0]["feature"]
        )


def _batch_header(buffers: int, span: object) -> bytes:
    tree = {"$t": "batch", "iteration": 0, "requests": [{"$msg": span}]}
    return orjson.dumps({"v": 1, "n": buffers, "msg": tree})


@pytest.mark.parametrize(
    "span", ["[0, 0]", "[0, 9]", "[-1, 1]", "[1, 1]", "[0]", '"a"', "[0.0, 1]", "[true, 1]"]
)
def test_a_forwarded_span_out_of_its_frames_is_a_codec_error(span: str) -> None:
    inner = encode(_request("a", 3))
    with pytest.raises(CodecError):
        Decoder().decode([_batch_header(len(inner), orjson.loads(span)), *inner])


def test_a_forwarded_message_that_is_not_one_is_a_codec_error() -> None:
    with pytest.raises(CodecError):
        Decoder().decode([_batch_header(1, [0, 1]), b"not a header"])


def test_a_placement_that_must_not_wait_finds_no_room_at_once() -> None:
    options = StoreOptions(capacity_bytes=1 << 20, consumers=1, timeout_s=30.0, min_bytes=1024)
    producer = ShmStore.create(options)
    consumer = ShmStore.attach(producer.address, 0, options)
    try:
        held = producer.placement()
        assert held.put(torch.zeros(200_000)) is not None  # 800 kB, held until settled
        hurried = producer.placement(wait=False)
        with pytest.raises(ArenaFull):  # at once, not after timeout_s
            hurried.put(torch.zeros(100_000))
        assert hurried.placed == []
        producer.settle(held.placed, sent=False)  # never sent: its room is free again
        assert hurried.put(torch.zeros(100_000)) is not None
        producer.settle(hurried.placed, sent=False)
    finally:
        consumer.close()
        producer.close()


def _worker_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("mmsched-tok")]


async def test_small_requests_are_prepared_on_the_loop_and_large_ones_in_a_worker() -> None:
    config = Config(strategy="zero-copy", transport="memory", tp_size=2)
    small = torch.randn(2_500)  # 10 kB
    mid = torch.randn(INLINE_MAX_BYTES // 4 + 1)  # on the loop only when nothing else runs
    large = torch.randn(IDLE_INLINE_MAX_BYTES // 4 + 1)
    ids = list(range(8))

    def item(feature: torch.Tensor) -> dict[str, object]:
        return {"mm_items": [{"modality": "image", "feature": feature, "offsets": [(1, 2)]}]}

    async with Pipeline(config) as pipeline:
        on_loop: dict[str, bool] = {}

        async def generate(rid: str, mm_inputs: dict[str, object] | None = None) -> GenerateOutput:
            trace = await pipeline.generate_traced(rid, ids, mm_inputs)
            on_loop[rid] = trace.prepared_on_loop
            return trace.output

        for i in range(3):
            out = await generate(f"s{i}", item(small.clone()))
            assert len(out.pad_values) == 1
        await generate("text")
        out = await generate("mid alone", item(mid.clone()))
        assert len(out.pad_values) == 1
        assert _worker_threads() == []  # the pool's threads start only once it is used
        assert all(on_loop.values()) and len(on_loop) == 5
        # With another request in flight, a mid-sized one goes to a worker thread.
        outs = await asyncio.gather(
            generate("mid first", item(mid.clone())),
            generate("mid second", item(mid.clone())),
        )
        assert [len(o.pad_values) for o in outs] == [1, 1]
        assert on_loop["mid first"] and not on_loop["mid second"]
        out = await generate("large", item(large))
        assert len(out.pad_values) == 1
        assert not on_loop["large"]
        assert _worker_threads()


_STEPS: list[float] = []  # when each in-process rank ran its model step


class _StepTimes(RankTimings):
    """Reports each rank's ``ready_at``, and records when its model step ran (in-process
    ranks are tasks of this process: they share this list)."""

    async def model_step(
        self, rank: int, iteration: int, requests: list[TokenizedGenerateReqInput]
    ) -> None:
        _STEPS.append(time.monotonic())


async def test_in_process_ranks_all_hold_their_inputs_before_any_model_step() -> None:
    config = Config(strategy="zero-copy", transport="memory", tp_size=4)
    feature = torch.randn(2_500)
    async with Pipeline(config, probe=_StepTimes()) as pipeline:
        tasks, processes = pipeline.in_process_rank_addresses, pipeline.rank_addresses
        assert tasks is not None and processes is not None
        # The ranks reach the tokenizer inside this process; what other processes see
        # (and must present the token to) stays the private ipc endpoints.
        assert tasks.requests.startswith("inproc://")
        assert tasks.results.startswith("inproc://")
        assert processes.requests.startswith("ipc://")
        for i in range(3):
            _STEPS.clear()
            item = {"modality": "image", "feature": feature.clone(), "offsets": [(1, 2)]}
            trace = await pipeline.generate_traced(f"r{i}", list(range(8)), {"mm_items": [item]})
            assert len(trace.reports) == 4
            last_ready = max(float(r.data["ready_at"]) for r in trace.reports)
            assert len(_STEPS) == 4 and min(_STEPS) >= last_ready


async def test_a_descriptor_wait_wakes_for_a_message_and_times_out_without_one() -> None:
    ctx = zmq.Context()
    try:
        pull = ctx.socket(zmq.PULL)
        push = ctx.socket(zmq.PUSH)
        pull.bind("inproc://wait-test")
        push.connect("inproc://wait-test")
        assert not has_message(pull)
        assert await wait_readable(pull, 0.05) is False
        assert await wait_readable(pull, 0) is False
        waiting = asyncio.ensure_future(wait_readable(pull, 5))
        await asyncio.sleep(0.01)
        push.send(b"x")
        assert await asyncio.wait_for(waiting, 5) is True
        assert pull.recv(zmq.NOBLOCK) == b"x"
        push.send(b"y")  # there before the wait starts: found without a wake-up
        await asyncio.sleep(0.01)
        assert await wait_readable(pull, None) is True
        assert pull.recv(zmq.NOBLOCK) == b"y"
        # Cancelled, it leaves nothing behind: the message is still there to read.
        waiting = asyncio.ensure_future(wait_readable(pull, None))
        await asyncio.sleep(0.01)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        push.send(b"z")
        assert await wait_readable(pull, 5) is True
        assert pull.recv(zmq.NOBLOCK) == b"z"
    finally:
        ctx.destroy(linger=0)
