"""The feature cache: the tokenizer's mirror and every rank's cache stay equal, a repeated
feature crosses as a key of a few hundred bytes, eviction under pressure never serves wrong
bytes, and a rank that misses fails that request alone and the caches start over."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import random
from collections.abc import Iterator

import pytest
import torch

from mmsched import (
    Config,
    ConfigError,
    MultimodalInputs,
    Overloaded,
    Pipeline,
    RankTimings,
    RequestFailed,
)
from mmsched.bench.workloads import Sample, image_sample, ordinary_memory, restamped
from mmsched.cache import CacheMirror, CacheOps, FeatureCache
from mmsched.errors import ArenaFull
from mmsched.stores import STORES
from mmsched.stores.base import PayloadRef, Placement
from mmsched.stores.inline import InlineStore

HASHER = "blake3"


def built(sample: Sample) -> MultimodalInputs:
    return MultimodalInputs.from_dict(sample.mm_inputs, hasher=HASHER)


def images(n: int, rows: int = 40, first: int = 1) -> list[Sample]:
    """``n`` distinct images of ``2 x rows`` patches (about 0.19 MB per 20 rows)."""
    base = image_sample(2, rows, seed=rows)
    return [restamped(base, first + i, ordinary_memory) for i in range(n)]


def two_images(a: Sample, b: Sample) -> Sample:
    """One request carrying both images (b's token span after a's)."""
    first, second = a.mm_inputs["mm_items"][0], b.mm_inputs["mm_items"][0]
    start, end = first["offsets"][0]
    shift = len(a.input_ids)
    ids = a.input_ids + b.input_ids
    moved = {**second, "offsets": [(s + shift, e + shift) for s, e in second["offsets"]]}
    assert start < end
    return Sample(ids, {**a.mm_inputs, "mm_items": [first, moved]})


def test_the_mirror_and_a_rank_cache_hold_the_same_keys_in_the_same_order() -> None:
    rng = random.Random(7)
    pool = [built(s) for s in images(12, rows=rng.choice([20, 40, 60]))]
    sizes = {p.mm_items[0].nbytes for p in pool}
    capacity = 5 * max(sizes)
    mirror, rank = CacheMirror(capacity), FeatureCache(capacity)
    for _ in range(300):
        picked = rng.sample(pool, rng.choice([1, 2, 3]))
        request = MultimodalInputs([item for p in picked for item in p.mm_items], hasher=HASHER)
        sent, ticket = mirror.plan(request)
        mirror.sequencer.done(ticket)
        assert sent.cache is not None
        ops = CacheOps.from_tree(sent.cache, len(sent.mm_items))
        received = MultimodalInputs(list(sent.mm_items), hasher=HASHER, cache=sent.cache)
        inserts = rank.fetch(received, ops)
        rank.keep(received, inserts, ops)
        for got, want in zip(received.mm_items, request.mm_items, strict=True):
            assert torch.equal(got.feature, want.feature)
        assert rank.keys() == mirror.keys()
    stats = mirror.stats()
    assert stats.hits > 0 and stats.evictions > 0 and stats.bytes_held <= capacity


def test_a_feature_larger_than_the_cache_travels_every_time() -> None:
    big = built(images(1, rows=400)[0])
    mirror = CacheMirror(big.nbytes - 1)
    for _ in range(2):
        sent, ticket = mirror.plan(big)
        mirror.sequencer.done(ticket)
        assert sent.mm_items[0].feature.numel() > 0 and sent.cache == [0, []]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"hasher": "xxh3"}, "collision-resistant"),
        ({"strategy": "per-rank"}, "hashes in the tokenizer"),
        ({"feature_cache_mb": -1}, "must not be negative"),
    ],
)
def test_a_cache_needs_a_safe_key_and_a_tokenizer_that_hashes(
    values: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        Config.from_dict({"strategy": "tokenizer", "feature_cache_mb": 64, **values})


def test_malformed_cache_operations_are_a_codec_error() -> None:
    from mmsched import CodecError

    for tree in ([0, [["hit", 5, [1, "float32", [2]]]]], [0, [["drop", 1]]], ["x", []], 3):
        with pytest.raises(CodecError):
            CacheOps.from_tree(tree, 1)


async def test_a_repeated_image_crosses_as_a_key_and_every_rank_holds_its_bytes() -> None:
    # Inline: the first request's bytes then travel in its message, where they can be counted.
    config = Config(
        strategy="tokenizer",
        transport="memory",
        payload_store="inline",
        tp_size=2,
        feature_cache_mb=64,
    )
    sample = images(1, rows=400)[0]  # 3.8 MB
    async with Pipeline(config, probe=RankTimings(digest_prefix="")) as pipeline:
        sent = []
        for i in range(3):
            fresh = restamped(sample, 0, ordinary_memory)  # new memory, the same bytes
            before = pipeline.request_bytes_sent
            trace = await pipeline.generate_traced(f"r{i}", fresh.input_ids, fresh.mm_inputs)
            sent.append(pipeline.request_bytes_sent - before)
            assert {r.data["content_digest"] for r in trace.reports} == {
                built(fresh).content_digest()
            }
        ids_bytes = 8 * len(sample.input_ids)
        assert sent[0] > 3_000_000
        assert sent[1] - ids_bytes < 1024 and sent[2] - ids_bytes < 1024, sent
        stats = pipeline.cache_stats()
        assert stats is not None and stats.hits == 2 and stats.misses == 1


async def test_a_rank_that_misses_fails_that_request_and_the_caches_start_over() -> None:
    config = Config(strategy="tokenizer", transport="memory", tp_size=2, feature_cache_mb=64)
    sample = images(1)[0]
    async with Pipeline(config, probe=RankTimings(digest_prefix="")) as pipeline:
        await pipeline.generate("first", sample.input_ids, sample.mm_inputs)
        # A rank forgets (as a restarted one would): the ranks run as tasks of this process.
        caches = [o for o in gc.get_objects() if type(o) is FeatureCache]
        assert len(caches) == 2
        caches[1].clear()
        with pytest.raises(RequestFailed, match=r"CacheMiss|missed"):
            await pipeline.generate("missed", sample.input_ids, sample.mm_inputs)
        stats = pipeline.cache_stats()
        assert stats is not None and stats.resyncs == 1
        # The next request is planned in a new epoch: it sends the bytes, every rank keeps them.
        expected = built(sample).content_digest()
        for i in range(2):
            trace = await pipeline.generate_traced(f"after-{i}", sample.input_ids, sample.mm_inputs)
            assert {r.data["content_digest"] for r in trace.reports} == {expected}


class _FullOnTheLoop(Placement):
    """A placement that finds no room whenever it may not wait: the store as a request
    prepared on the event loop finds it while the ranks still hold the arena."""

    def wants(self, tensor: torch.Tensor) -> bool:
        return not self.wait or super().wants(tensor)

    def put(self, tensor: torch.Tensor) -> PayloadRef | None:
        if not self.wait:
            raise ArenaFull("no room on the loop (test)")
        return super().put(tensor)


class FullOnTheLoopStore(InlineStore):
    """The ``inline`` store, full for every placement that may not wait."""

    name = "full-on-the-loop"

    def placement(self, *, wait: bool = True) -> Placement:
        return _FullOnTheLoop(self, wait=wait)


@pytest.fixture
def full_on_the_loop() -> Iterator[str]:
    STORES.register(FullOnTheLoopStore.name, FullOnTheLoopStore)
    yield FullOnTheLoopStore.name
    STORES.unregister(FullOnTheLoopStore.name)


async def test_a_request_planned_on_the_loop_that_finds_no_room_keeps_the_caches(
    full_on_the_loop: str,
) -> None:
    """A small request is built and planned on the event loop; a store with no room for it
    there sends it to a worker thread, which waits for room. Its plan goes with it: the
    caches are not started over (before, every such request emptied every rank's cache)."""
    config = Config(
        strategy="tokenizer",
        transport="memory",
        payload_store=full_on_the_loop,
        tp_size=2,
        feature_cache_mb=64,
        hasher=HASHER,
    )
    first, second = images(2)  # 0.38 MB each: prepared on the loop when alone
    order = [first, second, first, first, second]
    async with Pipeline(config, probe=RankTimings(digest_prefix="")) as pipeline:
        for i, sample in enumerate(order):
            trace = await pipeline.generate_traced(f"r{i}", sample.input_ids, sample.mm_inputs)
            expected = built(sample).content_digest()
            assert {r.data["content_digest"] for r in trace.reports} == {expected}
        stats = pipeline.cache_stats()
        assert stats is not None
        assert (stats.resyncs, stats.hits, stats.misses) == (0, 3, 2), stats


async def test_a_request_planned_on_the_loop_with_no_room_and_reject_fails_alone(
    full_on_the_loop: str,
) -> None:
    """Under ``backpressure="reject"`` the request fails with ``Overloaded`` at once, its
    turn is given up (the caches start over, since the ranks never see its plan), and the
    next request is not held behind it."""
    config = Config(
        strategy="tokenizer",
        transport="memory",
        payload_store=full_on_the_loop,
        tp_size=2,
        feature_cache_mb=64,
        hasher=HASHER,
        backpressure="reject",
    )
    (small,) = images(1)
    async with Pipeline(config) as pipeline:
        for i in range(2):
            with pytest.raises(Overloaded):
                await asyncio.wait_for(
                    pipeline.generate(f"r{i}", small.input_ids, small.mm_inputs), 10
                )
        stats = pipeline.cache_stats()
        assert stats is not None and stats.resyncs == 2, stats


@pytest.mark.parametrize("store", ["inline", "shm"])
async def test_eviction_under_pressure_never_serves_wrong_bytes(store: str) -> None:
    """Rank processes, concurrent requests, a cache that holds about four of ten images and
    an arena of 8 MB (with shm, a cached feature must not pin its ring): every rank's bytes
    are the tokenizer's, for every request."""
    config = Config(
        strategy="tokenizer",
        transport="zmq",
        payload_store=store,
        tp_size=2,
        feature_cache_mb=4,
        shm_arena_mb=8,
        max_inflight_mb=None,
        hasher=HASHER,
    )
    pool = images(10, rows=100)  # 0.94 MB each
    pairs = [two_images(pool[i], pool[(i + 3) % 10]) for i in range(10)]
    everything = pool + pairs
    digests = [built(s).content_digest() for s in everything]
    rng = random.Random(3)
    async with Pipeline(config, probe=RankTimings(digest_prefix="")) as pipeline:
        for burst in range(4):
            picks = [rng.randrange(len(everything)) for _ in range(30)]
            traces = await asyncio.gather(
                *(
                    pipeline.generate_traced(
                        f"b{burst}-{i}", everything[k].input_ids, everything[k].mm_inputs
                    )
                    for i, k in enumerate(picks)
                )
            )
            for trace, k in zip(traces, picks, strict=True):
                assert {r.data["content_digest"] for r in trace.reports} == {digests[k]}
        stats = pipeline.cache_stats()
        assert stats is not None and stats.hits > 20 and stats.evictions > 10, stats
        assert stats.resyncs == 0


async def test_the_sequencer_sends_in_plan_order_and_skips_a_ticket_that_never_comes() -> None:
    from mmsched.cache import Sequencer

    sequencer = Sequencer()
    tickets = [sequencer.take() for _ in range(4)]
    sent: list[int] = []

    async def send(ticket: int, delay: float) -> None:
        await asyncio.sleep(delay)
        assert await sequencer.wait_turn(ticket, 5.0)
        sent.append(ticket)
        sequencer.done(ticket)

    # Prepared in reverse order, sent in plan order.
    await asyncio.gather(*(send(t, 0.01 * (4 - t)) for t in tickets))
    assert sent == tickets
    lost, late = sequencer.take(), sequencer.take()
    assert lost < late
    assert not await sequencer.wait_turn(late, 0.05)  # the earlier one never went out
    sequencer.done(late)
    assert await sequencer.wait_turn(sequencer.take(), 0.05)


def test_the_same_image_twice_in_one_new_request_travels_twice_and_then_hits() -> None:
    sample = built(images(1)[0])
    twice = MultimodalInputs(sample.mm_items * 2, hasher=HASHER)
    capacity = 10 * sample.nbytes
    mirror, rank = CacheMirror(capacity), FeatureCache(capacity)
    for round_ in range(2):
        sent, ticket = mirror.plan(twice)
        mirror.sequencer.done(ticket)
        assert sent.cache is not None
        travelled = [item.feature.numel() > 0 for item in sent.mm_items]
        assert travelled == ([True, True] if round_ == 0 else [False, False])
        ops = CacheOps.from_tree(sent.cache, 2)
        received = MultimodalInputs(
            [dataclasses.replace(item) for item in sent.mm_items], hasher=HASHER
        )  # what a rank decodes: its own objects
        inserts = rank.fetch(received, ops)  # no miss: nothing hits what this request inserts
        rank.keep(received, inserts, ops)
        for item in received.mm_items:
            assert torch.equal(item.feature, sample.mm_items[0].feature)
