"""Ranks on several hosts: where node 0 listens, and how another host's agent joins it.

A group of ``tp_size`` ranks on ``nnodes`` hosts has ``tp_size / nnodes`` ranks on each.
Node 0 is the process that runs the [`Pipeline`][mmsched.pipeline.Pipeline] (its ranks
included); every other host runs one agent ([`mmsched.node`][], ``mmsched rank
--node-rank K``) that starts that host's ranks. From ``dist_init_addr = HOST:PORT`` (node 0's
address) every port follows, so that a firewall needs three rules:

- ``PORT``: joining. Node 0 answers each agent's hello (its node rank and its whole config)
  with the run's token, or with a refusal that names the first config field that differs;
  a mismatch also fails node 0's ``start``. A malformed hello (no config table, a node rank
  or pid that is not an integer, bytes that are not JSON) is refused and changes nothing.
  A hello with the token *claims* the node's slot; the claim holds only while the joiner
  shows it is alive (its agent's heartbeats, which start right after the hello) and
  becomes the node's for good once the agent says its ranks are started. A claimant silent
  for ``timeout_s / 2`` (it died after its hello, or it never was an agent) frees the slot:
  meanwhile another hello for it is told to retry (the agent does, up to
  ``startup_timeout_s``), after that the next one takes it. A hello for a node that has
  joined is refused and changes nothing.
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

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
import zmq
import zmq.asyncio

from mmsched.config import Config, split_host_port
from mmsched.errors import ConfigError, PeerLost
from mmsched.messages import NodeStatus

log = logging.getLogger(__name__)

NODE_LOCAL_FIELDS = frozenset({"requests_address", "results_address"})
"""Config fields that may differ between hosts (node 0's own sockets)."""

_HELLO_MAX_BYTES = 64 << 10
_RETRY_S = 0.5  # how soon an agent told to wait for a claimed slot says hello again


@dataclass(frozen=True)
class Hello:
    """An agent's hello, checked: what node 0 acts on."""

    node_rank: int
    pid: int
    hostname: str
    config: dict[str, Any]
    probe: str | None
    own_ranks: bool = False  # the agent feeds the server's own ranks (a RankGroup's)

    @classmethod
    def parse(cls, body: bytes) -> Hello:
        """The hello in ``body`` (foreign bytes).

        Raises:
            ValueError: not a hello: not a JSON table, a node rank or pid that is not a
                positive integer, a config that is not a table of named fields, a probe or
                host name that is not text.
        """
        try:
            hello = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"not JSON: {exc}") from None
        if not isinstance(hello, dict):
            raise ValueError("not a table")
        node, pid = hello.get("node_rank"), hello.get("pid")
        if type(node) is not int or type(pid) is not int or pid <= 0:
            raise ValueError("node_rank and pid must be integers (pid positive)")
        config = hello.get("config")
        if not isinstance(config, dict) or not all(isinstance(k, str) for k in config):
            raise ValueError(f"config must be a table of fields, got {type(config).__name__}")
        probe, hostname = hello.get("probe"), hello.get("hostname", "?")
        if not (probe is None or isinstance(probe, str)) or not isinstance(hostname, str):
            raise ValueError("probe and hostname must be text")
        own_ranks = hello.get("own_ranks", False)
        if type(own_ranks) is not bool:
            raise ValueError("own_ranks must be true or false")
        return cls(node, pid, hostname[:200], config, probe, own_ranks)


@dataclass
class Claim:
    """A node's slot, taken by the joiner whose hello got the token.

    Attributes:
        pid: the joiner's pid, as its hello and its heartbeats say.
        hostname: where it said it runs.
        since: ``time.monotonic()`` of its hello.
        seen: ``time.monotonic()`` of its last sign of life (the hello, a heartbeat).
        joined: its agent said its ranks are started: the slot is the node's for good.
    """

    pid: int
    hostname: str
    since: float
    seen: float
    joined: bool = False

    def describe(self, now: float) -> str:
        return f"pid {self.pid} on {self.hostname}, said hello {now - self.since:.1f} s ago"


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


