"""What a rank's model step returns for each request, checked, and sent back as results.

The rank callback (``on_iteration(rank, iteration, requests)``) is the model. What it
returns is each request's answer:

```text
callback returns           None                      ->  every request answered as the stub
                           {rid: output, ...}        ->  one answer per rid
output                     [ids...] / ModelOutput    ->  one GenerateOutput (finished)
                           (async) iterator of       ->  one GenerateOutput per chunk
                           [ids...] / ModelOutput        (finished=False), then a last one
                                                         (finished=True)
```

Every rank runs its callback (a tensor-parallel model computes on all of them, in
lockstep), and every rank steps the streams it returned, one chunk of each per scheduler
iteration, as a decode step of every running request: a stream never holds up the requests
behind it, and an aborted one is closed (``aclose``) on every rank in the same iteration.
Only the entry rank's outputs travel back: the same rule as SGLang's, whose TP rank 0 alone
talks to the detokenizer. A request the callback gave no output for, or whose output is not
a list of ints, fails alone with a [`ModelOutputError`][mmsched.errors.ModelOutputError]; an
exception raised while one request's stream is read fails that request alone.

[`stub_model`][mmsched.outputs.stub_model] is the default callback: it answers with the ids
the model step was fed, each media span replaced by its pad value, so callers can check
what reached the ranks end to end. A callback that returns ``None`` (one that only
observes) keeps that answer.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

from mmsched.errors import ModelOutputError
from mmsched.inputs import MultimodalInputs
from mmsched.messages import TokenizedGenerateReqInput

FINISH_REASONS = ("stop", "length")
"""Finish reasons a model may give (OpenAI's): it stopped by itself, or hit its limit."""


@dataclass
class ModelOutput:
    """One request's generated ids (or one streamed chunk of them) and why it finished."""

    output_ids: list[int]
    finish_reason: str = "stop"


Chunk: TypeAlias = ModelOutput | Sequence[int]
RequestOutput: TypeAlias = Chunk | Iterator[Chunk] | AsyncIterator[Chunk]
"""A request's output: its ids whole, or a stream of chunks of them (a generator)."""

IterationOutputs: TypeAlias = Mapping[str, RequestOutput]
"""What a callback returns: each request's output by its ``rid``."""

IterationCallback: TypeAlias = Callable[
    [int, int, list[TokenizedGenerateReqInput]],
    Awaitable[IterationOutputs | None] | IterationOutputs | None,
]
"""``callback(rank, iteration, requests)``: requests hold built [`MultimodalInputs`][];
returns each request's output by rid, or ``None`` for the stub's answer (module docstring)."""


def stub_model(
    rank: int, iteration: int, requests: list[TokenizedGenerateReqInput]
) -> dict[str, RequestOutput]:
    """The default model: each request "generates" the ids it was fed, media spans replaced
    by their pad values (what a real model step consumes)."""
    outputs: dict[str, RequestOutput] = {}
    for req in requests:
        mm = req.mm_inputs
        ids = mm.pad_input_ids(req.input_ids) if isinstance(mm, MultimodalInputs) else req.input_ids
        outputs[req.rid] = ModelOutput(list(ids))
    return outputs


async def run_callback(
    callback: IterationCallback | None,
    rank: int,
    iteration: int,
    requests: list[TokenizedGenerateReqInput],
) -> Mapping[str, Any]:
    """Call the model step (the stub where there is none) and return its outputs by rid.

    Raises:
        ModelOutputError: the callback returned something other than a mapping or ``None``
            (a bug of the model's: every request of the iteration fails).
    """
    result: Any = (callback or stub_model)(rank, iteration, requests)
    if inspect.isawaitable(result):
        result = await result
    if result is None:
        return stub_model(rank, iteration, requests)
    if not isinstance(result, Mapping):
        raise ModelOutputError(
            f"the rank callback returned a {type(result).__name__}; expected a dict of "
            "outputs by request id, or None"
        )
    return result


def checked_output(rid: str, output: Any) -> ModelOutput | AsyncIterator[ModelOutput]:
    """``output`` checked: whole, or as a stream of checked chunks (a sync or async
    generator is read as the caller iterates).

    Raises:
        ModelOutputError: no output for ``rid``, or ids that are not a list of ints (a
            stream raises it, or whatever the model's generator raises, as it is read).
    """
    if output is None:
        raise ModelOutputError(f"the model returned no output for request {rid!r}")
    whole = isinstance(output, ModelOutput | Sequence) or hasattr(output, "tolist")
    if whole and not isinstance(output, str | bytes):
        return _checked(rid, output)
    if isinstance(output, AsyncIterator | Iterator):
        return _stream(rid, output)
    raise ModelOutputError(
        f"the model's output for request {rid!r} is a {type(output).__name__}; expected a "
        "list of ids, a ModelOutput or a generator of them"
    )


async def _stream(
    rid: str, output: AsyncIterator[Any] | Iterator[Any]
) -> AsyncIterator[ModelOutput]:
    if isinstance(output, AsyncIterator):
        async for chunk in output:
            yield _checked(rid, chunk)
    else:
        for chunk in output:
            yield _checked(rid, chunk)


def _checked(rid: str, chunk: Any) -> ModelOutput:
    if isinstance(chunk, ModelOutput):
        ids, finish = chunk.output_ids, chunk.finish_reason
    else:
        ids, finish = chunk, "stop"
    if hasattr(ids, "tolist"):  # a tensor or an array of ids
        ids = ids.tolist()
    if isinstance(ids, str | bytes) or not isinstance(ids, Sequence):
        raise ModelOutputError(f"request {rid!r}: output ids must be a list of ints")
    checked = list(ids)
    if not all(type(i) is int for i in checked):
        raise ModelOutputError(f"request {rid!r}: output ids must be a list of ints")
    if finish not in FINISH_REASONS:
        raise ModelOutputError(
            f"request {rid!r}: finish_reason {finish!r} is not one of {', '.join(FINISH_REASONS)}"
        )
    return ModelOutput(checked, finish)
