"""Ranks on several hosts: config checks, joining, and real runs on simulated hosts.

The first tests need no privileges: the config's rules, the join protocol against a real
socket, and two "hosts" on loopback whose configs differ. The rest run every host in its
own network namespace with its own ``/dev/shm`` ([`mmsched.simhosts`][]), joined by veth
links: payload identity and bytes per link (2 hosts x 4 ranks, 100 MB; 3 hosts), then a link
cut and a killed host mid-run. They skip, saying why, where namespaces cannot be made.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import psutil
import pytest
import torch
import zmq
import zmq.asyncio

from mmsched import Config, ConfigError, PeerLost, Pipeline
from mmsched.bench.hosts import hosts_config, run_hosts_fanout
from mmsched.hosts import HostAddresses, JoinServer, config_mismatch, join
from mmsched.messages import NodeStatus
from mmsched.simhosts import SimulatedHosts, address_of, available
from own_run import rank_processes_of, segments_of

TESTS = Path(__file__).parent
ROOT = TESTS.parent
NAMESPACES = available()
needs_namespaces = pytest.mark.skipif(NAMESPACES is not None, reason=f"{NAMESPACES}")


def _free_port_pair() -> int:
    """A port P with P, P+1 and P+2 free on loopback now."""
    import socket

    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port > 65000:
            continue
        try:
            probes = [socket.create_server(("127.0.0.1", port + k)) for k in range(3)]
        except OSError:
            continue
        for p in probes:
            p.close()
        return port
    raise RuntimeError("no three consecutive free ports")


def _rank_command(tp: int, node_rank: int, dist_init_addr: str) -> list[str]:
    """The real ``mmsched rank`` of a two-host group, as an operator types it."""
    return [
        sys.executable, "-m", "mmsched", "rank", "--tp", str(tp), "--nnodes", "2",
        "--node-rank", str(node_rank), "--dist-init-addr", dist_init_addr,
    ]  # fmt: skip


def _env(**values: object) -> dict[str, str]:
    """This environment with ``MMSCHED_<NAME>`` set for each value: the rest of the config
    the agent's host must share with node 0."""
    return {**os.environ, **{f"MMSCHED_{k.upper()}": str(v) for k, v in values.items()}}


