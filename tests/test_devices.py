"""Which device each rank uses, checked where no GPU is needed: the setting's form, per-rank
lists, a GPU store without a GPU device, and a rank asking for a GPU it cannot see."""

from __future__ import annotations

import pytest
import torch

from mmsched import Config, ConfigError, MultimodalInputs
from mmsched.bench.workloads import image_sample
from mmsched.devices import DevicePlacer, check_device_setting, rank_device


@pytest.mark.parametrize("setting", ["cpu", "cuda", "cuda:0", "cuda:1,cuda:0", "cuda:0, cpu"])
def test_accepted_device_settings(setting: str) -> None:
    check_device_setting(setting, 2)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("gpu", "device must be"),
        ("cuda:x", "device must be"),
        ("cuda:0,cuda:1,cuda:2", "3 devices for 2 ranks"),
        ("", "device must be"),
    ],
)
def test_refused_device_settings(setting: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Config(tp_size=2, device=setting)


def test_each_rank_takes_its_entry_of_a_list() -> None:
    assert rank_device("cpu", 3) == torch.device("cpu")
    assert rank_device("cpu,cpu", 1) == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_rank_that_cannot_see_a_gpu_says_so() -> None:
    with pytest.raises(ConfigError, match="sees none"):
        rank_device("cuda", 0)


def test_a_gpu_store_needs_a_gpu_device() -> None:
    with pytest.raises(ConfigError, match="delivers on a GPU"):
        Config(payload_store="cuda-ipc")
    Config(payload_store="pinned")  # a host arena: ranks on the CPU just map it


async def test_a_cpu_rank_moves_nothing() -> None:
    inputs = MultimodalInputs.from_dict(image_sample(2, 4).mm_inputs)
    feature = inputs.mm_items[0].feature
    placed = await DevicePlacer(torch.device("cpu")).place(inputs)
    assert placed.mm_items[0].feature is feature
