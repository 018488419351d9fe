"""Per-rank set-up hooks for the pipeline tests: module-level, so spawned ranks import them.

``load_model`` stands in for a server's model load: it keeps its "model" in a module-level
variable of the rank process, where ``use_model`` (the iteration callback) finds it, and
leaves a record in the directory named by ``RANK_HOOKS_TEST_DIR``.
"""

from __future__ import annotations

import os
from pathlib import Path

import orjson
import torch

from mmsched import TokenizedGenerateReqInput

MODEL: dict[str, object] | None = None


def load_model(rank: int, device: torch.device) -> None:
    global MODEL
    MODEL = {"rank": rank, "device": str(device), "pid": os.getpid()}
    out = Path(os.environ["RANK_HOOKS_TEST_DIR"]) / f"rank{rank}.json"
    out.write_bytes(orjson.dumps(MODEL))


def use_model(rank: int, iteration: int, requests: list[TokenizedGenerateReqInput]) -> None:
    if MODEL is None or MODEL["rank"] != rank:
        raise RuntimeError(f"rank {rank} runs an iteration without its model")


def fail_on_rank_1(rank: int, device: torch.device) -> None:
    if rank == 1:
        raise RuntimeError("weights not found")
