"""Models the ranks can run, by the name a server is started with (``mmsched serve --model``).

- ``mmsched-stub-qwen2-vl`` (the default): mmsched's stub, which answers with the ids that
  reached the model step; the server's reply says in words what reached the ranks.
- ``tiny-qwen2-vl``: ``transformers``' own Qwen2-VL model class with a tiny config and
  random weights ([`mmsched.models.qwen2_vl`][]); the reply is the text of the ids it
  generated, streamed as they come under ``stream: true``.

Any other name serves the stub under that name.
"""

from __future__ import annotations

from dataclasses import dataclass

from mmsched.outputs import IterationCallback
from mmsched.scheduler import RankStartCallback

STUB_MODEL = "mmsched-stub-qwen2-vl"
TINY_QWEN2_VL = "tiny-qwen2-vl"


@dataclass(frozen=True)
class ServedModel:
    """A model's rank hooks and how its output becomes a reply.

    Attributes:
        name: the model id clients ask for.
        on_iteration: the rank callback (``None``: the stub).
        on_rank_start: the per-rank load (``None``: nothing to load).
        generates_text: the output ids are text to decode (a real model); otherwise the
            reply describes what reached the ranks (the stub).
    """

    name: str
    on_iteration: IterationCallback | None = None
    on_rank_start: RankStartCallback | None = None
    generates_text: bool = False


def served_model(name: str) -> ServedModel:
    """The model registered as ``name``, or the stub answering to that name."""
    if name == TINY_QWEN2_VL:
        from mmsched.models.qwen2_vl import TinyQwen2VL

        model = TinyQwen2VL(stream=True)
        return ServedModel(name, model, model.on_rank_start, generates_text=True)
    return ServedModel(name)