def lost_host(
    config: Config, seen: Mapping[int, float], failure: PeerLost | None = None
) -> PeerLost | None:
    """Node 0's verdict on the other hosts: ``failure`` (a host's own report that it
    stopped), or the first host silent for ``host_lost_after_s`` by ``seen`` (node rank ->
    ``time.monotonic()`` of its last heartbeat); ``None`` while every host is heard from."""
    if failure is not None:
        return failure
    silent_for = host_lost_after_s(config)
    now = time.monotonic()
    for node, last in seen.items():
        if now - last > silent_for:
            return PeerLost(
                f"node {node} sent no heartbeat for {silent_for:.1f} s (timeout_s / 2): "
                "the host is gone, or the link to it is cut"
            )
    return None


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
    docstring). ``on_mismatch`` is told of a config mismatch, which must fail the start;
    the tokenizer passes each agent's heartbeat to [`heard`][mmsched.hosts.JoinServer.heard],
    which keeps the claims alive. ``own_ranks``: node 0 is a server's own group (a
    [`RankGroup`][mmsched.rank_group.RankGroup]), whose agents start no ranks."""

    def __init__(
        self,
        context: zmq.asyncio.Context,
        config: Config,
        token: str,
        on_mismatch: Callable[[ConfigError], None],
        probe: str | None = None,
        *,
        own_ranks: bool = False,
    ) -> None:
        self.config = config
        self.probe = probe
        self.own_ranks = own_ranks
        self._token = token
        self._on_mismatch = on_mismatch
        self.claims: dict[int, Claim] = {}  # node rank -> who holds its slot
        # Why a node's last hello was refused, or its last claim lapsed: for the message of
        # a start that times out waiting for it.
        self._last_trouble: dict[int, str] = {}
        # A claimant silent this long is gone: the bound after which a live host that went
        # silent counts as lost, used for one that has not finished joining too.
        self.claim_lapses_after_s = host_lost_after_s(config)
        self._socket = context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.MAXMSGSIZE, _HELLO_MAX_BYTES)
        address = HostAddresses.of(config).join
        try:
            self._socket.bind(address)
        except zmq.ZMQError as exc:
            self._socket.close()
            raise ConfigError(f"cannot listen for hosts at {address}: {exc}") from exc

    @property
    def joined(self) -> dict[int, int]:
        """The nodes whose agent finished joining (ranks started), and its pid."""
        return {node: c.pid for node, c in self.claims.items() if c.joined}

    async def serve(self) -> None:
        """Answer hellos until cancelled; a malformed one gets a refusal, nothing else."""
        while True:
            parts = await self._socket.recv_multipart()
            if len(parts) != 2:
                continue  # not a DEALER's single-frame message: nothing to answer
            identity, body = parts
            try:
                reply = self._answer(body)
            except Exception as exc:  # foreign bytes must never end the join port
                log.exception("join port: answering a hello failed")
                reply = {"error": f"node 0 could not answer: {type(exc).__name__}"}
            await self._socket.send_multipart([identity, orjson.dumps(reply)])

    def heard(self, status: NodeStatus) -> Claim | None:
        """An agent's heartbeat: the claim of the joiner it comes from, if that joiner
        holds its node's slot (the tokenizer counts only those; another process's are stale
        or foreign). A heartbeat that says the agent's ranks are started completes the
        join."""
        claim = self.claims.get(status.node)
        if claim is None or claim.pid != status.pid:
            return None
        claim.seen = time.monotonic()
        if status.ready is True and not claim.joined:
            claim.joined = True
            log.info("node %d joined: its ranks are started (pid %d)", status.node, claim.pid)
        return claim

    def waiting_for(self) -> str:
        """The nodes that have not joined yet, and what became of each (for the message
        of a start that timed out)."""
        now = time.monotonic()
        self._free_lapsed(now)
        parts = []
        for node in range(1, self.config.nnodes):
            claim = self.claims.get(node)
            if claim is not None and claim.joined:
                continue
            if claim is not None:
                parts.append(f"node {node}: {claim.describe(now)}, ranks not started yet")
            elif node in self._last_trouble:
                parts.append(f"node {node}: {self._last_trouble[node]}")
            else:
                parts.append(f"node {node}: no hello at {self.config.dist_init_addr}")
        return "; ".join(parts)

    def _answer(self, body: bytes) -> dict[str, Any]:
        try:
            hello = Hello.parse(body)
        except ValueError as exc:
            log.warning("refused a malformed hello: %s", exc)
            return {"error": f"malformed hello: {exc}"}
        node = hello.node_rank
        now = time.monotonic()
        self._free_lapsed(now)
        claim = self.claims.get(node)
        if claim is not None and claim.pid != hello.pid:
            if claim.joined:
                joined = f"node {node} has joined already (pid {claim.pid})"
                log.warning("refused node %d (pid %d): %s", node, hello.pid, joined)
                return {"error": joined}
            wait = claim.seen + self.claim_lapses_after_s - now
            log.info("node %d (pid %d) waits: its slot is claimed", node, hello.pid)
            return {
                "error": f"node {node}'s slot is claimed by {claim.describe(now)}: it is "
                f"freed if that joiner stays silent for {wait:.1f} s more",
                "retry": True,
            }
        refusal = self._refusal(node, hello)
        if refusal is not None:
            log.warning("refused node %d (pid %d): %s", node, hello.pid, refusal)
            if 0 < node < self.config.nnodes:
                self._last_trouble[node] = f"a hello was refused: {refusal}"
            return {"error": refusal}
        if claim is None:  # a repeated hello from the claimant keeps its claim
            self.claims[node] = Claim(hello.pid, hello.hostname, now, now)
            log.info("node %d claimed by pid %d on %s", node, hello.pid, hello.hostname)
        return {"token": self._token}

    def _free_lapsed(self, now: float) -> None:
        for node, claim in list(self.claims.items()):
            if not claim.joined and now - claim.seen > self.claim_lapses_after_s:
                why = (
                    f"its joiner ({claim.describe(now)}) went silent for "
                    f"{now - claim.seen:.1f} s before its ranks started"
                )
                log.warning("node %d's slot is free again: %s", node, why)
                self._last_trouble[node] = why
                del self.claims[node]

    def _refusal(self, node: int, hello: Hello) -> str | None:
        if not 0 < node < self.config.nnodes:
            return f"node rank {node} is not one of 1..{self.config.nnodes - 1}"
        mismatch = config_mismatch(self.config, hello.config)
        if mismatch is None and hello.probe != self.probe:
            # A probe that reports makes every answer wait for every rank's report.
            mismatch = (
                f"node 0 runs with probe {self.probe!r}, the joining host with {hello.probe!r}"
            )
        if mismatch is None and hello.own_ranks != self.own_ranks:
            # Ranks an agent started would report to a tokenizer that is not there, and a
            # pipeline would wait for ranks that no agent starts.
            mismatch = (
                "node 0 is a server's own group (RankGroup): start the joining host's agent "
                "with --rendezvous, where that host's ranks meet"
                if self.own_ranks
                else "node 0 runs a Pipeline, whose agents start their host's ranks: start "
                "the joining host's agent without --rendezvous"
            )
        if mismatch is not None:
            self._on_mismatch(ConfigError(f"node {node} cannot join: {mismatch}"))
        return mismatch

    def close(self) -> None:
        self._socket.close()


def probe_name(probe: object | None) -> str | None:
    """What a hello says of a [probe][mmsched.probes] (its class), compared at join."""
    return None if probe is None else type(probe).__qualname__


async def join(
    config: Config, node_rank: int, probe: str | None = None, *, own_ranks: bool = False
) -> str:
    """An agent's side: introduce this host to node 0; returns the run's token.
    ``own_ranks``: the agent feeds the server's own ranks instead of starting its own.

    Waits up to ``startup_timeout_s`` for node 0 (which may start after this host), and for
    this node's slot while another joiner claims it (node 0 tells it to retry).

    Raises:
        ConfigError: node 0 refused this host (its message names the field that differs).
        PeerLost: no answer within ``startup_timeout_s``, or the slot stayed claimed.
    """
    address = HostAddresses.of(config).join
    deadline = time.monotonic() + config.startup_timeout_s
    context = zmq.asyncio.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    hello = orjson.dumps(
        {
            "node_rank": node_rank,
            "pid": os.getpid(),
            "hostname": socket.gethostname(),
            "config": config.as_dict(),
            "probe": probe,
            "own_ranks": own_ranks,
        }
    )
    try:
        dealer.connect(address)
        while True:
            await dealer.send(hello)
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0 or not await dealer.poll(timeout=remaining_ms):
                raise PeerLost(
                    f"node 0 did not answer at {address} within "
                    f"startup_timeout_s={config.startup_timeout_s}"
                )
            try:
                reply = orjson.loads(await dealer.recv())
            except orjson.JSONDecodeError:
                reply = None
            if not isinstance(reply, dict):
                raise PeerLost(f"node 0 at {address} answered with something other than a table")
            if reply.get("retry") is True and "error" in reply:
                if time.monotonic() + _RETRY_S >= deadline:
                    raise PeerLost(
                        f"node {node_rank}'s slot stayed claimed for startup_timeout_s="
                        f"{config.startup_timeout_s}: {reply['error']}"
                    )
                log.info("node 0 says: %s; trying again", reply["error"])
                await asyncio.sleep(_RETRY_S)
                continue
            break
    finally:
        context.destroy(linger=0)
    if "error" in reply:
        raise ConfigError(f"node 0 refused node {node_rank}: {reply['error']}")
    token = reply.get("token")
    if not isinstance(token, str):
        raise PeerLost(f"node 0 at {address} answered without a token")
    return token
