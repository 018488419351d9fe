"""Test helpers: the transport contract every transport must pass, and a rank-side recorder.

The contract ([`run_contract_rank`][]) is one scenario run on every rank of a group: the
sender sends [`CONTRACT_MESSAGES`][] and closes; each receiver returns what it got,
message by message, as (length, BLAKE3) of each frame, plus what happened after the end.
A new transport passes when every receiver's result equals [`expected_contract_result`][].
Helpers live in the package, not in ``tests/``, because rank processes started with
``spawn`` must be able to import them.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import queue
from pathlib import Path
from typing import Any

import blake3

from mmsched.errors import EndOfStream, TransportClosed
from mmsched.messages import TokenizedGenerateReqInput
from mmsched.transports import GroupSpec, Transport, open_transport

_BIG = 3 * (1 << 20) + 17  # larger than any chunk a transport might cut at, and odd


def _pattern(n: int, seed: int) -> bytes:
    return bytes((i * 31 + seed) & 0xFF for i in range(256)) * (n // 256) + bytes(n % 256)


CONTRACT_MESSAGES: list[list[bytes]] = [
    [b"first"],
    [],  # a message with no frames
    [b""],  # one empty frame
    [b"a", b"", b"ccc"],  # empty frame in the middle: boundaries must survive
    [_pattern(_BIG, 1)],
    [b"header", _pattern(_BIG, 2), _pattern(1000, 3)],
    *[[f"seq-{i}".encode()] for i in range(50)],  # order under a burst
]


def _summary(frames: list[Any]) -> list[tuple[int, str]]:
    return [(memoryview(f).nbytes, blake3.blake3(f).hexdigest()) for f in frames]


def expected_contract_result() -> dict[str, Any]:
    """What every receiver of [`run_contract_rank`][] must return for a transport to pass."""
    return {
        "messages": [_summary(m) for m in CONTRACT_MESSAGES],
        "after_end": "EndOfStream",
        "after_close": "TransportClosed",
    }


async def run_contract_rank(transport: Transport) -> dict[str, Any]:
    """Run the contract scenario on one rank; returns what this rank observed."""
    if transport.is_sender:
        for message in CONTRACT_MESSAGES:
            await transport.send(message)
        await transport.aclose()
        try:
            await transport.send([b"late"])
            after_close = "no error"
        except TransportClosed:
            after_close = "TransportClosed"
        return {"after_close": after_close, "stats": vars(transport.statistics())}

    received: list[list[tuple[int, str]]] = []
    while True:
        try:
            received.append(_summary(await transport.recv()))
        except EndOfStream:
            break
    try:
        await transport.recv()
        after_end = "no error"
    except EndOfStream:
        after_end = "EndOfStream"
    await transport.aclose()
    try:
        await transport.recv()
        after_close = "no error"
    except TransportClosed:
        after_close = "TransportClosed"
    return {
        "messages": received,
        "after_end": after_end,
        "after_close": after_close,
        "stats": vars(transport.statistics()),
    }


def _contract_process(name: str, spec: GroupSpec, results: Any) -> None:
    async def main() -> dict[str, Any]:
        transport = await open_transport(name, spec)
        return await run_contract_rank(transport)

    try:
        results.put((spec.rank, asyncio.run(main())))
    except BaseException as exc:  # report, so the test names the failure instead of hanging
        results.put((spec.rank, {"error": repr(exc)}))


def run_contract_in_processes(
    name: str,
    world_size: int,
    workdir: Path,
    *,
    timeout_s: float = 120.0,
    address: str | None = None,
) -> dict[int, dict[str, Any]]:
    """Run the contract with each rank in its own process; returns each rank's result.

    ``address`` is the group's rendezvous; by default the transport makes one in ``workdir``.
    """
    from mmsched.transports import transport_class

    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    if address is None:
        address = transport_class(name).new_address(workdir)
    procs = [
        ctx.Process(
            target=_contract_process,
            args=(name, GroupSpec(rank, world_size, address, timeout_s=timeout_s), results),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    out: dict[int, dict[str, Any]] = {}
    try:
        while len(out) < world_size:
            rank, result = results.get(timeout=timeout_s)
            out[rank] = result
    except queue.Empty:
        pass
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
    return out


class IterationRecorder:
    """An ``on_iteration`` callback that appends what each rank saw to ``rank<N>.jsonl``.

    Picklable (it holds only a path), so it can be handed to spawned rank processes.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = str(directory)

    def __call__(
        self, rank: int, iteration: int, requests: list[TokenizedGenerateReqInput]
    ) -> None:
        from mmsched.inputs import MultimodalInputs

        lines = []
        for req in requests:
            mm = req.mm_inputs
            lines.append(
                {
                    "rid": req.rid,
                    "iteration": iteration,
                    "type": type(mm).__name__,
                    "digest": mm.content_digest() if isinstance(mm, MultimodalInputs) else None,
                    "pad_values": [i.pad_value for i in mm.mm_items]
                    if isinstance(mm, MultimodalInputs)
                    else [],
                }
            )
        if lines:
            with open(Path(self.directory) / f"rank{rank}.jsonl", "a") as f:
                for line in lines:
                    f.write(json.dumps(line) + "\n")

    def read(self, rank: int) -> list[dict[str, Any]]:
        """What ``rank`` recorded, one dict per request, in the order it saw them."""
        path = Path(self.directory) / f"rank{rank}.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]


class SlowRank:
    """An ``on_iteration`` callback that makes one rank slow: it sleeps on that rank only."""

    def __init__(self, rank: int, seconds: float) -> None:
        self.rank = rank
        self.seconds = seconds

    async def __call__(
        self, rank: int, iteration: int, requests: list[TokenizedGenerateReqInput]
    ) -> None:
        if rank == self.rank and requests:
            await asyncio.sleep(self.seconds)


class FailingRank:
    """An ``on_iteration`` callback that raises on one rank at its first request, as a
    server's model step might: the rank process dies, and the pipeline reports why."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def __call__(
        self, rank: int, iteration: int, requests: list[TokenizedGenerateReqInput]
    ) -> None:
        if rank == self.rank and requests:
            raise RuntimeError(f"rank {rank} failed in iteration {iteration} (FailingRank)")