def _start_agent(config: Config) -> subprocess.Popen[str]:
    """Host 1's agent on this machine, with ``config``'s sizes and timeouts."""
    return subprocess.Popen(
        _rank_command(config.tp_size, 1, config.dist_init_addr or ""),
        env=_env(
            shm_arena_mb=config.shm_arena_mb,
            timeout_s=config.timeout_s,
            startup_timeout_s=config.startup_timeout_s,
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


# -- config and joining, no privileges ----------------------------------------------------


def test_config_rules_for_several_hosts() -> None:
    with pytest.raises(ConfigError, match="spread evenly"):
        Config(tp_size=3, nnodes=2, dist_init_addr="10.0.0.1:29500")
    with pytest.raises(ConfigError, match="needs dist_init_addr"):
        Config(tp_size=4, nnodes=2)
    with pytest.raises(ConfigError, match="cannot span hosts"):
        Config(tp_size=4, nnodes=2, dist_init_addr="10.0.0.1:29500", transport="memory")
    with pytest.raises(ConfigError, match="HOST:PORT"):
        Config(tp_size=4, nnodes=2, dist_init_addr="10.0.0.1")
    config = Config(tp_size=8, nnodes=2, dist_init_addr="10.0.0.1:29500")
    assert config.ranks_per_node == 4
    addresses = HostAddresses.of(config)
    assert (addresses.join, addresses.results, addresses.iterations) == (
        "tcp://10.0.0.1:29500",
        "tcp://10.0.0.1:29501",
        "tcp://10.0.0.1:29502",
    )
    from_env = Config.from_env(
        {"MMSCHED_TP_SIZE": "8", "MMSCHED_NNODES": "2", "MMSCHED_DIST_INIT_ADDR": "h:1"}
    )
    assert (from_env.nnodes, from_env.dist_init_addr) == (2, "h:1")


def test_a_config_mismatch_names_the_field() -> None:
    ours = Config(tp_size=4, nnodes=2, dist_init_addr="h:1")
    assert config_mismatch(ours, ours.as_dict()) is None
    # Node 0's own sockets may differ; nothing else may.
    assert config_mismatch(ours, {**ours.as_dict(), "results_address": "tcp://x:1"}) is None
    theirs = {**ours.as_dict(), "shm_arena_mb": 512}
    assert config_mismatch(ours, theirs) == (
        "config field 'shm_arena_mb' differs: node 0 has 1024, the joining host has 512"
    )
    missing = ours.as_dict()
    del missing["hasher"]
    assert "'hasher' is missing" in str(config_mismatch(ours, missing))
    assert "unknown to node 0" in str(config_mismatch(ours, {**ours.as_dict(), "x": 1}))
    assert "not a table" in str(config_mismatch(ours, [1, 2]))


def test_the_join_server_answers_every_hello_and_keeps_serving() -> None:
    """The join port against real sockets: garbage is refused and changes nothing (no
    config, a string for a config: never a failed start), a slot is claimed by a hello and
    kept only while its joiner is heard from, and joined for good once its ranks started."""

    async def scenario() -> None:
        port = _free_port_pair()
        config = Config(tp_size=6, nnodes=3, dist_init_addr=f"127.0.0.1:{port}", timeout_s=2)
        mismatches: list[ConfigError] = []
        context = zmq.asyncio.Context()
        server = JoinServer(context, config, "the-token", mismatches.append, probe=None)
        serving = asyncio.create_task(server.serve())
        raw = context.socket(zmq.DEALER)
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(f"tcp://127.0.0.1:{port}")

        async def hello(body: object) -> dict[str, Any]:
            await raw.send(body if isinstance(body, bytes) else orjson.dumps(body))
            reply: dict[str, Any] = orjson.loads(await asyncio.wait_for(raw.recv(), 5))
            return reply

        def of(pid: int, node: int = 1) -> dict[str, Any]:
            return {"node_rank": node, "pid": pid, "config": config.as_dict(), "probe": None}

        try:
            junk: list[object] = [
                b"not json",
                b"[1, 2]",
                {"node_rank": "1", "pid": 1},
                {"node_rank": 1, "pid": 1},  # no config
                {"node_rank": 1, "pid": 1, "config": "tp_size=6"},  # a string for a config
                {"node_rank": 1, "pid": 1, "config": [1, 2]},
                {"node_rank": 1, "pid": -4, "config": config.as_dict()},
                {**of(1), "probe": 7},
            ]
            for body in junk:
                reply = await hello(body)
                assert reply["error"].startswith("malformed hello"), (body, reply)
            assert mismatches == [] and server.claims == {}  # garbage changed nothing
            assert await join(config, 1) == "the-token"  # claims node 1 (this pid)
            assert (await hello(of(4242)))["retry"] is True  # another pid waits for it
            assert server.heard(NodeStatus(1, os.getpid(), ready=True)) is not None
            assert server.heard(NodeStatus(1, 4242, ready=True)) is None  # not the claimant
            assert server.joined == {1: os.getpid()}
            with pytest.raises(ConfigError, match="has joined already"):
                await hello_refused(hello, of(4242))
            with pytest.raises(ConfigError, match=r"not one of 1\.\.2"):
                await join(config, 3)
            with pytest.raises(ConfigError, match="probe"):
                await join(config, 2, probe="RankTimings")
            other = config.replace(hasher="sha256")
            with pytest.raises(ConfigError, match="config field 'hasher' differs"):
                await join(other, 2)
            assert [str(e) for e in mismatches][-1].startswith("node 2 cannot join: config field")
            # A joiner that says hello and goes silent frees the slot after timeout_s / 2.
            assert (await hello(of(7, node=2)))["token"] == "the-token"
            assert (await hello(of(8, node=2)))["retry"] is True
            await asyncio.sleep(server.claim_lapses_after_s + 0.2)
            assert "node 2: its joiner (pid 7" in server.waiting_for()
            assert (await hello(of(8, node=2)))["token"] == "the-token"
            assert "node 2: pid 8 on ?" in server.waiting_for()
            assert set(server.joined) == {1}
        finally:
            serving.cancel()
            server.close()
            context.destroy(linger=0)

    async def hello_refused(send: Any, body: dict[str, Any]) -> None:
        reply = await send(body)
        if "error" in reply and not reply.get("retry"):
            raise ConfigError(reply["error"])

    asyncio.run(scenario())


def test_an_agent_without_node_0_gives_up_after_startup_timeout() -> None:
    port = _free_port_pair()
    started = time.monotonic()
    done = subprocess.run(
        _rank_command(2, 1, f"127.0.0.1:{port}"),
        env=_env(startup_timeout_s=1),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "node 0 did not answer" in done.stdout
    assert time.monotonic() - started < 30
    refused = subprocess.run(
        _rank_command(2, 0, f"127.0.0.1:{port}"), capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 2
    assert "node 0 is the process that runs the pipeline" in refused.stdout


def test_mismatched_hosts_fail_at_join_on_both_sides() -> None:
    """Two hosts on loopback (real processes, the real ``mmsched rank``): the joining host
    has another arena size; both fail, naming the field, and nothing is left running."""
    port = _free_port_pair()
    config = Config(
        tp_size=2,
        nnodes=2,
        dist_init_addr=f"127.0.0.1:{port}",
        shm_arena_mb=64,
        timeout_s=20,
        startup_timeout_s=60,
    )
    agent = _start_agent(config.replace(shm_arena_mb=32))  # the one field that differs

    async def node0() -> list[int]:
        pipeline = Pipeline(config)
        with pytest.raises(ConfigError, match="config field 'shm_arena_mb' differs") as raised:
            await pipeline.start()
        assert "node 0 has 64, the joining host has 32" in str(raised.value)
        return pipeline.pids

    try:
        pids = asyncio.run(node0())
        output, _ = agent.communicate(timeout=60)
    finally:
        agent.kill()
    assert agent.returncode == 2
    assert "node 0 refused node 1: config field 'shm_arena_mb' differs" in output
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


# Plain zmq, no mmsched (whose import pulls in torch): it says hello within a second.
_IMPOSTOR = """
import json, os, socket, sys
import orjson, zmq

address, config = sys.argv[1], json.loads(sys.argv[2])
context = zmq.Context()
raw = context.socket(zmq.DEALER)
raw.setsockopt(zmq.LINGER, 0)
raw.connect(address)
replies = []
for hello in ({"node_rank": 1, "pid": os.getpid()},
              {"node_rank": 1, "pid": os.getpid(), "config": "tp_size=2"},
              {"node_rank": 1, "pid": os.getpid(), "hostname": socket.gethostname(),
               "config": config, "probe": None}):
    raw.send(orjson.dumps(hello))
    if not raw.poll(30000):
        sys.exit("node 0 never answered")
    replies.append(orjson.loads(raw.recv()))
context.destroy(linger=0)
# A matching hello, and then nothing: not an agent.
print(json.dumps({"garbage": replies[:2], "token": "token" in replies[2]}))
"""


def _impostor(config: Config) -> dict[str, Any]:
    """A process that is not an agent: two malformed hellos, then a matching one for node
    1's slot, then it exits (as an agent that crashed right after its hello would)."""
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            _IMPOSTOR,
            HostAddresses.of(config).join,
            json.dumps(config.as_dict()),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_garbage_and_a_joiner_that_goes_silent_neither_fail_nor_keep_the_slot() -> None:
    """Real processes on loopback: before host 1's agent starts, a process that is not an
    agent sends node 0 a hello without a config, one with a string for a config, then a
    matching hello, and exits. Node 0's start neither fails nor waits for it: the slot is
    freed after ``timeout_s / 2`` of its silence, the real agent (told to retry meanwhile)
    takes it, and the group serves."""
    port = _free_port_pair()
    config = Config(
        tp_size=2,
        nnodes=2,
        dist_init_addr=f"127.0.0.1:{port}",
        shm_arena_mb=64,
        timeout_s=6,
        startup_timeout_s=45,
    )

    async def node0() -> float:
        pipeline = Pipeline(config)
        starting = asyncio.create_task(pipeline.start())
        try:
            seen = await asyncio.to_thread(_impostor, config)
            assert [r["error"][:15] for r in seen["garbage"]] == ["malformed hello"] * 2
            assert seen["token"]
            agent = _start_agent(config)
            began = time.monotonic()
            await starting  # neither the garbage nor the silent joiner failed it
            waited = time.monotonic() - began
            output = await pipeline.generate("after", [5, 9, 9, 5])
            assert output.output_ids == [5, 9, 9, 5]
        finally:
            if not starting.done():
                starting.cancel()
            await pipeline.aclose()
        out, _ = agent.communicate(timeout=60)
        assert agent.returncode == 0, out
        return waited

    waited = asyncio.run(node0())
    assert waited < 30


def test_a_joiner_that_never_starts_its_ranks_fails_start_naming_node_and_joiner() -> None:
    port = _free_port_pair()
    config = Config(
        tp_size=2, nnodes=2, dist_init_addr=f"127.0.0.1:{port}", timeout_s=2, startup_timeout_s=12
    )

    async def node0() -> list[int]:
        pipeline = Pipeline(config)
        starting = asyncio.create_task(pipeline.start())
        await asyncio.to_thread(_impostor, config)
        with pytest.raises(PeerLost) as raised:
            await starting
        message = str(raised.value)
        # Rank 0 too: it is ready once every other host has subscribed to its iterations.
        assert "ranks [0, 1] not ready" in message, message
        assert "node(s) [1] never joined" in message, message
        assert "node 1: its joiner (pid" in message and "went silent" in message, message
        return pipeline.pids

    for pid in asyncio.run(node0()):
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"


# -- simulated hosts ----------------------------------------------------------------------


@needs_namespaces
def test_two_hosts_of_four_ranks_carry_100_mb_once_per_link(tmp_path: Path) -> None:
    config = hosts_config(2, 8, "zero-copy", "zmq", shm_arena_mb=512)
    (record,) = run_hosts_fanout(config, [100.0], requests=3, warmup=1, work_dir=tmp_path)
    assert record.identical, "every rank on both hosts holds the tokenizer's bytes"
    assert record.clean, "no process and no /dev/shm entry left on either host"
    assert record.payload_bytes >= 0.99e8  # 100 MB of image features, to a whole pixel
    assert record.link_x_payload <= 1.05, record.link_bytes_per_request
    # What really left host 0's interface, TCP/IP framing and idle iterations included.
    assert record.nic_bytes_per_request <= 1.05 * record.payload_bytes


@needs_namespaces
def test_three_hosts_see_the_same_bytes(tmp_path: Path) -> None:
    config = hosts_config(3, 6, "zero-copy", "zmq", shm_arena_mb=128)
    (record,) = run_hosts_fanout(config, [8.0], requests=3, warmup=1, work_dir=tmp_path)
    assert record.identical and record.clean
    assert set(record.link_bytes_per_request) == {"1", "2"}
    assert record.link_x_payload <= 1.05, record.link_bytes_per_request


_FAULT_TIMEOUT_S = 6.0


def _two_simulated_hosts() -> tuple[Config, dict[str, str]]:
    """The config of the runs on two simulated hosts (TP=4, node 0 on host 0), and the
    environment that gives host 1's agent the same one."""
    config = Config(
        tp_size=4,
        nnodes=2,
        dist_init_addr=f"{address_of(0)}:29500",
        shm_arena_mb=64,
        timeout_s=_FAULT_TIMEOUT_S,
        startup_timeout_s=90,
    )
    env = {
        **_env(shm_arena_mb=64, timeout_s=_FAULT_TIMEOUT_S, startup_timeout_s=90),
        "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path]),
    }
    return config, env


def _wait_clean(hosts: SimulatedHosts) -> None:
    """Every host's processes and ``/dev/shm`` entries gone (within 10 s), or fail."""
    clean_by = time.monotonic() + 10
    while any(h.pids() or h.shm_entries() for h in hosts) and time.monotonic() < clean_by:
        time.sleep(0.1)
    for host in hosts:
        assert host.pids() == [], f"processes left on host {host.index}"
        assert host.shm_entries() == [], f"/dev/shm entries left on host {host.index}"


def _run_until_host_lost(tmp_path: Path, fault: str) -> tuple[dict[str, Any], float, int]:
    """Node 0 on host 0 keeps requests in flight; the real ``mmsched rank`` runs host 1;
    once requests flow, ``fault`` hits host 1. Returns node 0's outcomes, the fault's time
    and host 1's agent's exit code (``None`` when killed)."""
    timeout_s = _FAULT_TIMEOUT_S
    config, env = _two_simulated_hosts()
    spec = {
        "config": config.as_dict(),
        "ready": str(tmp_path / "ready"),
        "out": str(tmp_path / "node0.json"),
        "concurrency": 4,
        "run_for_s": 60,
    }
    with SimulatedHosts(2, shm_mb=256) as hosts:
        agent = hosts[1].popen(
            _rank_command(4, 1, config.dist_init_addr or ""),
            env=env,
            output=tmp_path / "node1.log",
        )
        node0 = hosts[0].popen(
            [sys.executable, str(TESTS / "host_roles.py"), json.dumps(spec)],
            env=env,
            output=tmp_path / "node0.log",
        )
        deadline = time.monotonic() + 90
        while not (tmp_path / "ready").exists():
            assert node0.poll() is None, (tmp_path / "node0.log").read_text()
            assert time.monotonic() < deadline, "the two hosts did not start"
            time.sleep(0.1)
        time.sleep(1.5)  # requests flow
        fault_at = time.monotonic()
        if fault == "cut":
            hosts[1].cut()
        else:
            hosts[1].kill_all()
        assert node0.wait(timeout_s + 30) == 0, (tmp_path / "node0.log").read_text()
        agent_code = agent.wait(timeout_s + 30)
        _wait_clean(hosts)
    result = json.loads((tmp_path / "node0.json").read_text())
    return result, fault_at, agent_code


def _check_in_flight_requests_failed(result: dict[str, Any], fault_at: float) -> None:
    outcomes = result["outcomes"]
    assert sum(o["kind"] == "ok" for o in outcomes if o["end"] < fault_at) >= 3
    after = [o for o in outcomes if o["end"] > fault_at]
    assert any(o["start"] < fault_at for o in after), "requests were in flight at the fault"
    timeout_s = _FAULT_TIMEOUT_S
    for o in after:
        assert o["end"] - fault_at <= timeout_s, o
        # A request whose every rank had reported before the fault may still be answered.
        if o["end"] - fault_at > 0.5:
            assert o["kind"] == "PeerLost", o
    assert any(o["kind"] == "PeerLost" for o in after)


@needs_namespaces
def test_a_cut_link_fails_requests_in_flight_and_both_hosts_clean_up(tmp_path: Path) -> None:
    result, cut_at, agent_code = _run_until_host_lost(tmp_path, "cut")
    _check_in_flight_requests_failed(result, cut_at)
    assert agent_code == 2, "host 1 stops on its own once node 0 goes silent"
    log = (tmp_path / "node1.log").read_text()
    assert "node 0 sent nothing for 3.0 s" in log


@needs_namespaces
def test_a_killed_host_fails_requests_in_flight_and_node_0_cleans_up(tmp_path: Path) -> None:
    result, killed_at, _ = _run_until_host_lost(tmp_path, "kill")
    _check_in_flight_requests_failed(result, killed_at)


@needs_namespaces
@pytest.mark.parametrize("fault", ["none", "host 1 killed"])
def test_a_servers_own_ranks_span_two_hosts(tmp_path: Path, fault: str) -> None:
    """A RankGroup of TP=4 over two simulated hosts: ranks 0-1 on host 0 (the entry rank
    admits host 1), ranks 2-3 on host 1 with the real ``mmsched rank --rendezvous`` as its
    agent, each host meeting in its own directory. Every rank sees the same requests with
    the same bytes, a malformed request fails alone on rank 0, and then either the group
    closes (every rank and the agent end cleanly) or host 1 is killed, which rank 0's
    ``publish`` notices within ``timeout_s``. Nothing is left on either host."""
    config, env = _two_simulated_hosts()
    config = config.replace(transport="zmq", payload_store="shm")
    rendezvous = [tmp_path / "host0", tmp_path / "host1"]
    for where in rendezvous:
        where.mkdir()

    def ranks_on(host: int, ranks: list[int]) -> list[str]:
        spec = {
            "role": "group",
            "config": config.as_dict(),
            "ranks": ranks,
            "rendezvous": str(rendezvous[host]),
            "iterations": 3,
            "until_lost": fault != "none",
            "published": str(tmp_path / "published"),
            "out": str(tmp_path / f"host{host}.json"),
        }
        return [sys.executable, str(TESTS / "host_roles.py"), json.dumps(spec)]

    def log(name: str) -> str:
        return (tmp_path / f"{name}.log").read_text()

    with SimulatedHosts(2, shm_mb=256) as hosts:
        agent = hosts[1].popen(
            [*_rank_command(4, 1, config.dist_init_addr or ""), "--rendezvous", str(rendezvous[1])],
            env={**env, "MMSCHED_TRANSPORT": "zmq", "MMSCHED_PAYLOAD_STORE": "shm"},
            output=tmp_path / "agent.log",
        )
        node0 = hosts[0].popen(ranks_on(0, [0, 1]), env=env, output=tmp_path / "node0.log")
        node1 = hosts[1].popen(ranks_on(1, [2, 3]), env=env, output=tmp_path / "node1.log")
        killed_at = None
        if fault != "none":
            deadline = time.monotonic() + 90
            while not (tmp_path / "published").exists():
                assert node0.poll() is None, log("node0")
                assert time.monotonic() < deadline, "the group did not start"
                time.sleep(0.05)
            time.sleep(0.5)  # empty iterations flow
            killed_at = time.monotonic()
            hosts[1].kill_all()
        assert node0.wait(120) == 0, log("node0")
        if killed_at is None:
            assert node1.wait(30) == 0, log("node1")
            assert agent.wait(30) == 0, log("agent")
        _wait_clean(hosts)
    for where in rendezvous[: 2 if killed_at is None else 1]:  # a killed host's stays
        assert os.listdir(where) == [], f"left in {where}"
    ranks = json.loads((tmp_path / "host0.json").read_text())["ranks"]
    if killed_at is None:
        ranks |= json.loads((tmp_path / "host1.json").read_text())["ranks"]
    entry = ranks.pop("0")
    assert entry["refused"] == [f"bad-{i}: InvalidMultimodalInput" for i in range(3)]
    assert [it["rids"] for it in entry["iterations"]] == [[f"good-{i}"] for i in range(3)]
    for rank, seen in ranks.items():
        assert seen["iterations"] == entry["iterations"], f"rank {rank} saw other requests"
        assert seen["ended"]["kind"] == "EndOfStream", seen["ended"]
    assert set(ranks) == ({"1", "2", "3"} if killed_at is None else {"1"})
    if killed_at is not None:
        assert entry["ended"]["kind"] == "PeerLost", entry["ended"]
        assert "node 1" in entry["ended"]["message"]
        assert entry["ended"]["at"] - killed_at <= _FAULT_TIMEOUT_S, entry["ended"]


@pytest.mark.parametrize("fault", ["a rank killed", "the agent terminated"])
def test_another_host_that_stops_fails_node_0_at_once(fault: str) -> None:
    """Two hosts on loopback: SIGKILL one of host 1's ranks, or SIGTERM host 1's agent; the
    agent tells node 0 why and stops, so node 0 fails with that cause (not after a heartbeat
    timeout), and nothing of either host is left."""
    port = _free_port_pair()
    config = Config(
        tp_size=4,
        nnodes=2,
        dist_init_addr=f"127.0.0.1:{port}",
        shm_arena_mb=64,
        timeout_s=30,
        startup_timeout_s=90,
    )
    agent = _start_agent(config)
    cause = {
        "a rank killed": r"node 1 stopped: scheduler rank [23] on node 1",
        "the agent terminated": r"node 1 stopped: its agent was stopped",
    }[fault]

    async def node0() -> tuple[list[int], list[int], float]:
        async with Pipeline(config) as pipeline:
            feature = torch.rand(1 << 18)
            items = {"mm_items": [{"modality": "image", "feature": feature, "offsets": [[1, 3]]}]}
            output = await pipeline.generate("before", [5, 9, 9, 5], items)
            assert output.output_ids[0] == 5
            remote = [p.pid for p in rank_processes_of(agent.pid)]
            assert len(remote) == 2, "host 1 runs ranks 2 and 3"
            hit_at = time.monotonic()
            if fault == "a rank killed":
                os.kill(remote[1], signal.SIGKILL)
            else:
                agent.terminate()
            with pytest.raises(PeerLost, match=cause):
                for i in range(200):
                    await pipeline.generate(f"after{i}", [5, 9, 9, 5], items)
                    await asyncio.sleep(0.05)
            return pipeline.pids, remote, time.monotonic() - hit_at

    try:
        node0_pids, remote, failed_in = asyncio.run(node0())
        output, _ = agent.communicate(timeout=60)
    finally:
        agent.kill()
    assert failed_in < 5, "the agent reports it; no heartbeat timeout (15 s) is waited"
    assert agent.returncode == (2 if fault == "a rank killed" else 130), output
    for pid in [*node0_pids, *remote, agent.pid]:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
    assert not segments_of([os.getpid(), agent.pid])


@pytest.mark.parametrize(
    ("transport", "strategy", "store"),
    [
        ("torch", "entry-broadcast", "inline"),
        ("shm", "per-rank", "inline"),
        ("zmq", "tokenizer", "shm"),
    ],
)
def test_every_transport_and_strategy_spans_two_hosts(
    transport: str, strategy: str, store: str
) -> None:
    """Two hosts on loopback (shared /dev/shm, separate stores): each host's group runs over
    ``transport``, with the other host's agent as its sender; every rank of both hosts holds
    the tokenizer's bytes, and a peer without the run's token hears none of it."""
    from mmsched import MultimodalInputs, RankTimings

    port = _free_port_pair()
    config = Config(
        tp_size=4,
        nnodes=2,
        dist_init_addr=f"127.0.0.1:{port}",
        transport=transport,
        strategy=strategy,
        payload_store=store,
        shm_arena_mb=64,
        timeout_s=30,
        startup_timeout_s=90,
    )
    spec = json.dumps({"config": config.as_dict()})
    agent = subprocess.Popen(
        [sys.executable, "-m", "mmsched.bench.hosts", "agent", "1", spec],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip

    async def node0() -> None:
        async with Pipeline(config, probe=RankTimings(digest_prefix="check-")) as pipeline:
            # A stranger on the iterations port, without the run's token, gets nothing.
            context = zmq.asyncio.Context()
            stranger = context.socket(zmq.SUB)
            stranger.setsockopt(zmq.SUBSCRIBE, b"")
            stranger.setsockopt(zmq.LINGER, 0)
            stranger.connect(HostAddresses.of(config).iterations)
            for i in range(3):
                feature = torch.rand(1 << 19)  # 2 MB, fresh each request
                items = {
                    "mm_items": [{"modality": "image", "feature": feature, "offsets": [[1, 3]]}]
                }
                trace = await pipeline.generate_traced(f"check-{i}", [5, 9, 9, 5], items)
                expected = MultimodalInputs.from_dict(items, hasher=config.hasher)
                digests = {r.rank: r.data["content_digest"] for r in trace.reports}
                assert digests == dict.fromkeys(range(4), expected.content_digest())
            assert not await stranger.poll(timeout=500), "an iteration reached a stranger"
            context.destroy(linger=0)

    try:
        asyncio.run(node0())
        output, _ = agent.communicate(timeout=60)
    finally:
        agent.kill()
    assert agent.returncode == 0, output


def test_a_host_that_never_joins_fails_start_naming_it() -> None:
    port = _free_port_pair()
    config = Config(tp_size=2, nnodes=2, dist_init_addr=f"127.0.0.1:{port}", startup_timeout_s=3)

    async def node0() -> list[int]:
        pipeline = Pipeline(config)
        with pytest.raises(PeerLost, match=r"node\(s\) \[1\] never joined at 127\.0\.0\.1"):
            await pipeline.start()
        return pipeline.pids

    for pid in asyncio.run(node0()):
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
