"""torch.distributed broadcast over a gloo CPU group, with ``broadcast_pyobj`` semantics.

This is how SGLang moves each scheduler iteration's requests from the entry rank to the other
TP ranks. A message crosses the group as a sequence of collectives, every rank taking part
in each: the frame count, the frame lengths, then one ``broadcast`` per non-empty frame.
Frames are broadcast straight from the sender's buffers and into fresh receive buffers: no
pickling, no concatenation.

Guarantees and limits:

- multi-host capable (gloo over TCP); largest payload limited by memory only;
- **blocking**: every send is a collective, so the sender waits until every rank has entered
  the matching receive; a slow rank slows every rank. The waits run in one worker thread per
  transport, off the event loop;
- a dead or stuck peer surfaces as [`PeerLost`][] after the group
  timeout (``GroupSpec.timeout_s``), never torch.distributed's default of 30 minutes;
  forming the group may take ``GroupSpec.join_within_s``;
- a pending ``recv()`` can be cancelled, but the collective under it cannot: the group is
  then unusable and must be closed.

Rendezvous and sockets: a pipeline's group meets through a file in the run's private
directory (``file://``), so no TCP store listens at all, and gloo's own connections listen
on 127.0.0.1 only. Across hosts, ``tcp://HOST:PORT`` runs a TCP store on rank 0 bound to
``HOST`` exactly (never every interface), and rank 0's gloo listens on ``HOST`` too (every
rank's does when ``HOST`` is loopback); other hosts' gloo devices use the interface gloo
picks for the host's name (set ``GLOO_SOCKET_IFNAME`` to choose). A malformed address is a
[`ConfigError`][mmsched.errors.ConfigError]. Any peer that can reach a gloo or store port is
trusted: keep them on a private network.

The transport either creates the default process group (``open``) or wraps one the server
already has (``TorchTransport(group=..., src=...)``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import torch
import torch.distributed as dist

from mmsched.errors import ConfigError, PeerLost, TransportClosed
from mmsched.transports.base import Buffer, Frames, GroupSpec, Transport

_T = TypeVar("_T")
_END_OF_STREAM = -1


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _parse_address(address: str) -> tuple[str, str, int]:
    """``("file", path, 0)`` or ``("tcp", host, port)``; anything else is a config error."""
    url = urlsplit(address)
    if url.scheme == "file" and url.path:
        return "file", url.path, 0
    with contextlib.suppress(ValueError):  # a port out of range
        if url.scheme == "tcp" and url.hostname and url.port is not None:
            return "tcp", url.hostname, url.port
    raise ConfigError(f"torch transport address {address!r}: use file://PATH or tcp://HOST:PORT")


def _store(spec: GroupSpec, scheme: str, where: str, port: int) -> Any:
    """The rendezvous store of ``spec.address`` as ``_parse_address`` split it."""
    timeout = timedelta(seconds=spec.join_within_s)
    if scheme == "file":
        return dist.FileStore(where, spec.world_size)  # type: ignore[attr-defined]
    if spec.rank != 0:
        return dist.TCPStore(where, port, spec.world_size, False, timeout)  # type: ignore[attr-defined]
    # torch's own TCPStore server listens on every interface; hand it a socket bound to the
    # address asked for instead.
    family = socket.AF_INET6 if ":" in where else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((where, port))
        listener.listen(128)
        store = dist.TCPStore(  # type: ignore[attr-defined]
            where, port, spec.world_size, True, timeout, master_listen_fd=listener.fileno()
        )
    except BaseException:
        listener.close()
        raise
    listener.detach()  # the store owns the descriptor now
    return store


class TorchTransport(Transport):
    name = "torch"

    def __init__(
        self,
        rank: int,
        world_size: int,
        *,
        group: Any = None,
        src: int = 0,
        owns_group: bool = False,
    ) -> None:
        super().__init__(rank, world_size)
        self._group = group
        self._src = src  # global rank of the sender, as torch.distributed wants it
        self._owns_group = owns_group
        self._broken = False
        # One thread: collectives on a rank must be issued in the order they were awaited.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmsched-torch")

    @classmethod
    def new_address(cls, workdir: Path) -> str:
        return f"file://{workdir}/torch-store"

    @classmethod
    async def open(cls, spec: GroupSpec) -> TorchTransport:
        scheme, host, port = _parse_address(spec.address)
        # gloo listens on 127.0.0.1 for a file rendezvous (one host), on the store's host
        # when that is loopback or this is rank 0 (whose host it is), and elsewhere where gloo
        # picks for this host's name.
        if scheme == "file":
            gloo_host: str | None = "127.0.0.1"
        elif _is_loopback(host) or spec.rank == 0:
            gloo_host = host
        else:
            gloo_host = None

        def init() -> None:
            store = _store(spec, scheme, host, port)
            # Private in torch 2.x, and the only way to say which address gloo listens on
            # without changing the process environment (GLOO_SOCKET_IFNAME).
            options = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
            options._timeout = timedelta(seconds=spec.join_within_s)
            if gloo_host is not None:
                options._devices = [dist.ProcessGroupGloo.create_device(hostname=gloo_host)]
            else:
                options._devices = [dist.ProcessGroupGloo.create_default_device()]
            dist.init_process_group(
                "gloo",
                store=store,
                rank=spec.rank,
                world_size=spec.world_size,
                timeout=timedelta(seconds=spec.join_within_s),
                pg_options=options,
            )
            # Joining may take join_within_s; a peer silent in a collective is lost after
            # timeout_s, as everywhere else.
            group = dist.distributed_c10d._get_default_group()
            if spec.join_within_s != spec.timeout_s and hasattr(group, "set_timeout"):
                group.set_timeout(timedelta(seconds=spec.timeout_s))

        try:
            await asyncio.to_thread(init)
        except (RuntimeError, ValueError, OSError) as exc:
            raise PeerLost(f"could not form the gloo group at {spec.address}: {exc}") from exc
        return cls(spec.rank, spec.world_size, group=None, src=0, owns_group=True)

    async def send(self, frames: Sequence[Buffer]) -> None:
        self._check_send()
        self._check_healthy()
        await self._run(self._send_blocking, list(frames))
        self._count_sent(frames)

    async def recv(self) -> Frames:
        self._check_recv()
        self._check_healthy()
        frames: Frames | None = await self._run(self._recv_blocking)
        if frames is None:
            raise self._end_of_stream()
        self._count_received(frames)
        return frames

    async def aclose(self) -> None:
        if self._closed:
            return
        if self.is_sender and not self._broken:
            # If receivers are gone already, there is nobody left to tell.
            with contextlib.suppress(PeerLost):
                await self._run(self._broadcast, torch.tensor([_END_OF_STREAM], dtype=torch.int64))
        self._closed = True
        if self._owns_group and not self._broken and dist.is_initialized():
            await asyncio.get_running_loop().run_in_executor(
                self._executor, dist.destroy_process_group
            )
        # A collective cancelled mid-flight still holds the thread; don't wait for it.
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- blocking side, run in the worker thread ------------------------------------------

    def _broadcast(self, tensor: torch.Tensor) -> None:
        dist.broadcast(tensor, src=self._src, group=self._group)

    def _send_blocking(self, frames: list[Buffer]) -> None:
        lengths = [memoryview(f).nbytes for f in frames]
        self._broadcast(torch.tensor([len(frames)], dtype=torch.int64))
        if frames:
            self._broadcast(torch.tensor(lengths, dtype=torch.int64))
        for frame, n in zip(frames, lengths, strict=False):
            if n:
                self._broadcast(_as_uint8_tensor(frame))

    def _recv_blocking(self) -> Frames | None:
        count = torch.empty(1, dtype=torch.int64)
        self._broadcast(count)
        n_frames = int(count.item())
        if n_frames == _END_OF_STREAM:
            return None
        if n_frames == 0:
            return []
        lengths = torch.empty(n_frames, dtype=torch.int64)
        self._broadcast(lengths)
        frames: Frames = []
        for n in lengths.tolist():
            buf = torch.empty(n, dtype=torch.uint8)
            if n:
                self._broadcast(buf)
            frames.append(buf.numpy().data)
        return frames

    async def _run(self, fn: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except asyncio.CancelledError:
            self._broken = True  # the collective goes on in the thread; the group is spent
            raise
        except RuntimeError as exc:
            # gloo reports timeouts and dead peers as RuntimeError ("Connection closed by
            # peer", "Timed out waiting ..."); both mean a peer is gone for our purposes.
            self._broken = True
            raise PeerLost(
                f"torch.distributed broadcast failed on rank {self.rank}: {exc}"
            ) from exc

    def _check_healthy(self) -> None:
        if self._broken:
            raise TransportClosed("an earlier collective was cancelled or failed; close and rejoin")


def _as_uint8_tensor(frame: Buffer) -> torch.Tensor:
    view = memoryview(frame)
    if view.readonly:
        # gloo wants a writable tensor even to send; small read-only frames (the codec's
        # header) are copied, tensor frames are writable views and are not.
        return torch.frombuffer(bytearray(view), dtype=torch.uint8)
    return torch.frombuffer(view.cast("B") if view.format != "B" else view, dtype=torch.uint8)
