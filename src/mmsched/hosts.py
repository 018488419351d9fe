"""Ranks on several hosts: where node 0 listens, and how another host's agent joins it.

A group of ``tp_size`` ranks on ``nnodes`` hosts has ``tp_size / nnodes`` ranks on each.
Node 0 is the process that runs the [`Pipeline`][mmsched.pipeline.Pipeline] (its ranks
included); every other host runs one agent ([`mmsched.node`][], ``mmsched rank
--node-rank K``) that starts that host's ranks. From ``dist_init_addr = HOST:PORT`` (node 0's
address) every port follows, so that a firewall needs three rules:

- ``PORT``: joining. Node 0 answers each agent's hello (its node rank and its whole config)
  with the run's token, or with a refusal that names the first config field that differs;
  a mismatch also fails node 0's ``start``. A hello after the group is complete, or a
  second one for the same node, is refused and changes nothing.
- ``PORT+1``: results. Every rank, wherever it runs, reports to the tokenizer here (with
  the token, as on one host), and each agent sends its heartbeats here.
- ``PORT+2``: iterations. Node 0's entry rank publishes each iteration's messages here once,
  tensors inline; each agent receives them once and writes them into its own host's payload
  store for its ranks ([`mmsched.node`][]).

Trust: ``PORT+1`` and ``PORT+2`` accept only peers that present the run's token, but
whoever reaches ``PORT`` with a matching config gets it, as torch.distributed's rendezvous
store serves any peer: these ports must be reachable from the deployment's hosts only (a
private network).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
import zmq
import zmq.asyncio

from mmsched.config import Config, split_host_port
from mmsched.errors import ConfigError, PeerLost

log = logging.getLogger(__name__)

NODE_LOCAL_FIELDS = frozenset({"requests_address", "results_address"})
"""Config fields that may differ between hosts (node 0's own sockets)."""

_HELLO_MAX_BYTES = 64 << 10


@dataclass(frozen=True)
class HostAddresses:
    """Node 0's three endpoints, from ``dist_init_addr`` (see the module docstring)."""

    join: str
    results: str
    iterations: str

    @classmethod
    def of(cls, config: Config) -> HostAddresses:
        """Raises ``ConfigError`` when ``config`` names no ``dist_init_addr``."""
        if config.dist_init_addr is None:
            raise ConfigError("several hosts need dist_init_addr (node 0's HOST:PORT)")
        host, port = split_host_port(config.dist_init_addr)
        return cls(f"tcp://{host}:{port}", f"tcp://{host}:{port + 1}", f"tcp://{host}:{port + 2}")


def heartbeat_period_s(config: Config) -> float:
    """How often an agent reports; a host silent for ``host_lost_after_s`` is lost."""
    return min(1.0, config.timeout_s / 8)


def host_lost_after_s(config: Config) -> float:
    """Silence after which node 0 counts a host as lost: half of ``timeout_s``, so that a
    request in flight when a host goes fails within ``timeout_s``."""
    return config.timeout_s / 2


def config_mismatch(ours: Config, theirs: Any) -> str | None:
    """The first field where ``theirs`` (another host's ``Config.as_dict()``) differs from
    ``ours``, described; ``None`` when they agree on every field that must agree."""
    if not isinstance(theirs, dict):
        return "its config is not a table of fields"
    mine = ours.as_dict()
    for name in sorted(set(mine) | set(theirs)):
        if name in NODE_LOCAL_FIELDS:
            continue
        if name not in theirs:
            return f"config field {name!r} is missing on the joining host"
        if name not in mine:
            return f"config field {name!r} is unknown to node 0"
        if theirs[name] != mine[name]:
            return (
                f"config field {name!r} differs: node 0 has {mine[name]!r}, "
                f"the joining host has {theirs[name]!r}"
            )
    return None


class JoinServer:
    """Node 0's side of joining: a ROUTER at ``PORT`` answering hellos (see the module
    docstring). ``on_mismatch`` is told of a config mismatch, which must fail the start."""

    def __init__(
        self,
        context: zmq.asyncio.Context,
        config: Config,
        token: str,
        on_mismatch: Callable[[ConfigError], None],
        probe: str | None = None,
    ) -> None:
        self.config = config
        self.probe = probe
        self._token = token
        self._on_mismatch = on_mismatch
        self.joined: dict[int, int] = {}  # node rank -> its agent's pid
        self._socket = context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.MAXMSGSIZE, _HELLO_MAX_BYTES)
        address = HostAddresses.of(config).join
        try:
            self._socket.bind(address)
        except zmq.ZMQError as exc:
            self._socket.close()
            raise ConfigError(f"cannot listen for hosts at {address}: {exc}") from exc

    async def serve(self) -> None:
        """Answer hellos until cancelled; a malformed one gets a refusal, nothing else."""
        while True:
            parts = await self._socket.recv_multipart()
            if len(parts) != 2:
                continue  # not a DEALER's single-frame message: nothing to answer
            identity, body = parts
            reply = self._answer(body)
            await self._socket.send_multipart([identity, orjson.dumps(reply)])

    def _answer(self, body: bytes) -> dict[str, Any]:
        try:
            hello = orjson.loads(body)
            node = hello["node_rank"]
            pid = hello["pid"]
            if type(node) is not int or type(pid) is not int:
                raise TypeError("node_rank and pid must be integers")
        except Exception as exc:
            log.warning("refused a malformed hello: %r", exc)
            return {"error": f"malformed hello: {exc}"}
        refusal = self._refusal(node, hello.get("config"), hello.get("probe"))
        if refusal is not None:
            log.warning("refused node %d (pid %d): %s", node, pid, refusal)
            return {"error": refusal}
        self.joined[node] = pid
        log.info("node %d joined (pid %d on %s)", node, pid, hello.get("hostname"))
        return {"token": self._token}

    def _refusal(self, node: int, config: Any, probe: Any) -> str | None:
        if not 0 < node < self.config.nnodes:
            return f"node rank {node} is not one of 1..{self.config.nnodes - 1}"
        if node in self.joined:
            return f"node {node} has joined already (pid {self.joined[node]})"
        mismatch = config_mismatch(self.config, config)
        if mismatch is None and probe != self.probe:
            # A probe that reports makes every answer wait for every rank's report.
            mismatch = f"node 0 runs with probe {self.probe!r}, the joining host with {probe!r}"
        if mismatch is not None:
            self._on_mismatch(ConfigError(f"node {node} cannot join: {mismatch}"))
        return mismatch

    def close(self) -> None:
        self._socket.close()


