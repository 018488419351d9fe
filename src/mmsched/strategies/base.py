"""What a strategy is: where a request's inputs are materialized, tokenizer side and rank side.

A strategy is one class with both halves of its behaviour:

- [`prepare`][mmsched.strategies.base.Strategy.prepare] runs in a tokenizer worker thread
  before the request is encoded (build the typed inputs there, or leave the raw dict);
- [`resolve`][mmsched.strategies.base.Strategy.resolve] runs on every rank, in the same order
  on all of them, and returns the request's usable inputs or the error every rank agrees on.

Ranks offer a strategy what it may need through
[`RankServices`][mmsched.strategies.base.RankServices]: building inputs here, and one extra
message to (or from) the rest of the group.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Protocol

from mmsched.inputs import MultimodalInputs
from mmsched.messages import ErrorOutput, Message, TokenizedGenerateReqInput

Build = Callable[[TokenizedGenerateReqInput], MultimodalInputs | None]
"""Validate and hash a request's raw inputs with the pipeline's settings (raises if bad)."""


class RankServices(Protocol):
    """What a rank lends its strategy."""

    rank: int

    async def build(self, req: TokenizedGenerateReqInput) -> MultimodalInputs | None:
        """[`Build`][mmsched.strategies.base.Build] on this rank, off its event loop."""
        ...

    async def send_to_group(self, message: Message) -> None:
        """Entry rank: one message to every other rank, over the group's transport."""
        ...

    async def recv_from_group(self) -> Message:
        """Other ranks: the entry rank's next message."""
        ...


class Strategy:
    """Base class: the tokenizer leaves the raw dict; every rank builds what is not built."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    # Whether the tokenizer sends the built object rather than the processor's raw dict
    # (what a benchmark reports as the bytes one request puts on the wire).
    builds_in_tokenizer: ClassVar[bool] = False

    def prepare(self, req: TokenizedGenerateReqInput, build: Build) -> None:
        """Tokenizer side, in a worker thread, before the request is encoded."""

    async def resolve(
        self, req: TokenizedGenerateReqInput, rank: RankServices
    ) -> MultimodalInputs | ErrorOutput | None:
        """Rank side: this rank's usable inputs for ``req``, or its error (same on all)."""
        if not isinstance(req.mm_inputs, dict):  # built already, or text only
            return req.mm_inputs
        try:
            return await rank.build(req)
        except Exception as exc:  # this request's error, on every rank alike
            return ErrorOutput.from_exception(req.rid, exc)

    def __repr__(self) -> str:
        return f"<strategy {self.name}>"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), ())
