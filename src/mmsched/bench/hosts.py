"""``mmsched bench fanout --hosts N``: the fan-out when the ranks span several hosts.

The hosts are simulated on this machine ([`mmsched.simhosts`][]): each a network namespace
with its own address and its own ``/dev/shm``, joined to the others by a veth link through
one bridge. Host 0 runs the pipeline (node 0: the tokenizer and its ``tp / hosts`` ranks);
every other host runs a node agent ([`mmsched.node`][]) with its ranks, and a plain TCP sink
for the floor. Every request carries fresh, distinct bytes made before its clock starts (a
new tensor in ordinary memory, as a processor's output is), one request at a time.

Measured per request, on every host's ranks (``consume="none"``: a rank holds usable
tensors; CLOCK_MONOTONIC is one clock here, the hosts being one kernel):

- latency: from the call into the pipeline to the last rank of all hosts holding the
  inputs, and to the last of node 0's own ranks;
- the floor, right after each request: the same number of fresh bytes sent once over a
  plain TCP connection from host 0 to host 1 and acknowledged, the least any design must
  spend to get them across; a row's floor is the median of its requests';
- bytes per link: what each host's agent received over the cross-host transport
  (its statistics, reported in its heartbeat) per request, over the payload; and what left
  host 0's network interface while the request ran (framing, heartbeats and idle
  iterations included), per other host;
- identity: every rank's digest of all bytes it holds against the tokenizer's, for the
  warm-up requests and the last timed one; every rank's fingerprint for every request.

After the run each host must be clean: no process left in its namespace, nothing in its
``/dev/shm``; the record says whether it was.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mmsched.bench import DESIGN_STORE
from mmsched.config import Config
from mmsched.errors import ConfigError
from mmsched.hashing import tensor_bytes
from mmsched.hosts import heartbeat_period_s
from mmsched.inputs import MultimodalInputs
from mmsched.messages import NodeStatus
from mmsched.pipeline import Pipeline
from mmsched.probes import RankTimings
from mmsched.simhosts import SimulatedHosts, address_of, available
from mmsched.tokenizer import RequestTrace

from .fanout import _identical, _latency_ms
from .workloads import FreshPayloads, ordinary_memory

SINK_PORT = 29400
JOIN_PORT = 29500
_CHECK = "check-"


@dataclass
class HostsRecord:
    """One (hosts, tp, size) result of the multi-host fan-out; ``--json`` writes these."""

    hosts: int
    tp: int
    strategy: str
    transport: str
    payload_store: str
    hasher: str
    size_mb: float
    payload_bytes: int
    requests: int
    latency_ms: dict[str, float]  # to the last rank of every host: p50, p90, max
    node0_latency_ms: dict[str, float]  # to the last of node 0's own ranks
    floor_ms: float  # one TCP crossing of the same bytes, host 0 to host 1 (median)
    link_bytes_per_request: dict[str, float]  # by node: cross-host transport statistics
    nic_bytes_per_request: float  # left host 0's interface, per request and other host
    identical: bool
    clean: bool = True  # no process, no /dev/shm entry left on any host
    consume: str = "none"
    bench: str = "fanout-hosts"

    @property
    def link_x_payload(self) -> float:
        """The most bytes any link carried per request, over the payload: 1.0 is once."""
        worst = max(self.link_bytes_per_request.values(), default=0.0)
        return worst / self.payload_bytes if self.payload_bytes else float("nan")

    @property
    def x_floor(self) -> float:
        return self.latency_ms["p50"] / self.floor_ms if self.floor_ms > 0 else float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "link_x_payload": self.link_x_payload, "x_floor": self.x_floor}


def _percentiles(values: Sequence[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "p50": statistics.median(ordered),
        "p90": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
        "max": ordered[-1],
    }


def hosts_config(hosts: int, tp: int, strategy: str, transport: str, **values: Any) -> Config:
    """The config every simulated host runs with (node 0 at host 0's address)."""
    if tp % hosts:
        raise ConfigError(f"--tp {tp} cannot be spread evenly over --hosts {hosts}")
    return Config(
        tp_size=tp,
        nnodes=hosts,
        dist_init_addr=f"{address_of(0)}:{JOIN_PORT}",
        strategy=strategy,
        transport=transport,
        payload_store=values.pop("payload_store", DESIGN_STORE),
        **values,
    )


def run_hosts_fanout(
    config: Config,
    sizes_mb: Sequence[float],
    *,
    requests: int = 20,
    warmup: int = 2,
    work_dir: Path,
    on_record: Callable[[HostsRecord], None] | None = None,
) -> list[HostsRecord]:
    """Run the benchmark on ``config.nnodes`` simulated hosts; one record per size.

    Raises:
        ConfigError: simulated hosts cannot be made here (the message says why).
        RuntimeError: a host's process failed (its output is in ``work_dir``).
    """
    why_not = available()
    if why_not is not None:
        raise ConfigError(f"bench fanout --hosts: {why_not}")
    work_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        "config": config.as_dict(),
        "sizes_mb": list(sizes_mb),
        "requests": requests,
        "warmup": warmup,
        "out": str(work_dir / "node0.json"),
    }
    python = [sys.executable, "-m", "mmsched.bench.hosts"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    with SimulatedHosts(config.nnodes) as hosts:
        sink = hosts[1].popen(
            [*python, "sink", str(SINK_PORT)], env=env, output=work_dir / "sink.log"
        )
        agents = [
            hosts[k].popen(
                [*python, "agent", str(k), json.dumps(spec)],
                env=env,
                output=work_dir / f"node{k}.log",
            )
            for k in range(1, config.nnodes)
        ]
        node0 = hosts[0].popen(
            [*python, "node0", json.dumps(spec)], env=env, output=work_dir / "node0.log"
        )
        limit = config.startup_timeout_s + 600
        try:
            code = node0.wait(limit)
            agent_codes = [a.wait(config.timeout_s + 30) for a in agents]
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"a host did not finish; see {work_dir}") from exc
        sink.kill()
        sink.wait()
        clean = _wait_clean(hosts)
        if code != 0 or any(agent_codes):
            raise RuntimeError(
                f"node 0 exited {code}, agents {agent_codes}; see the logs in {work_dir}"
            )
    derived = ("link_x_payload", "x_floor")
    records = [
        HostsRecord(**{k: v for k, v in r.items() if k not in derived})
        for r in json.loads((work_dir / "node0.json").read_text())
    ]
    for record in records:
        record.clean = clean
        if on_record is not None:
            on_record(record)
    return records


