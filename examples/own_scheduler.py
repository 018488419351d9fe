"""mmsched inside a server that starts its own scheduler ranks: a loop of SGLang's shape.

The server, not mmsched, starts one process per TP rank. Each runs the usual loop:
``recv_requests`` (the entry rank takes what arrived and shares it with the other ranks),
then a model step on the same requests everywhere. Where SGLang's loop pickles the requests
to every rank with ``broadcast_pyobj``, this one calls ``RankGroup.publish`` on rank 0 and
``RankGroup.receive`` on the others: features are hashed once and cross through the payload
store (``shm``: written once into shared memory, mapped by every rank).

Run it with ``python examples/own_scheduler.py`` (TP=2, 8 requests, one of them malformed);
``MMSCHED_*`` variables override the config, e.g. ``MMSCHED_TP_SIZE=4``.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import queue
import sys
import tempfile
from dataclasses import dataclass
from multiprocessing.queues import Queue
from typing import Any

import torch

from mmsched import (
    Config,
    EndOfStream,
    Iteration,
    MultimodalInputs,
    RankGroup,
    TokenizedGenerateReqInput,
)

IMAGE_TOKEN_ID = 151655  # Qwen2-VL's <|image_pad|>
PATCH_ROW = 1176  # 3 channels x 2 frames x 14 x 14 values per patch


@dataclass
class Seen:
    """What one rank saw of one request (or the error rank 0 answered it with)."""

    rank: int
    rid: str
    digest: str = ""
    pad_values: tuple[int, ...] = ()
    error: str = ""


class Scheduler:
    """One TP rank of the server: its own process, its own loop."""

    def __init__(self, rank: int, group: RankGroup, inbox: Queue[Any], seen: Queue[Any]) -> None:
        self.rank = rank
        self.group = group
        self.inbox = inbox  # rank 0 only: what the tokenizer sent (the server's own path)
        self.seen = seen
        self.stopping = False  # rank 0: the server asked to stop

    async def recv_requests(self) -> Iteration | None:
        """This iteration's requests on every rank; ``None`` once the server stops."""
        if self.rank != 0:
            try:
                return await self.group.receive()  # in SGLang: broadcast_pyobj's receive side
            except EndOfStream:
                return None
        if self.stopping:
            return None
        iteration = await self.group.publish(self._drain_inbox())  # SGLang: broadcast_pyobj
        for error in iteration.failed:  # answered here, as the server answers its client
            self.seen.put(Seen(0, error.rid, error=f"{error.kind}: {error.field}"))
        return iteration

    def _drain_inbox(self) -> list[TokenizedGenerateReqInput]:
        requests: list[TokenizedGenerateReqInput] = []
        try:
            first = self.inbox.get(timeout=0.02)
        except queue.Empty:
            return requests  # an empty iteration still goes out: the ranks' heartbeat
        for spec in [first, *iter_nowait(self.inbox)]:
            if spec is None:
                self.stopping = True
            else:
                requests.append(self.process(*spec))
        return requests

    def process(self, rid: str, patches: int, seed: int, broken: bool) -> TokenizedGenerateReqInput:
        """Stands in for the tokenizer's processor: writes pixels where the group says."""
        pixels = self.group.allocate_tensor((patches, PATCH_ROW), torch.float32)
        pixels.copy_(torch.randn(patches, PATCH_ROW, generator=torch.Generator().manual_seed(seed)))
        tokens = patches // 4
        input_ids = [1, 2, *[IMAGE_TOKEN_ID] * tokens, 3]
        end = len(input_ids) + 10 if broken else 1 + tokens  # broken: past the prompt
        mm = {
            "mm_items": [{"modality": "image", "feature": pixels, "offsets": [(2, end)]}],
            "im_token_id": IMAGE_TOKEN_ID,
        }
        return TokenizedGenerateReqInput(rid, input_ids, {}, mm)

    def run_batch(self, iteration: Iteration) -> None:
        """The model step: here, a digest of every rank's inputs, to compare across ranks."""
        for req in iteration.requests:
            assert isinstance(req.mm_inputs, MultimodalInputs)
            pads = tuple(item.pad_value for item in req.mm_inputs.mm_items)
            self.seen.put(Seen(self.rank, req.rid, req.mm_inputs.content_digest(), pads))

    async def event_loop(self) -> None:
        while (iteration := await self.recv_requests()) is not None:
            self.run_batch(iteration)


def iter_nowait(q: Queue[Any]) -> list[Any]:
    out = []
    while True:
        try:
            out.append(q.get_nowait())
        except queue.Empty:
            return out


def rank_process(
    config: Config, rank: int, rendezvous: str, inbox: Queue[Any], seen: Queue[Any]
) -> None:
    async def main() -> None:
        async with await RankGroup.join(config, rank, rendezvous) as group:
            await Scheduler(rank, group, inbox, seen).event_loop()

    asyncio.run(main())


def serve(config: Config, requests: list[tuple[str, int, int, bool]]) -> list[Seen]:
    """Start the ranks (the server's job), feed rank 0, stop, and return what ranks saw."""
    ctx = multiprocessing.get_context("spawn")
    inbox: Queue[Any] = ctx.Queue()
    seen: Queue[Any] = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="myserver-") as rendezvous:
        procs = [
            ctx.Process(target=rank_process, args=(config, rank, rendezvous, inbox, seen))
            for rank in range(config.tp_size)
        ]
        for proc in procs:
            proc.start()
        for spec in requests:
            inbox.put(spec)
        inbox.put(None)
        results: list[Seen] = []
        expected = sum(config.tp_size if not broken else 1 for *_, broken in requests)
        while len(results) < expected:
            try:
                results.append(seen.get(timeout=0.5))
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:  # a rank that died will not answer: stop the others and say so
                    for proc in procs:
                        proc.kill()
                    raise RuntimeError(f"{dead[0].name} exited with {dead[0].exitcode}") from None
        for proc in procs:
            proc.join(config.timeout_s)
            if proc.exitcode != 0:
                raise RuntimeError(f"rank process {proc.name} exited with {proc.exitcode}")
    return results


def main(count: int) -> None:
    config = Config(transport="zmq", payload_store="shm", tp_size=2).with_env()
    requests = [(f"req-{i}", 1024, i, i == 2) for i in range(count)]
    for s in sorted(serve(config, requests), key=lambda s: (s.rid, s.rank)):
        outcome = s.error or f"digest {s.digest[:12]} pad values {list(s.pad_values)}"
        print(f"rank {s.rank} {s.rid}: {outcome}")


if __name__ == "__main__":  # rank processes are spawned: this guard is required
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 8)
