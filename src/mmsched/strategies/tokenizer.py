"""``tokenizer``: the requested fix. The tokenizer validates and hashes once (in worker
threads) and the typed object rides the per-iteration broadcast; ranks use it as it comes.

With the ``shm`` payload store this is the ``zero-copy`` preset: the object's tensors are
written once into shared memory and only references travel.
"""

from __future__ import annotations

from mmsched.messages import TokenizedGenerateReqInput
from mmsched.strategies.base import Build, Strategy


class TokenizerStrategy(Strategy):
    name = "tokenizer"
    summary = "tokenizer hashes once; ranks use the object"
    builds_in_tokenizer = True

    def prepare(self, req: TokenizedGenerateReqInput, build: Build) -> None:
        req.mm_inputs = build(req)
