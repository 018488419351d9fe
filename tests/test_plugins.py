"""A new payload store and a new strategy are one file each plus one registry line."""

from __future__ import annotations

import pytest

from mmsched import Config, MultimodalInputs, Pipeline, RankTimings, RequestFailed
from mmsched.bench.workloads import image_sample
from mmsched.stores import _REGISTRY as STORES
from mmsched.stores import register_store
from mmsched.strategies import _REGISTRY as STRATEGIES
from mmsched.strategies import register_strategy
from toy_plugins import ShelfStore


@pytest.fixture
def toys() -> object:
    register_store("shelf", "toy_plugins:ShelfStore")
    register_strategy("verify", "toy_plugins:VerifyingStrategy")
    yield
    STORES.pop("shelf")
    STRATEGIES.pop("verify")


async def test_a_toy_store_and_strategy_run_a_pipeline(toys: object) -> None:
    config = Config(
        transport="memory", payload_store="shelf", strategy="verify", tp_size=3, hasher="sha256"
    )
    sample = image_sample(4, 8, seed=11)  # 75 kB of pixel values: goes through the store
    expected = MultimodalInputs.from_dict(sample.mm_inputs, hasher="sha256")
    puts, resolves = ShelfStore.puts, ShelfStore.resolves
    async with Pipeline(config, probe=RankTimings(digest_prefix="")) as pipeline:
        trace = await pipeline.generate_traced("r", sample.input_ids, sample.mm_inputs)
    assert {r.data["content_digest"] for r in trace.reports} == {expected.content_digest()}
    assert trace.output.pad_values == [i.pad_value for i in expected.mm_items]
    # Put once by the tokenizer (the entry rank forwards the same reference); resolved by
    # every rank.
    assert (ShelfStore.puts - puts, ShelfStore.resolves - resolves) == (1, 3)


async def test_the_toy_strategy_refuses_bytes_that_do_not_match_their_hash(
    toys: object,
) -> None:
    config = Config(transport="memory", payload_store="shelf", strategy="verify", tp_size=2)
    sample = image_sample(4, 8, seed=12)
    built = MultimodalInputs.from_dict(sample.mm_inputs)
    built.mm_items[0].feature.add_(1.0)  # changed after hashing
    async with Pipeline(config) as pipeline:
        with pytest.raises(RequestFailed, match="ContentMismatch"):
            await pipeline.generate("r", sample.input_ids, built)
        output = await pipeline.generate("next", sample.input_ids, sample.mm_inputs)
        assert output.rid == "next"


def test_a_store_whose_references_stay_in_its_process_refuses_ranks_in_processes(
    toys: object,
) -> None:
    from mmsched import ConfigError

    assert not ShelfStore.shares_across_processes
    with pytest.raises(ConfigError, match="use the memory transport"):
        Config(transport="zmq", payload_store="shelf", tp_size=2)