def _wait_clean(hosts: SimulatedHosts, wait_s: float = 10.0) -> bool:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if not any(h.pids() or h.shm_entries() for h in hosts):
            return True
        time.sleep(0.1)
    return False


# -- the roles, each run on its simulated host: python -m mmsched.bench.hosts ROLE ... -----


def _sink(port: int) -> None:
    """Host 1: acknowledge each length-prefixed block of bytes received (the floor)."""
    server = socket.create_server((address_of(1), port))
    conn, _ = server.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buffer = bytearray()
    while True:
        head = conn.recv(8, socket.MSG_WAITALL)
        if len(head) < 8:
            return
        (nbytes,) = struct.unpack("!Q", head)
        if len(buffer) < nbytes:
            buffer = bytearray(nbytes)
        view = memoryview(buffer)[:nbytes]
        while view:
            got = conn.recv_into(view)
            if got == 0:
                return
            view = view[got:]
        conn.sendall(b"k")


class _Crossing:
    """Host 0's end of the floor: one TCP crossing of ``nbytes``, acknowledged."""

    def __init__(self) -> None:
        deadline = time.monotonic() + 30
        while True:
            try:
                self.conn = socket.create_connection((address_of(1), SINK_PORT), timeout=30)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def measure_ms(self, data: memoryview) -> float:
        start = time.monotonic()
        self.conn.sendall(struct.pack("!Q", data.nbytes))
        self.conn.sendall(data)
        if self.conn.recv(1) != b"k":
            raise RuntimeError("the floor's sink went away")
        return (time.monotonic() - start) * 1000


