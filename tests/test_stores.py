"""The payload-store contract, run against every registered store and the toy one.

One scenario (``mmsched.testing.run_store_contract``): roundtrips of several dtypes and
shapes (empty and non-contiguous included) from a writer here to readers in processes of
their own where the store shares memory, forwarding, forged references, room accounting,
lending, and nothing left in /dev/shm after close. GPU stores run where torch sees a GPU
and are skipped, with the reason, elsewhere.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from mmsched.frames import tensor_from_frame
from mmsched.stores import STORES, PayloadRef, register_store, store_class, store_names
from mmsched.testing import run_store_contract
from toy_store import FileStore

_GPU = torch.cuda.is_available()


def test_every_store_is_covered() -> None:
    # A newly registered store joins the run below by being registered.
    assert {"inline", "shm", "pinned", "cuda-ipc"} <= set(store_names())


@pytest.mark.parametrize("name", store_names())
def test_store_contract(name: str) -> None:
    store = store_class(name)
    if store.device == "cuda" and not _GPU:
        pytest.skip(f"the {name!r} store keeps its bytes on a GPU and torch sees none")
    device = "cuda:0" if _GPU and name in ("cuda-ipc", "pinned") else "cpu"
    result = run_store_contract(name, device=device)
    assert result.failed == [], "\n".join(result.failed)
    assert result.passed  # it did check something
    if store.by_reference:
        assert any(p.startswith("reader 1 gets") for p in result.passed)
    if store.shares_across_processes:
        assert not any("other processes" in s for s in result.skipped)


@pytest.fixture
def toy_store() -> Iterator[str]:
    register_store("files", "toy_store:FileStore")  # the one line a new store takes
    yield "files"
    STORES.unregister("files")


def test_a_toy_store_passes_the_contract(toy_store: str) -> None:
    result = run_store_contract(toy_store)
    assert result.failed == [], "\n".join(result.failed)
    assert "no room: ArenaFull at once" in result.passed
    assert any(p.startswith("reader 1 gets") for p in result.passed)


class TrustingStore(FileStore):
    """The toy store with its checks taken out: it trusts every reference it is given."""

    name = "trusting"
    shares_across_processes = False  # its readers run here: the test stays quick

    def resolve(self, ref: PayloadRef) -> torch.Tensor:
        directory, file = ref.location
        data = (Path("/dev/shm") / str(directory) / str(file)).read_bytes()
        return tensor_from_frame(bytearray(data), ref.dtype, list(ref.shape))


def test_the_contract_fails_a_store_that_trusts_forged_references() -> None:
    STORES.register("trusting", TrustingStore)
    try:
        result = run_store_contract("trusting", readers=1)
    finally:
        STORES.unregister("trusting")
    failed = "\n".join(result.failed)
    assert "(a path out of the store) with a typed error: untyped" in failed
    assert "(another store's name) with a typed error: resolved" in failed
    assert "reader 0 gets float32 2-d back" in result.passed  # the rest still holds
