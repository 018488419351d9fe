"""Where a request's multimodal inputs are materialized, by name; and the presets.

``per-rank``         every rank builds ([`mmsched.strategies.per_rank`][])
``entry-broadcast``  the entry rank builds, then fans out per request
                     ([`mmsched.strategies.entry_broadcast`][])
``tokenizer``        the tokenizer builds once ([`mmsched.strategies.tokenizer`][])

A *preset* is a name that stands for several config values. ``zero-copy`` is the
``tokenizer`` strategy with the ``shm`` payload store: tensor bytes are written once into
shared memory and only references of a few hundred bytes travel, over any transport.

A new strategy is one module with a [`Strategy`][mmsched.strategies.base.Strategy]
subclass plus one line: in the table below, a call to [`register_strategy`][], or an entry
point in the ``mmsched.strategies`` group of an installed package
([`STRATEGIES`][mmsched.strategies.STRATEGIES], a [`Registry`][mmsched.registry.Registry]).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mmsched.errors import UnknownNameError
from mmsched.registry import Registry
from mmsched.strategies.base import RankServices, Strategy

STRATEGIES: Registry[Strategy] = Registry(
    "strategy",
    Strategy,
    {
        "per-rank": "mmsched.strategies.per_rank:PerRank",
        "entry-broadcast": "mmsched.strategies.entry_broadcast:EntryBroadcast",
        "tokenizer": "mmsched.strategies.tokenizer:TokenizerStrategy",
    },
    entry_points="mmsched.strategies",
)
"""Every strategy, by name (the presets are not in it)."""

PRESETS: dict[str, Mapping[str, Any]] = {
    "zero-copy": {"strategy": "tokenizer", "payload_store": "shm"},
}
"""Names that stand for several config values; a config given one takes its values."""


def strategy_names() -> list[str]:
    """The registered strategies and the presets, sorted."""
    return sorted([*STRATEGIES.names(), *PRESETS])


def register_strategy(name: str, target: str | type[Strategy]) -> None:
    """Register a strategy class (or ``"module:Class"``) under ``name``.

    Rank processes are started with ``spawn``: a strategy registered at run time must be
    registered again in them (at import of the callback's module, say), or listed here.
    """
    STRATEGIES.register(name, target)


def get_strategy(name: str) -> Strategy:
    """The strategy registered under ``name`` (a preset gives its strategy).

    Raises:
        UnknownNameError: no strategy or preset of that name; the message lists the known.
    """
    if name in PRESETS:
        name = str(PRESETS[name]["strategy"])
    elif name not in STRATEGIES:
        raise UnknownNameError("strategy", name, strategy_names())
    return STRATEGIES.get(name)()


__all__ = [
    "PRESETS",
    "STRATEGIES",
    "RankServices",
    "Strategy",
    "get_strategy",
    "register_strategy",
    "strategy_names",
]
