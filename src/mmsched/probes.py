"""Instrumentation, apart from production: what benchmarks and tests observe of the ranks.

A [`Probe`][mmsched.probes.Probe] is one object handed to
[`Pipeline`][mmsched.pipeline.Pipeline] (``probe=``). It travels to every rank with the
callback, and each rank calls it at two points:

- [`observe`][mmsched.probes.Probe.observe], once per request, as soon as the rank holds the
  request's inputs (or their error). Where the probe ``reports``, what it returns goes back
  to the tokenizer as a [`ProbeReport`][mmsched.messages.ProbeReport], and
  [`Pipeline.generate_traced`][mmsched.pipeline.Pipeline.generate_traced] returns every
  rank's with the output;
- [`model_step`][mmsched.probes.Probe.model_step], once per iteration that has requests,
  after the server's callback: where a benchmark puts the cost of a model's forward pass.

Without a probe nothing of this runs, no report travels, and no production message or
config field exists for it.

[`ModelStub`][mmsched.probes.ModelStub] stands in for a model's step (``mmsched bench
load``); [`RankTimings`][mmsched.probes.RankTimings] also reports when each rank was ready,
what it held and what it hashed (``mmsched bench fanout`` and the tests).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any, ClassVar

import blake3
import numpy as np
import torch

from mmsched.errors import ConfigError
from mmsched.hashing import hash_stats
from mmsched.inputs import MultimodalInputs
from mmsched.messages import ErrorOutput, TokenizedGenerateReqInput


class Probe:
    """Base class: observes nothing. Subclasses must be picklable (they reach the ranks)."""

    # Whether every rank reports every request, and a request's result waits for them all.
    reports: ClassVar[bool] = False

    async def observe(
        self,
        rank: int,
        iteration: int,
        req: TokenizedGenerateReqInput,
        inputs: MultimodalInputs | None,
        error: ErrorOutput | None,
    ) -> dict[str, Any] | None:
        """Rank side: what to report of ``req`` (JSON-able values), or ``None`` for nothing."""
        return None

    async def model_step(
        self, rank: int, iteration: int, requests: list[TokenizedGenerateReqInput]
    ) -> None:
        """Rank side, once per iteration that has requests, after the server's callback."""


class ModelStub(Probe):
    """A model step that costs ``step_ms`` of waiting per iteration with requests: a sleep,
    as a GPU forward pass leaves the CPU free."""

    def __init__(self, step_ms: float = 0.0) -> None:
        self.step_ms = step_ms

    async def model_step(
        self, rank: int, iteration: int, requests: list[TokenizedGenerateReqInput]
    ) -> None:
        if self.step_ms > 0:
            await asyncio.sleep(self.step_ms / 1000)

    def __reduce__(self) -> tuple[Any, ...]:
        return (ModelStub, (self.step_ms,))


CONSUME_MODES = ("none", "read", "cuda")
"""What a rank does with a request's features before it counts as ready: ``none`` (it holds
usable tensors), ``read`` (it reads every byte once, as a CPU consumer would), ``cuda`` (it
holds them on its GPU, their copy complete: the pipeline runs with ``device="cuda"``)."""


def read_pass(tensor: torch.Tensor) -> int:
    """Read every byte of ``tensor`` once: a sum over its bytes, eight at a time.

    On the calling thread, with numpy: each rank reads its own copy of the features at the
    same time as the others, and torch's thread team would keep spinning after each sum,
    taking cores from the other ranks.
    """
    data = tensor.detach().reshape(-1).view(torch.uint8).numpy()
    whole = data.size // 8 * 8
    words = data[:whole].view(np.uint64) if data.ctypes.data % 8 == 0 else data[:whole]
    return int(np.add.reduce(words, dtype=np.uint64)) + int(data[whole:].sum())


class RankTimings(ModelStub):
    """Every rank reports, per request: when it held usable inputs, what, and its hashing.

    Report keys: ``ready_at`` (``time.monotonic()``, a clock every process of a host
    shares, read after the rank consumed the features as ``consume`` says),
    ``fingerprint`` (of the inputs' hashes and layout), ``hash_count`` and
    ``hash_cpu_seconds`` (the rank process's running totals), ``error`` (the error's kind,
    if the request failed), and ``content_digest``, a digest of every byte held, for the
    requests whose id starts with ``digest_prefix`` (``None``: no request; ``""``: all).
    The model step costs ``step_ms``, as in [`ModelStub`][mmsched.probes.ModelStub].

    Raises:
        ConfigError: ``consume`` is not one of [`CONSUME_MODES`][mmsched.probes.CONSUME_MODES].
    """

    reports = True

    def __init__(
        self, digest_prefix: str | None = None, step_ms: float = 0.0, consume: str = "none"
    ) -> None:
        super().__init__(step_ms)
        if consume not in CONSUME_MODES:
            raise ConfigError(f"consume must be one of {', '.join(CONSUME_MODES)}, not {consume!r}")
        self.digest_prefix = digest_prefix
        self.consume = consume

    async def observe(
        self,
        rank: int,
        iteration: int,
        req: TokenizedGenerateReqInput,
        inputs: MultimodalInputs | None,
        error: ErrorOutput | None,
    ) -> dict[str, Any] | None:
        if inputs is not None and self.consume == "read":
            for item in inputs.mm_items:
                read_pass(item.feature)
        ready_at = time.monotonic()
        stats = hash_stats()
        held = repr(inputs.fingerprint()) if inputs is not None else repr(error and error.message)
        digest = None
        if (
            inputs is not None
            and self.digest_prefix is not None
            and req.rid.startswith(self.digest_prefix)
        ):
            digest = await asyncio.to_thread(inputs.content_digest)
        return {
            "iteration": iteration,
            "ready_at": ready_at,
            "fingerprint": blake3.blake3(held.encode()).hexdigest(length=16),
            "pid": os.getpid(),  # ranks that are tasks of one process share its counter
            "hash_count": stats.count,
            "hash_cpu_seconds": stats.cpu_seconds,
            "content_digest": digest,
            "error": error.kind if error is not None else None,
        }

    def __reduce__(self) -> tuple[Any, ...]:
        return (RankTimings, (self.digest_prefix, self.step_ms, self.consume))
