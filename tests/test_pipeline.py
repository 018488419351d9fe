"""The whole pipeline at TP=2: real rank processes, a real gloo group, real ZMQ sockets; and
the same logic with ranks as tasks of this process (the ``memory`` transport)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator

import numpy as np
import pytest
import pytest_asyncio

from mmsched import (
    Config,
    ConfigError,
    InvalidMultimodalInput,
    MultimodalInputs,
    PeerLost,
    Pipeline,
    RankTimings,
    RequestFailed,
    RequestTrace,
)
from mmsched.bench.workloads import Sample, audio_sample, image_sample, video_sample
from mmsched.testing import IterationRecorder
from own_run import segments_of

TP = 2
# (strategy, transport, payload store). Rank processes: every transport, every strategy and
# both stores at least once. In-process ranks: every strategy with every store (the logic).
PROCESSES = [
    ("per-rank", "torch", "inline"),
    ("entry-broadcast", "zmq", "inline"),
    ("tokenizer", "shm", "inline"),
    ("zero-copy", "torch", "shm"),
    ("zero-copy", "shm", "shm"),
]
IN_PROCESS = [
    (strategy, "memory", store)
    for strategy in ("per-rank", "entry-broadcast", "tokenizer")
    for store in ("inline", "shm")
]
COMBINATIONS = PROCESSES + IN_PROCESS
# Hashes each rank computes per request, by strategy: the instrumented proof of "hash once".
RANK_HASHES = {
    "per-rank": [1, 1],
    "entry-broadcast": [1, 0],
    "tokenizer": [0, 0],
    "zero-copy": [0, 0],
}

SAMPLES = {
    "image": image_sample(6, 8, seed=1),
    "video": video_sample(frames=4, grid_h=4, grid_w=6, seed=2),
    "audio": audio_sample(clips=2, seconds=0.5, seed=3),
}


# One pipeline per combination serves every test of this module that asks for it: starting
# rank processes is what costs, not the requests.
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(
    params=COMBINATIONS, ids=lambda c: "-".join(c), scope="module", loop_scope="module"
)
async def pipeline(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Pipeline]:
    strategy, transport, store = request.param
    config = Config(
        strategy=strategy,
        transport=transport,
        payload_store=store,
        tp_size=TP,
        hasher="sha256",
        shm_arena_mb=64,
    )
    recorder = IterationRecorder(tmp_path_factory.mktemp("iterations"))
    probe = RankTimings(digest_prefix="")
    async with Pipeline(config, on_iteration=recorder, probe=probe) as p:
        yield p


def reference(sample: Sample) -> MultimodalInputs:
    return MultimodalInputs.from_dict(sample.mm_inputs, hasher="sha256")


def assert_ranks_identical(trace: RequestTrace, expected: MultimodalInputs) -> None:
    assert sorted(r.rank for r in trace.reports) == list(range(TP))
    assert len({r.data["fingerprint"] for r in trace.reports}) == 1
    assert {r.data["content_digest"] for r in trace.reports} == {expected.content_digest()}


async def test_every_modality_reaches_every_rank_identical(pipeline: Pipeline) -> None:
    strategy = pipeline.config.strategy
    # Hash counters are per process: with ranks as tasks they are the tokenizer's too.
    count_hashes = not pipeline.in_process
    previous: dict[int, int] | None = None
    for name, sample in SAMPLES.items():
        expected = reference(sample)
        trace = await pipeline.generate_traced(name, sample.input_ids, sample.mm_inputs)
        assert_ranks_identical(trace, expected)
        # The stub model echoes what it was fed: media spans replaced by the pad values.
        assert trace.output.output_ids == expected.pad_input_ids(sample.input_ids)
        assert trace.output.pad_values == [i.pad_value for i in expected.mm_items]
        counts = {r.rank: r.data["hash_count"] for r in trace.reports}
        if previous is not None and count_hashes:
            per_rank = [counts[r] - previous[r] for r in range(TP)]
            assert per_rank == RANK_HASHES[strategy], f"{strategy} hashed {per_rank}"
        previous = counts

    recorder = pipeline.on_iteration
    assert isinstance(recorder, IterationRecorder)
    # Rank 0 answers once its own step is done; another rank's callback may still be running.
    for _ in range(100):
        # The pipeline is shared by this module's tests: only this test's requests count.
        seen = [[e for e in recorder.read(rank) if e["rid"] in SAMPLES] for rank in range(TP)]
        if all(len(s) == len(SAMPLES) for s in seen):
            break
        await asyncio.sleep(0.05)
    assert [e["rid"] for e in seen[0]] == list(SAMPLES)
    assert seen[0] == seen[1]  # same requests, same iterations, same bytes, on every rank
    assert {e["type"] for e in seen[0]} == {"MultimodalInputs"}


async def test_bad_request_fails_alone(pipeline: Pipeline) -> None:
    bad = image_sample(2, 2, seed=4)
    bad.mm_inputs["mm_items"][0]["offsets"] = [(3, 1)]
    good = SAMPLES["image"]
    results = await asyncio.gather(
        pipeline.generate("bad", bad.input_ids, bad.mm_inputs),
        pipeline.generate("good", good.input_ids, good.mm_inputs),
        return_exceptions=True,
    )
    assert isinstance(results[0], InvalidMultimodalInput)
    assert results[0].field == "mm_items[0].offsets[0]"
    assert "end 1 before start 3" in str(results[0])
    assert not isinstance(results[1], BaseException)
    # ... and the pipeline goes on serving.
    trace = await pipeline.generate_traced("next", good.input_ids, good.mm_inputs)
    assert_ranks_identical(trace, reference(good))


async def test_numpy_offsets_are_served_by_every_strategy(pipeline: Pipeline) -> None:
    # A processor's offsets taken from its numpy arrays are numpy ints: every strategy
    # serves them as the tokenizer's own validation does, whichever side validates.
    sample = image_sample(6, 8, seed=5)
    item = sample.mm_inputs["mm_items"][0]
    item["offsets"] = [(np.int64(s), np.int64(e)) for s, e in item["offsets"]]
    trace = await pipeline.generate_traced("numpy-offsets", sample.input_ids, sample.mm_inputs)
    assert_ranks_identical(trace, reference(sample))
    assert trace.output.output_ids == reference(sample).pad_input_ids(sample.input_ids)


async def test_text_only_request(pipeline: Pipeline) -> None:
    output = await pipeline.generate("text", [5, 6, 7])
    assert output.output_ids == [5, 6, 7] and output.pad_values == []


async def test_prebuilt_inputs_are_accepted() -> None:
    # A server that built the object itself (or an older sender) works under any strategy.
    sample = SAMPLES["image"]
    built = MultimodalInputs.from_dict(sample.mm_inputs, hasher="sha256")
    config = Config(strategy="per-rank", transport="memory", tp_size=TP, hasher="sha256")
    async with Pipeline(config, probe=RankTimings(digest_prefix="")) as pipeline:
        trace = await pipeline.generate_traced("pre", sample.input_ids, built)
    assert_ranks_identical(trace, built)


async def test_dead_rank_fails_requests_fast() -> None:
    # Over torch every send is a collective: the next request fails on the dead rank itself.
    config = Config(strategy="tokenizer", transport="torch", tp_size=TP, timeout_s=10)
    async with Pipeline(config) as pipeline:
        os.kill(pipeline.pids[1], signal.SIGKILL)
        sample = SAMPLES["image"]
        with pytest.raises(PeerLost, match="rank 1 exited"):
            await asyncio.wait_for(
                pipeline.generate("after-kill", sample.input_ids, sample.mm_inputs), timeout=20
            )


async def test_a_dead_rank_stops_the_pipeline_over_zmq_too() -> None:
    # zmq never blocks the entry rank: the watchdog notices the death (every 0.2 s), and
    # from then on the pipeline says it is not running and every request fails.
    config = Config(strategy="tokenizer", transport="zmq", tp_size=TP, timeout_s=10)
    async with Pipeline(config) as pipeline:
        assert pipeline.running
        os.kill(pipeline.pids[1], signal.SIGKILL)
        deadline = time.monotonic() + 5
        while pipeline.running and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not pipeline.running
        sample = SAMPLES["image"]
        with pytest.raises(PeerLost, match="rank 1 exited"):
            await asyncio.wait_for(
                pipeline.generate("after-kill", sample.input_ids, sample.mm_inputs), timeout=20
            )


async def test_zero_copy_moves_headers_only_and_leaks_nothing() -> None:
    config = Config(
        strategy="zero-copy",
        transport="shm",
        tp_size=TP,
        shm_arena_mb=64,
        timeout_s=15,
    )
    async with Pipeline(config, probe=RankTimings(digest_prefix="")) as pipeline:
        assert not segments_of([os.getpid()])  # names unlinked once every rank mapped them
        # A processor can write its output straight into shared memory: nothing is copied.
        sample = image_sample(6, 8, seed=5)
        feature = sample.mm_inputs["mm_items"][0]["feature"]
        in_arena = pipeline.allocate_tensor(feature.shape, feature.dtype)
        in_arena.copy_(feature)
        sample.mm_inputs["mm_items"][0]["feature"] = in_arena
        trace = await pipeline.generate_traced("in-arena", sample.input_ids, sample.mm_inputs)
        assert_ranks_identical(trace, MultimodalInputs.from_dict(sample.mm_inputs))
        # The ring reuses space in order: drop the processor output, as a server does once a
        # request is answered, or it pins everything written after it.
        del in_arena, sample, feature
        # Many requests, far more bytes than the 64 MiB arena: space is reclaimed as ranks
        # release their views.
        big = image_sample(2, 2000, seed=6)  # about 19 MB
        for i in range(12):
            await pipeline.generate(f"big-{i}", big.input_ids, big.mm_inputs)
    assert not segments_of([os.getpid()])


async def test_memory_transport_runs_ranks_as_tasks_of_this_process() -> None:
    sample = SAMPLES["image"]
    async with Pipeline(Config(transport="memory", tp_size=3, hasher="sha256")) as pipeline:
        assert pipeline.in_process and pipeline.pids == []
        output = await pipeline.generate("r", sample.input_ids, sample.mm_inputs)
        assert output.output_ids == reference(sample).pad_input_ids(sample.input_ids)


async def test_a_closure_callback_is_refused_only_where_ranks_are_processes() -> None:
    seen: list[int] = []

    def local_callback(rank: int, iteration: int, requests: list[object]) -> None:
        seen.extend([rank] * len(requests))

    async with Pipeline(Config(transport="memory", tp_size=2), on_iteration=local_callback) as p:
        await p.generate("r", [1, 2, 3])
    assert sorted(seen) == [0, 1]
    with pytest.raises(ConfigError, match="cannot be sent to the rank processes"):
        await Pipeline(Config(transport="zmq"), on_iteration=local_callback).start()


async def test_undecodable_request_is_answered_not_dropped() -> None:
    # An opaque object in a raw dict is pickled by the codec; the entry rank refuses to
    # unpickle (the safe default). The request must still get its error, alone.
    bad = image_sample(2, 2, seed=8)
    bad.mm_inputs["mm_items"][0]["feature"] = np.array([object()])
    good = SAMPLES["image"]
    config = Config(strategy="per-rank", tp_size=TP, timeout_s=20)
    async with Pipeline(config) as pipeline:
        with pytest.raises(RequestFailed, match="PickleRefused"):
            await asyncio.wait_for(pipeline.generate("bad", bad.input_ids, bad.mm_inputs), 20)
        output = await pipeline.generate("good", good.input_ids, good.mm_inputs)
        assert output.rid == "good"
