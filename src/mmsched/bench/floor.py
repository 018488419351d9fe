"""The physical floor of a fan-out on this machine: one copy of the payload plus one hash.

Any design must at least hash the bytes once and put them once where every rank can read
them. The copy goes into a buffer whose pages are already faulted in, as an arena's are.
"""

from __future__ import annotations

import statistics
import time

import torch

from mmsched.hashing import get_hasher


def floor_ms(payload: torch.Tensor, hasher: str, *, repeats: int = 9) -> float:
    """Median milliseconds of one copy of ``payload`` plus median ms of one ``hasher`` hash.

    Each is timed on its own: run back to back, the copy's worker threads (still spinning
    after the copy) slow the hash's, which would make the floor look higher than it is.
    """
    flat = payload.reshape(-1).view(torch.uint8)
    target = torch.empty_like(flat)
    target.fill_(0)  # fault the pages in once, as the arena does at start
    hash_fn = get_hasher(hasher)
    copies, hashes = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        target.copy_(flat)
        copies.append(time.perf_counter() - start)
    for _ in range(repeats):
        start = time.perf_counter()
        hash_fn.hash_tensor("image", payload)
        hashes.append(time.perf_counter() - start)
    return (statistics.median(copies) + statistics.median(hashes)) * 1000
