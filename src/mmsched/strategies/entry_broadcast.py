"""``entry-broadcast``: SGLang commit 17a57fd86. The raw dict rides the per-iteration
broadcast; the entry rank builds it, then sends the built object (or its verdict) to the
other ranks with one more blocking fan-out *per request*: one hash, but requests serialize
and large tensors cross the group twice."""

from __future__ import annotations

from mmsched.errors import CodecError
from mmsched.inputs import MultimodalInputs
from mmsched.messages import ErrorOutput, MaterializedInputs, TokenizedGenerateReqInput
from mmsched.strategies.base import RankServices, Strategy


class EntryBroadcast(Strategy):
    name = "entry-broadcast"
    summary = "entry rank hashes, then a blocking fan-out per request (commit 17a57fd86)"

    async def resolve(
        self, req: TokenizedGenerateReqInput, rank: RankServices
    ) -> MultimodalInputs | ErrorOutput | None:
        if not isinstance(req.mm_inputs, dict):
            return req.mm_inputs
        message: MaterializedInputs
        if rank.rank == 0:
            try:
                message = MaterializedInputs(rid=req.rid, mm_inputs=await rank.build(req))
            except Exception as exc:
                # Unlike the original, the verdict is sent too, so no rank waits forever.
                error = ErrorOutput.from_exception(req.rid, exc)
                message = MaterializedInputs(rid=req.rid, error=error)
            await rank.send_to_group(message)
        else:
            received = await rank.recv_from_group()
            if not isinstance(received, MaterializedInputs) or received.rid != req.rid:
                raise CodecError(f"expected the entry rank's inputs for {req.rid!r}")
            message = received
        return message.error if message.error is not None else message.mm_inputs
