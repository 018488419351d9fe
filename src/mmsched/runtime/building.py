"""A request's multimodal inputs built from the processor's dict: the one place where the
config's hasher and size bound meet the validation in [`mmsched.inputs`][]."""

from __future__ import annotations

from collections.abc import Callable

import torch

from mmsched.config import Config
from mmsched.inputs import MultimodalInputs, materialize
from mmsched.messages import TokenizedGenerateReqInput


def build_inputs(
    config: Config,
    req: TokenizedGenerateReqInput,
    on_valid: Callable[[list[torch.Tensor]], None] | None = None,
) -> MultimodalInputs | None:
    """``req``'s inputs validated and hashed (passed through if built already; ``None``
    for a text-only request). Runs off the event loop where the caller has one: it walks
    and hashes every feature. ``on_valid`` gets the features once the whole request is
    valid, before they are hashed (the tokenizer starts their copy into the store then).

    Raises:
        InvalidMultimodalInput: the dict fails validation (the message names the field).
        UnknownNameError: the config names no hasher of that name.
    """
    return materialize(
        req.mm_inputs,
        hasher=config.hasher,
        input_len=len(req.input_ids),
        max_bytes=config.max_request_bytes,
        on_valid=on_valid,
    )
