"""``per-rank``: SGLang before 17a57fd86. The raw dict rides the per-iteration broadcast and
*every* rank validates and hashes it: TP hashes per request."""

from __future__ import annotations

from mmsched.strategies.base import Strategy


class PerRank(Strategy):
    name = "per-rank"
    summary = "every rank hashes (SGLang before 17a57fd86)"