def _nic_sent() -> int:
    return int(Path("/sys/class/net/eth0/statistics/tx_bytes").read_text())


async def _latest_status(pipeline: Pipeline) -> dict[int, NodeStatus]:
    """Every host's status from a heartbeat sent after now: its counters cover all that
    was sent before."""
    await asyncio.sleep(2 * heartbeat_period_s(pipeline.config) + 0.5)
    return pipeline.node_status()


async def _node0(spec: dict[str, Any]) -> None:
    config = Config.from_dict(spec["config"])
    per_node = config.ranks_per_node
    records = []
    crossing = _Crossing()
    async with Pipeline(config, probe=RankTimings(digest_prefix=_CHECK)) as pipeline:
        for size in spec["sizes_mb"]:
            payloads = FreshPayloads(size)
            identical = True
            for w in range(spec["warmup"]):
                identical &= await _request(pipeline, payloads, f"{_CHECK}w{size}-{w}", [])
            before = await _latest_status(pipeline)
            traces: list[RequestTrace] = []
            floors = []
            payload_bytes = nic_bytes = 0
            for i in range(spec["requests"]):
                last = i == spec["requests"] - 1
                rid = f"{_CHECK}{size}-{i}" if last else f"r{size}-{i}"
                # Around the request only: the floor's own bytes cross the same interface.
                nic_before = _nic_sent()
                identical &= await _request(pipeline, payloads, rid, traces)
                nic_bytes += _nic_sent() - nic_before
                twin = payloads.next(ordinary_memory)
                feature = twin.mm_inputs["mm_items"][0]["feature"]
                payload_bytes = feature.numel() * feature.element_size()
                floors.append(crossing.measure_ms(tensor_bytes(feature)))
                del twin, feature
            after = await _latest_status(pipeline)
            n = spec["requests"]
            records.append(
                HostsRecord(
                    hosts=config.nnodes,
                    tp=config.tp_size,
                    strategy=config.strategy,
                    transport=config.transport,
                    payload_store=config.payload_store,
                    hasher=config.hasher,
                    size_mb=size,
                    payload_bytes=payload_bytes,
                    requests=n,
                    latency_ms=_percentiles([_latency_ms(t) for t in traces]),
                    node0_latency_ms=_percentiles([_node0_latency_ms(t, per_node) for t in traces]),
                    floor_ms=statistics.median(floors),
                    link_bytes_per_request={
                        str(node): (after[node].bytes_received - before[node].bytes_received) / n
                        for node in sorted(after)
                    },
                    nic_bytes_per_request=nic_bytes / n / (config.nnodes - 1),
                    identical=identical,
                )
            )
    Path(spec["out"]).write_text(json.dumps([r.as_dict() for r in records], default=str))


def _node0_latency_ms(trace: RequestTrace, per_node: int) -> float:
    """To the last of node 0's own ranks (ranks ``0 .. per_node - 1``)."""
    ready = max(float(r.data["ready_at"]) for r in trace.reports if r.rank < per_node)
    return (ready - trace.created_at) * 1000


async def _request(
    pipeline: Pipeline, payloads: FreshPayloads, rid: str, traces: list[RequestTrace]
) -> bool:
    sample = await asyncio.to_thread(payloads.next, ordinary_memory)
    digest = None
    if rid.startswith(_CHECK):
        built = MultimodalInputs.from_dict(sample.mm_inputs, hasher=pipeline.config.hasher)
        digest = built.content_digest()
    trace = await pipeline.generate_traced(rid, sample.input_ids, sample.mm_inputs)
    traces.append(trace)
    return _identical(trace, pipeline.config.tp_size, digest)


def _main(argv: Sequence[str]) -> None:
    role = argv[0]
    if role == "sink":
        _sink(int(argv[1]))
    elif role == "agent":
        from mmsched.node import run_node

        spec = json.loads(argv[2])
        config = Config.from_dict(spec["config"])
        run_node(config, int(argv[1]), probe=RankTimings(digest_prefix=_CHECK))
    elif role == "node0":
        asyncio.run(_node0(json.loads(argv[1])))
    else:
        raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    _main(sys.argv[1:])
