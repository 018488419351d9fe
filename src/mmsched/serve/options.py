"""A chat request's fields other than ``messages``: what the server honours, and what it refuses.

The server answers with one choice generated deterministically, so an OpenAI field is one of:

- honoured: ``model``, ``messages``, ``stream``, ``stream_options`` (``include_usage``),
  ``max_tokens`` and ``max_completion_tokens`` (the newer name of the same cap), ``n`` (1);
- accepted because it asks for nothing the server does not do: bookkeeping that does not
  change the answer (``user``, ``safety_identifier``, ``prompt_cache_key``, ``metadata``,
  ``seed``: a deterministic answer is the same for every seed), or a value that describes
  what the server does anyway (``temperature: 0``, ``top_p: 1``, no penalties, no
  log-probabilities, ``store: false``, ``tool_choice: "none"``...), as
  [`ACCEPTED`][mmsched.serve.options.ACCEPTED] lists them;
- refused with a 400 naming it (``param``): any other value of those, and every other field
  (``tools``, ``audio``, ``response_format`` other than text, ``n`` above 1, names OpenAI
  does not know...). Silently ignoring one would answer another question than was asked.

``null`` is "not given" for every field, as in OpenAI's API: the official ``openai`` client
sends only the fields its caller passed.

``max_tokens`` and ``max_completion_tokens`` may both be given (clients in transition send
both): the smaller one is the cap, so no cap the client asked for is exceeded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mmsched.serve.media import BadRequest

HONOURED = frozenset(
    {"model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "n"}
)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


ACCEPTED: dict[str, tuple[str, Callable[[Any], bool]]] = {
    # Bookkeeping: the answer does not depend on it.
    "user": ("a string", lambda v: isinstance(v, str)),
    "safety_identifier": ("a string", lambda v: isinstance(v, str)),
    "prompt_cache_key": ("a string", lambda v: isinstance(v, str)),
    "metadata": ("an object", lambda v: isinstance(v, dict)),
    "seed": ("an integer (the answer is deterministic)", _is_int),
    "service_tier": ('"auto" or "default"', lambda v: v in ("auto", "default")),
    "parallel_tool_calls": ("true or false (no tools are served)", lambda v: isinstance(v, bool)),
    # Values that describe what the server does: greedy, unpenalised, text only.
    "temperature": ("0 (the answer is deterministic)", lambda v: _is_number(v) and v == 0),
    "top_p": ("1", lambda v: _is_number(v) and v == 1),
    "frequency_penalty": ("0", lambda v: _is_number(v) and v == 0),
    "presence_penalty": ("0", lambda v: _is_number(v) and v == 0),
    "logit_bias": ("{} (no bias)", lambda v: v == {}),
    "logprobs": ("false", lambda v: v is False),
    "top_logprobs": ("0", lambda v: _is_int(v) and v == 0),
    "stop": ("[] (no stop sequences)", lambda v: v == []),
    "store": ("false", lambda v: v is False),
    "tool_choice": ('"none" (no tools are served)', lambda v: v == "none"),
    "response_format": ('{"type": "text"}', lambda v: v == {"type": "text"}),
    "modalities": ('["text"]', lambda v: v == ["text"]),
}
"""Fields the server accepts without acting on them: name -> (what is accepted, the check)."""


@dataclass(frozen=True)
class ChatOptions:
    """What a request asks of the answer besides its messages."""

    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None


def chat_options(body: dict[str, Any]) -> ChatOptions:
    """The options of a chat request's ``body`` (the model is the caller's to check).

    Raises:
        BadRequest: naming the first field the server does not honour or accept as given.
    """
    for name, value in body.items():
        if value is None or name in HONOURED:
            continue
        accepted = ACCEPTED.get(name)
        if accepted is None:
            raise BadRequest(name, "not supported by this server")
        what, check = accepted
        if not check(value):
            raise BadRequest(name, f"not supported by this server other than {what}")
    n = body.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        raise BadRequest("n", "this server answers with one choice: n must be 1")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise BadRequest("stream", "expected true or false")
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise BadRequest("stream_options", "expected an object")
    include_usage = (stream_options or {}).get("include_usage", False) is True
    caps = [_cap(body, name) for name in ("max_tokens", "max_completion_tokens")]
    given = [cap for cap in caps if cap is not None]
    return ChatOptions(bool(stream), include_usage, min(given) if given else None)


def _cap(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is not None and (not _is_int(value) or value < 1):
        raise BadRequest(name, "expected a positive integer")
    return value
