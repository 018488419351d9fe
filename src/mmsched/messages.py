"""Typed messages of the tokenizer -> scheduler pipeline.

Every message is a dataclass with a ``KIND`` tag; [`mmsched.codec`][] encodes the tagged
union [`Message`][] and decodes it back to the same class. Names follow SGLang's
``io_struct.py`` where a counterpart exists, so that a server's code reads the same.

Direction of travel:

- tokenizer -> entry rank: [`TokenizedGenerateReqInput`][], [`AbortReq`][],
  [`Shutdown`][]
- entry rank -> every rank, once per scheduler iteration: [`Batch`][]
- entry rank -> every rank, once per request (``entry-broadcast`` strategy only):
  [`MaterializedInputs`][]
- ranks -> tokenizer: [`GenerateOutput`][], [`ErrorOutput`][], [`RankProgress`][],
  [`RankReady`][], and [`ProbeReport`][] only where a [probe][mmsched.probes] is plugged in
- each other host's agent -> tokenizer: [`NodeStatus`][] (heartbeats)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from mmsched.errors import InvalidMultimodalInput
from mmsched.inputs import MultimodalInputs


@dataclass(eq=False)
class TokenizedGenerateReqInput:
    """One generate request after tokenization.

    ``mm_inputs`` is a [`MultimodalInputs`][] when the tokenizer materialized it (the
    ``tokenizer`` strategy), the processor's raw dict when the scheduler ranks must
    (``per-rank``, ``entry-broadcast``), or ``None`` for text only. Ranks accept both forms,
    which keeps old senders working.
    """

    KIND: ClassVar[str] = "generate"
    rid: str
    input_ids: list[int]
    sampling_params: dict[str, Any] = field(default_factory=dict)
    mm_inputs: MultimodalInputs | dict[str, Any] | None = None


@dataclass(eq=False)
class AbortReq:
    """Asks the entry rank to drop request ``rid`` if it has not run yet."""

    KIND: ClassVar[str] = "abort"
    rid: str


@dataclass(eq=False)
class Shutdown:
    """Asks the ranks to finish the current iteration and exit."""

    KIND: ClassVar[str] = "shutdown"


@dataclass(eq=False)
class Batch:
    """What the entry rank announces each scheduler iteration: all ranks then run it."""

    KIND: ClassVar[str] = "batch"
    iteration: int
    requests: list[TokenizedGenerateReqInput] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    shutdown: bool = False


@dataclass(eq=False)
class MaterializedInputs:
    """One request's inputs as the entry rank built them, or the error that stopped it."""

    KIND: ClassVar[str] = "materialized"
    rid: str
    mm_inputs: MultimodalInputs | None = None
    error: ErrorOutput | None = None


@dataclass(eq=False)
class GenerateOutput:
    """A request's result (what the rank callback returned), sent by the entry rank.

    A streamed result comes as several: each holds the ids generated since the one before,
    and only the last has ``finished`` set (with the finish reason and the pad values).
    ``Pipeline.generate`` returns one with every id.
    """

    KIND: ClassVar[str] = "output"
    rid: str
    output_ids: list[int]
    finish_reason: str = "stop"
    # Pad values of the request's media, so a caller can check which media the model saw.
    pad_values: list[int] = field(default_factory=list)
    # The scheduler iteration that ran it (for backpressure, see RankProgress).
    iteration: int = -1
    # False for a streamed chunk that more will follow.
    finished: bool = True


ABORTED = "Aborted"
"""``ErrorOutput.kind`` of the entry rank's receipt for a request it dropped on an abort."""


@dataclass(eq=False)
class ErrorOutput:
    """A request that failed; it fails alone, the pipeline goes on."""

    KIND: ClassVar[str] = "error"
    rid: str
    kind: str
    message: str
    field: str | None = None
    # The scheduler iteration whose batch held the request (-1: it never entered one).
    iteration: int = -1

    @classmethod
    def from_exception(cls, rid: str, exc: BaseException) -> ErrorOutput:
        """``rid`` failing with ``exc``, naming the offending field where it is known."""
        if isinstance(exc, InvalidMultimodalInput):
            return cls(rid=rid, kind=type(exc).__name__, message=exc.problem, field=exc.field)
        return cls(rid=rid, kind=type(exc).__name__, message=str(exc))


@dataclass(eq=False)
class ProbeReport:
    """What a rank's [probe][mmsched.probes] observed of one request (benchmarks, tests).

    Sent only where a probe is plugged in; ``data`` is the probe's own (JSON-able values).
    """

    KIND: ClassVar[str] = "probe_report"
    rid: str
    rank: int
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(eq=False)
class RankProgress:
    """A rank finished ``iteration``. Sent once per non-empty iteration by every rank.

    The entry rank answers before the others finish; the tokenizer keeps a request's bytes
    counted as in flight until every rank has passed its iteration, so one slow rank holds
    back new requests instead of letting its queue grow.
    """

    KIND: ClassVar[str] = "rank_progress"
    rank: int
    iteration: int


@dataclass(eq=False)
class RankReady:
    """Sent by each rank once it has joined the group (and mapped the arena, if any)."""

    KIND: ClassVar[str] = "rank_ready"
    rank: int
    pid: int


@dataclass(eq=False)
class CacheMissed:
    """A rank did not hold a feature the tokenizer's cache mirror said it holds: the
    tokenizer fails the request and starts the caches over (see [`mmsched.cache`][])."""

    KIND: ClassVar[str] = "cache_missed"
    rid: str
    rank: int


@dataclass(eq=False)
class NodeStatus:
    """A host's agent to the tokenizer, every heartbeat period (see [`mmsched.node`][]).

    ``bytes_received`` counts what crossed the link from node 0 so far (the cross-host
    transport's statistics); ``failed`` says why the host stops serving (a rank died there),
    after which it sends nothing more. Heartbeats start right after the agent's hello (they
    keep its claim on the node's slot alive); ``ready`` says its ranks are started, which
    completes its join.
    """

    KIND: ClassVar[str] = "node_status"
    node: int
    pid: int
    bytes_received: int = 0
    messages_received: int = 0
    failed: str | None = None
    ready: bool = False


Message = (
    TokenizedGenerateReqInput
    | AbortReq
    | Shutdown
    | Batch
    | MaterializedInputs
    | GenerateOutput
    | ErrorOutput
    | RankProgress
    | ProbeReport
    | RankReady
    | CacheMissed
    | NodeStatus
)

MESSAGE_TYPES: tuple[type[Any], ...] = (
    TokenizedGenerateReqInput,
    AbortReq,
    Shutdown,
    Batch,
    MaterializedInputs,
    GenerateOutput,
    ErrorOutput,
    RankProgress,
    ProbeReport,
    RankReady,
    CacheMissed,
    NodeStatus,
)
