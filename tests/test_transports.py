"""The transport contract, run against every registered transport.

One scenario (``mmsched.testing``): order, nothing lost or duplicated, empty messages and
empty frames, payloads of several MiB, end-of-stream after close, errors after close, and
statistics. In-process transports run every rank as a task; the others run every rank in
its own process.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import pytest

from mmsched import (
    ConfigError,
    EndOfStream,
    GroupSpec,
    PeerLost,
    TransportClosed,
    TransportError,
    open_transport,
)
from mmsched.testing import (
    CONTRACT_MESSAGES,
    expected_contract_result,
    run_contract_in_processes,
    run_contract_rank,
)
from mmsched.transports import transport_names
from mmsched.transports.memory import MemoryTransport

CROSS_PROCESS = transport_names(cross_process=True)

WORLD = 3


def check_contract(results: dict[int, dict[str, Any]]) -> None:
    assert sorted(results) == list(range(WORLD)), results
    for rank, result in results.items():
        assert "error" not in result, f"rank {rank}: {result['error']}"
    expected = expected_contract_result()
    total = sum(sum(len(f) for f in m) for m in CONTRACT_MESSAGES)
    sender = results[0]
    assert sender["after_close"] == "TransportClosed"
    assert sender["stats"]["messages_sent"] == len(CONTRACT_MESSAGES)
    assert sender["stats"]["bytes_sent"] == total
    for rank in range(1, WORLD):
        got = results[rank]
        assert got["messages"] == expected["messages"], f"rank {rank} got other messages"
        assert got["after_end"] == expected["after_end"]
        assert got["after_close"] == expected["after_close"]
        assert got["stats"]["messages_received"] == len(CONTRACT_MESSAGES)
        assert got["stats"]["bytes_received"] == total


def test_every_transport_is_covered() -> None:
    # A newly registered transport must join one of the two runs below.
    assert set(transport_names()) == {"memory", "shm", "torch", "zmq"}
    assert CROSS_PROCESS == ["shm", "torch", "zmq"]


async def test_memory_transport_contract() -> None:
    group = await MemoryTransport.group(WORLD)
    results = await asyncio.gather(*(run_contract_rank(t) for t in group))
    check_contract(dict(enumerate(results)))


@pytest.mark.parametrize("name", sorted(CROSS_PROCESS))
def test_cross_process_transport_contract(name: str, tmp_path: Path) -> None:
    check_contract(run_contract_in_processes(name, WORLD, tmp_path, timeout_s=120))


@pytest.mark.parametrize("name", ["zmq", "torch"])
def test_transport_contract_over_tcp(name: str, tmp_path: Path) -> None:
    # One host uses ipc:// or a file rendezvous; tcp:// is what ranks on several hosts use
    # (torch: a store whose listening socket mmsched binds to the host given).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    check_contract(run_contract_in_processes(name, WORLD, tmp_path, address=address))


@pytest.mark.parametrize("address", ["127.0.0.1:5000", "tcp://host", "tcp://h:99999", "file://"])
async def test_torch_transport_refuses_a_malformed_address(address: str) -> None:
    with pytest.raises(ConfigError, match="use file://PATH or tcp://HOST:PORT"):
        await open_transport("torch", GroupSpec(0, 1, address, timeout_s=1))


async def test_memory_cancelled_recv_loses_nothing() -> None:
    sender, receiver = await MemoryTransport.group(2)
    pending = asyncio.create_task(receiver.recv())
    await asyncio.sleep(0)
    pending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await pending
    await sender.send([b"after-cancel"])
    assert await receiver.recv() == [b"after-cancel"]
    await sender.aclose()
    with pytest.raises(EndOfStream):
        await receiver.recv()


async def test_roles_are_enforced() -> None:
    sender, receiver = await MemoryTransport.group(2)
    with pytest.raises(TransportError, match="only a receiver"):
        await sender.recv()
    with pytest.raises(TransportError, match="only the sender"):
        await receiver.send([b"x"])
    await receiver.aclose()
    with pytest.raises(TransportClosed):
        await receiver.recv()


def test_transport_options_are_typed_and_filled_from_the_config() -> None:
    from mmsched import Config
    from mmsched.transports import TransportOptions

    spec = GroupSpec(0, 2, "x", options={"arena_bytes": 5 << 20, "token": "t"})
    assert spec.settings == TransportOptions(token="t", arena_bytes=5 << 20)
    assert GroupSpec(0, 2, "x").settings == TransportOptions()  # every default
    with pytest.raises(ConfigError, match="unknown transport options"):
        GroupSpec(0, 2, "x", options={"arena_mb": 5})
    with pytest.raises(ConfigError, match="arena_bytes"):
        TransportOptions(arena_bytes=-1)
    with pytest.raises(ConfigError, match="token"):
        GroupSpec(0, 2, "x", options={"token": 7})
    config = Config(transport="shm", shm_transport_mb=48)
    assert config.transport_options("secret") == TransportOptions(
        token="secret", arena_bytes=48 << 20
    )


async def test_the_shm_transport_refuses_a_receiver_without_the_token(tmp_path: Path) -> None:
    from mmsched.transports.shm import ShmTransport

    def spec(rank: int, token: str, address: str) -> GroupSpec:
        options = {"token": token, "arena_bytes": 1 << 20}
        return GroupSpec(rank, 2, address, timeout_s=10, options=options, join_timeout_s=2)

    # Its control channel is a zmq group: the run's token is presented there too.
    address = ShmTransport.new_address(tmp_path)
    refused = await asyncio.gather(
        open_transport("shm", spec(0, "right", address)),
        open_transport("shm", spec(1, "wrong", address)),
        return_exceptions=True,
    )
    assert isinstance(refused[0], PeerLost), refused[0]
    assert isinstance(refused[1], ShmTransport)
    await refused[1].aclose()
    address = ShmTransport.new_address(tmp_path)
    sender, receiver = await asyncio.gather(
        open_transport("shm", spec(0, "right", address)),
        open_transport("shm", spec(1, "right", address)),
    )
    await sender.send([bytearray(b"x" * (256 << 10))])
    assert [bytes(f) for f in await receiver.recv()] == [b"x" * (256 << 10)]
    await sender.aclose()
    await receiver.aclose()
