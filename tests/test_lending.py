"""Processor workers in other processes write straight into the tokenizer's arena: the
bytes reach every rank without a copy, a dead worker cannot wedge the ring, and neither a
wrong token nor a forged or stale handle gets anything."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import socket
import time
from typing import Any

import pytest
import torch

from mmsched import (
    CodecError,
    Config,
    ConfigError,
    MultimodalInputs,
    Pipeline,
    TransportError,
)
from mmsched.bench.workloads import IMAGE_TOKEN_ID
from mmsched.probes import RankTimings
from mmsched.stores.lending import ArenaAccess, Lent
from producers import ROWS, expected_pixels, lease_and_die, write_one, write_two_after_a_pause

pytestmark = pytest.mark.asyncio

SPAWN = multiprocessing.get_context("spawn")


def image_request(pixels: torch.Tensor) -> tuple[list[int], dict[str, Any]]:
    ids = [1] * 8 + [IMAGE_TOKEN_ID] * (ROWS // 4) + [2] * 8
    item = {
        "modality": "image",
        "feature": pixels,
        "offsets": [(8, 8 + ROWS // 4 - 1)],
        "image_grid_thw": torch.tensor([[1, 30, 20]]),
    }
    return ids, {"mm_items": [item], "im_token_id": IMAGE_TOKEN_ID}


def run_worker(target: Any, *args: Any) -> Any:
    out = SPAWN.Queue()
    proc = SPAWN.Process(target=target, args=(*args, out))
    proc.start()
    try:
        return out.get(timeout=60)
    finally:
        proc.join(timeout=30)
        assert proc.exitcode == 0


async def test_a_worker_writes_into_the_arena_and_every_rank_reads_its_bytes() -> None:
    config = Config(strategy="zero-copy", transport="zmq", tp_size=2, shm_arena_mb=64)
    async with Pipeline(config, probe=RankTimings(digest_prefix="")) as pipeline:
        access = pipeline.producer_access()
        lent = run_worker(write_one, access, 7)
        assert isinstance(lent, Lent) and lent.shape == (ROWS, 1176)
        pixels = pipeline.claim_tensor(lent)
        assert torch.equal(pixels, expected_pixels(7))
        # It lives in the arena already: sending it copies nothing.
        writer = pipeline._store._writer  # type: ignore[union-attr]
        assert writer.ref_at(pixels.data_ptr(), pixels.numel() * 4) is not None
        ids, mm = image_request(pixels)
        trace = await pipeline.generate_traced("lent-0", ids, mm)
        reference = MultimodalInputs.from_dict(mm, hasher=config.hasher).content_digest()
        assert [r.data["content_digest"] for r in trace.reports] == [reference, reference]
        with pytest.raises(TransportError, match="not a lease"):
            pipeline.claim_tensor(lent)  # a handle is claimed once


async def test_a_dead_worker_does_not_wedge_the_ring() -> None:
    config = Config(
        strategy="zero-copy", transport="zmq", tp_size=1, shm_arena_mb=16, timeout_s=3.0
    )
    async with Pipeline(config) as pipeline:
        lent = run_worker(lease_and_die, pipeline.producer_access(), 12 << 20)
        # 12 of 16 MB are held by a lease nobody will claim; within timeout_s it is given
        # back, and requests that need the room go through.
        for i in range(3):
            pixels = await asyncio.to_thread(  # off the loop: it waits for the room
                pipeline.allocate_tensor, (ROWS * 4, 1176), torch.float32
            )  # 11.3 MB
            pixels.copy_(torch.ones(ROWS * 4, 1176))
            ids, mm = image_request(pixels[:ROWS])
            await pipeline.generate(f"after-{i}", ids, mm)
            del pixels, mm
        with pytest.raises(TransportError, match="expired"):
            pipeline.claim_tensor(lent)


async def test_wrong_tokens_forged_handles_and_garbage_get_nothing() -> None:
    config = Config(strategy="zero-copy", transport="zmq", tp_size=1, shm_arena_mb=16)
    async with Pipeline(config) as pipeline:
        access = pipeline.producer_access()
        with pytest.raises(TransportError, match="refused"):
            ArenaAccess(access.path, "not-the-token").connect()
        arena = access.connect()
        _, lent = arena.allocate((1000,), torch.float32)
        forged = [
            Lent(lent.arena, lent.seq + 5, lent.offset, lent.nbytes, "float32", (1000,)),
            Lent(lent.arena, lent.seq, lent.offset + 64, lent.nbytes, "float32", (1000,)),
            Lent("elsewhere", lent.seq, lent.offset, lent.nbytes, "float32", (1000,)),
            Lent(lent.arena, lent.seq, lent.offset, "4000", "float32", (1000,)),  # type: ignore[arg-type]
            "not a handle",
        ]
        for handle in forged:
            with pytest.raises(TransportError):
                pipeline.claim_tensor(handle)
        with pytest.raises(CodecError):  # a shape that does not fit its bytes
            pipeline.claim_tensor(
                Lent(lent.arena, lent.seq, lent.offset, lent.nbytes, "float32", (999,))
            )
        # A client sending garbage is dropped; the lender goes on serving the others.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as rogue:
            rogue.connect(access.path)
            rogue.sendall(b"\x00\xff garbage with no newline")
        _, again = arena.allocate((10,), torch.int64)
        assert pipeline.claim_tensor(again).shape == (10,)
        assert pipeline.claim_tensor(lent).shape == (1000,)
        arena.close()


async def test_stores_without_shared_memory_lend_nothing() -> None:
    config = Config(strategy="tokenizer", transport="zmq", payload_store="inline", tp_size=1)
    async with Pipeline(config) as pipeline:
        with pytest.raises(ConfigError, match="lends no memory"):
            pipeline.producer_access()


async def test_silent_and_idle_clients_are_dropped_and_producers_reconnect(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A client that connects and sends nothing holds no thread for ever: it is dropped
    (and logged) after the token bound; a producer idle past the idle bound loses its
    connection too, and its next ``allocate`` connects again, transparently."""
    caplog.set_level(logging.WARNING, logger="mmsched")
    config = Config(
        strategy="zero-copy", transport="zmq", tp_size=1, shm_arena_mb=32, timeout_s=1.5
    )
    async with Pipeline(config) as pipeline:
        access = pipeline.producer_access()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
            silent.connect(access.path)
            silent.settimeout(20)
            started = time.monotonic()
            assert await asyncio.to_thread(silent.recv, 1) == b""  # the lender hung up
            dropped_after = time.monotonic() - started
        assert 1.0 < dropped_after < 10, dropped_after
        assert "sent no token within 1.5 s" in caplog.text
        # Token given, then silence past the idle bound: dropped as well.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as idle:
            idle.connect(access.path)
            idle.sendall(b'{"token": "%s"}\n' % access.token.encode())
            idle.settimeout(20)
            message, fds, _, _ = await asyncio.to_thread(socket.recv_fds, idle, 4096, 1)
            for fd in fds:
                os.close(fd)
            assert b"arena" in message
            assert await asyncio.to_thread(idle.recv, 1) == b""
        assert "sent no request within 1.5 s" in caplog.text
        # A real producer in its own process, idle for twice the bound before its outputs.
        first, second = run_worker(write_two_after_a_pause, access, 3.0)
        assert torch.equal(pipeline.claim_tensor(first), expected_pixels(1))
        assert torch.equal(pipeline.claim_tensor(second), expected_pixels(2))
