"""Instrumentation, apart from production: what benchmarks and tests observe of the ranks.

A [`Probe`][mmsched.probes.Probe] is one object handed to
[`Pipeline`][mmsched.pipeline.Pipeline] (``probe=``). It travels to every rank with the
callback, and each rank calls [`observe`][mmsched.probes.Probe.observe] once per request, as
soon as it holds the request's inputs (or their error). What ``observe`` returns goes back to
the tokenizer as a [`ProbeReport`][mmsched.messages.ProbeReport], and
[`Pipeline.generate_traced`][mmsched.pipeline.Pipeline.generate_traced] returns every rank's
with the output. Without a probe nothing of this runs, no report travels, and no production
message carries a field for it.

[`RankTimings`][mmsched.probes.RankTimings] is the probe of ``mmsched bench`` and the tests:
when each rank was ready, what it held, what it hashed.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import blake3

from mmsched.hashing import hash_stats
from mmsched.inputs import MultimodalInputs
from mmsched.messages import ErrorOutput, TokenizedGenerateReqInput


class Probe:
    """Base class: observes nothing. Subclasses must be picklable (they reach the ranks)."""

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


class RankTimings(Probe):
    """Every rank reports, per request: when it held usable inputs, what, and its hashing.

    Report keys: ``ready_at`` (``time.monotonic()``, a clock every process of a host
    shares), ``fingerprint`` (of the inputs' hashes and layout), ``hash_count`` and
    ``hash_cpu_seconds`` (the rank process's running totals), ``error`` (the error's kind,
    if the request failed), and ``content_digest``, a digest of every byte held, for the
    requests whose id starts with ``digest_prefix`` (``None``: no request; ``""``: all).
    """

    def __init__(self, digest_prefix: str | None = None) -> None:
        self.digest_prefix = digest_prefix

    async def observe(
        self,
        rank: int,
        iteration: int,
        req: TokenizedGenerateReqInput,
        inputs: MultimodalInputs | None,
        error: ErrorOutput | None,
    ) -> dict[str, Any] | None:
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
            "hash_count": stats.count,
            "hash_cpu_seconds": stats.cpu_seconds,
            "content_digest": digest,
            "error": error.kind if error is not None else None,
        }

    def __reduce__(self) -> tuple[Any, ...]:
        return (RankTimings, (self.digest_prefix,))
