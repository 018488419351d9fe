"""What each rank's callback sees, for the GPU tests (spawned ranks import this module)."""

from __future__ import annotations

import asyncio
from typing import Any

import torch

from mmsched.inputs import MultimodalInputs
from mmsched.messages import ErrorOutput, TokenizedGenerateReqInput
from mmsched.probes import ModelStub


class OnDevice(ModelStub):
    """Reports, per request and rank: the features' devices, the rank's current CUDA device,
    and a digest of every byte it holds."""

    reports = True

    async def observe(
        self,
        rank: int,
        iteration: int,
        req: TokenizedGenerateReqInput,
        inputs: MultimodalInputs | None,
        error: ErrorOutput | None,
    ) -> dict[str, Any] | None:
        if inputs is None:
            return {"error": error.kind if error is not None else None}
        return {
            "error": None,
            "devices": [str(item.feature.device) for item in inputs.mm_items],
            "current": torch.cuda.current_device(),
            "content_digest": await asyncio.to_thread(inputs.content_digest),
        }

    def __reduce__(self) -> tuple[Any, ...]:
        return (OnDevice, (self.step_ms,))
