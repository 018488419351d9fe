"""Where a request's multimodal inputs are materialized (validated + hashed), by name.

``per-rank``         SGLang before 17a57fd86: the raw dict rides the per-iteration broadcast
                     and *every* rank runs ``from_dict``: TP hashes per request.
``entry-broadcast``  commit 17a57fd86: the raw dict rides the per-iteration broadcast, the
                     entry rank runs ``from_dict``, then sends the built object to the other
                     ranks with one more blocking fan-out *per request*: one hash, but
                     requests serialize and large tensors cross the group twice.
``tokenizer``        the requested fix: the tokenizer runs ``from_dict`` once (in worker
                     threads), and the typed object rides the per-iteration broadcast.
``zero-copy``        as ``tokenizer``, but the tokenizer writes tensor bytes once into a
                     shared-memory arena every rank maps; only headers of a few hundred bytes
                     travel, to the entry rank and from it (needs the ``shm`` transport).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from mmsched.errors import UnknownNameError


class MaterializeIn(enum.Enum):
    """The process where a request's raw processor output becomes a MultimodalInputs."""

    TOKENIZER = "tokenizer"
    EVERY_RANK = "every-rank"
    ENTRY_RANK = "entry-rank"


@dataclass(frozen=True)
class Strategy:
    """A named way of carrying inputs to the ranks; see [`STRATEGIES`][] for the four."""

    name: str
    materialize_in: MaterializeIn
    summary: str
    # Tensor bytes go through the tokenizer's shared-memory arena rather than any socket.
    shared_memory_inputs: bool = False


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy(
            "per-rank", MaterializeIn.EVERY_RANK, "every rank hashes (SGLang before 17a57fd86)"
        ),
        Strategy(
            "entry-broadcast",
            MaterializeIn.ENTRY_RANK,
            "entry rank hashes, then a blocking fan-out per request (commit 17a57fd86)",
        ),
        Strategy(
            "tokenizer", MaterializeIn.TOKENIZER, "tokenizer hashes once; ranks use the object"
        ),
        Strategy(
            "zero-copy",
            MaterializeIn.TOKENIZER,
            "tokenizer hashes once and writes tensors once to shared memory; headers travel",
            shared_memory_inputs=True,
        ),
    )
}


def get_strategy(name: str) -> Strategy:
    """The strategy registered under ``name``; an unknown name lists the known ones."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise UnknownNameError("strategy", name, list(STRATEGIES)) from None
