"""A new payload store and a new strategy are one file each plus one registry line."""

from __future__ import annotations

import pytest

from mmsched import Config, MultimodalInputs, Pipeline, RankTimings, RequestFailed
from mmsched.bench.workloads import image_sample
from mmsched.stores import STORES, register_store
from mmsched.strategies import STRATEGIES, register_strategy
from toy_plugins import ShelfStore


@pytest.fixture
def toys() -> object:
    register_store("shelf", "toy_plugins:ShelfStore")
    register_strategy("verify", "toy_plugins:VerifyingStrategy")
    yield
    STORES.unregister("shelf")
    STRATEGIES.unregister("verify")


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


def test_one_registry_class_serves_strategies_stores_and_transports() -> None:
    from mmsched import UnknownNameError
    from mmsched.registry import Registry
    from mmsched.stores import PayloadStore
    from mmsched.transports import TRANSPORTS

    for registry in (STORES, STRATEGIES, TRANSPORTS):
        assert isinstance(registry, Registry)
        with pytest.raises(UnknownNameError) as raised:
            registry.get("no-such-name")
        for known in registry.names():  # the error lists every known name
            assert known in str(raised.value)
    assert STORES.target("shm") == "mmsched.stores.shm:ShmStore"
    # A name registered to a class of another kind is refused by name, not used.
    STORES.register("not-a-store", "mmsched.transports.memory:MemoryTransport")
    try:
        assert "not-a-store" in STORES.names()
        with pytest.raises(UnknownNameError):
            STORES.get("not-a-store")
    finally:
        STORES.unregister("not-a-store")
    assert "not-a-store" not in STORES
    assert issubclass(STORES.get("inline"), PayloadStore)


def test_an_installed_package_registers_a_store_by_entry_point(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pathlib import Path

    from mmsched.registry import Registry
    from mmsched.stores import PayloadStore

    # What pip install of a package declaring the entry point leaves on sys.path.
    dist = Path(str(tmp_path)) / "mmsched_shelf-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mmsched-shelf\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[mmsched.stores]\nshelf = toy_plugins:ShelfStore\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    stores: Registry[PayloadStore] = Registry(
        "payload store",
        PayloadStore,
        {"inline": "mmsched.stores.inline:InlineStore"},
        entry_points="mmsched.stores",
    )
    assert stores.names() == ["inline", "shelf"]
    assert stores.get("shelf") is ShelfStore
