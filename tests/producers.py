"""Processor workers in their own processes (spawned by ``test_lending.py``)."""

from __future__ import annotations

import os
import time
from multiprocessing.queues import Queue
from typing import Any

import torch

from mmsched.stores.lending import ArenaAccess

ROWS = 600  # 600 x 1176 float32: 2.8 MB, one 30 x 20 patch grid


def expected_pixels(seed: int) -> torch.Tensor:
    return torch.arange(ROWS * 1176, dtype=torch.float32).reshape(ROWS, 1176) * 0.5 + seed


def write_one(access: ArenaAccess, seed: int, out: Queue[Any]) -> None:
    """Write one image's pixel values into the pipeline's arena and hand back its handle."""
    arena = access.connect()
    tensor, lent = arena.allocate((ROWS, 1176), torch.float32)
    tensor.copy_(expected_pixels(seed))
    out.put(lent)
    del tensor
    arena.close()


def lease_and_die(access: ArenaAccess, nbytes: int, out: Queue[Any]) -> None:
    """Take room in the arena, say so, and die without ever handing it over."""
    arena = access.connect()
    _, lent = arena.allocate((nbytes,), torch.uint8)
    out.put(lent)
    out.close()
    out.join_thread()  # the handle is on its way before the process vanishes
    os._exit(0)


def write_two_after_a_pause(access: ArenaAccess, pause_s: float, out: Queue[Any]) -> None:
    """Connect, wait ``pause_s`` (a worker waiting for work: the lender may close the idle
    connection meanwhile), then write two images and hand back both handles."""
    arena = access.connect()
    time.sleep(pause_s)
    lents = []
    for seed in (1, 2):
        tensor, lent = arena.allocate((ROWS, 1176), torch.float32)
        tensor.copy_(expected_pixels(seed))
        lents.append(lent)
        del tensor
    out.put(lents)
    arena.close()