def probe_name(probe: object | None) -> str | None:
    """What a hello says of a [probe][mmsched.probes] (its class), compared at join."""
    return None if probe is None else type(probe).__qualname__


async def join(config: Config, node_rank: int, probe: str | None = None) -> str:
    """An agent's side: introduce this host to node 0; returns the run's token.

    Waits up to ``startup_timeout_s`` for node 0 (which may start after this host).

    Raises:
        ConfigError: node 0 refused this host (its message names the field that differs).
        PeerLost: no answer within ``startup_timeout_s``.
    """
    address = HostAddresses.of(config).join
    context = zmq.asyncio.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    try:
        dealer.connect(address)
        hello = {
            "node_rank": node_rank,
            "pid": os.getpid(),
            "hostname": socket.gethostname(),
            "config": config.as_dict(),
            "probe": probe,
        }
        await dealer.send(orjson.dumps(hello))
        if not await dealer.poll(timeout=int(config.startup_timeout_s * 1000)):
            raise PeerLost(
                f"node 0 did not answer at {address} within "
                f"startup_timeout_s={config.startup_timeout_s}"
            )
        reply = orjson.loads(await dealer.recv())
    finally:
        context.destroy(linger=0)
    if not isinstance(reply, dict):
        raise PeerLost(f"node 0 at {address} answered with something other than a table")
    if "error" in reply:
        raise ConfigError(f"node 0 refused node {node_rank}: {reply['error']}")
    token = reply.get("token")
    if not isinstance(token, str):
        raise PeerLost(f"node 0 at {address} answered without a token")
    return token
