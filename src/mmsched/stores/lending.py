"""Producers in other processes write straight into the tokenizer's arena.

SGLang and vLLM run their processors in worker processes. For such a worker's output to
reach the ranks without a copy in the tokenizer, the worker writes it into the arena itself:

1. the pipeline lends its arena on a Unix socket in the run's private directory
   ([`ArenaLender`][mmsched.stores.lending.ArenaLender]); a worker connects with the
   picklable [`ArenaAccess`][mmsched.stores.lending.ArenaAccess] the pipeline hands out,
   presents the run's token, and receives the segment's file descriptor (its name is
   unlinked once the ranks have mapped it, so the descriptor is the only way in);
2. per output, the worker asks for room
   ([`ProducerArena.allocate`][mmsched.stores.lending.ProducerArena.allocate]): the pipeline
   *leases* it, the worker fills the returned tensor and hands the small,
   picklable [`Lent`][mmsched.stores.lending.Lent] to the tokenizer process however the
   server moves its requests;
3. the tokenizer claims it ([`Pipeline.claim_tensor`][mmsched.pipeline.Pipeline.claim_tensor])
   and gets a tensor of its own mapping of the same bytes, which crosses to the ranks as a
   reference: no copy anywhere.

A lease not claimed within ``timeout_s`` (the worker died, or its request was dropped) is
given back, so a dead worker cannot wedge the ring; a claim after that fails. What a
deployment trusts: every process holding the run's token can write anywhere in the arena.

Each connection is served by a thread of its own, so each is bounded in time: a client must
present its token within ``hello_s`` of connecting, and a connection on which no request
arrives for ``idle_s`` is closed (logged). A producer whose idle connection was closed
connects again on its next ``allocate``, transparently: its mapping stays valid.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import mmap
import os
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import orjson
import torch

from mmsched.errors import ArenaFull, TransportError
from mmsched.frames import DTYPES, checked_shape, dtype_name
from mmsched.stores.arena import ArenaWriter, Ref

log = logging.getLogger(__name__)

_MAX_LINE = 4096  # a request or a reply is one short JSON line
_HELLO_MAX_S = 5.0  # a producer sends its token as soon as it connects


@dataclass(frozen=True)
class Lent:
    """A tensor a producer wrote under lease: where it is and what it is (picklable)."""

    arena: str
    seq: int
    offset: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ArenaAccess:
    """What a producer process needs to write into a pipeline's arena (picklable)."""

    path: str
    token: str

    def connect(self, timeout_s: float = 10.0) -> ProducerArena:
        """Join the arena (one connection per producer process or thread).

        Raises:
            TransportError: the pipeline is gone, or refused the token.
        """
        return ProducerArena(self, timeout_s)


class ProducerArena:
    """A producer's side of a lent arena: room for each output, filled in place."""

    def __init__(self, access: ArenaAccess, timeout_s: float) -> None:
        self._access = access
        self._timeout_s = timeout_s
        self._sock, hello, fd = self._connect()
        try:
            self.name, size = str(hello["arena"]), int(hello["size"])
            self._mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        except BaseException:
            self._sock.close()
            raise
        finally:
            os.close(fd)
        self._reader = self._sock.makefile("rb")

    def _connect(self) -> tuple[socket.socket, dict[str, Any], int]:
        """A connection that presented the token, the lender's hello and its descriptor."""
        access = self._access
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self._timeout_s)
        try:
            sock.connect(access.path)
            sock.sendall(orjson.dumps({"token": access.token}) + b"\n")
            message, fds, _, _ = socket.recv_fds(sock, _MAX_LINE, 1)
        except OSError as exc:
            sock.close()
            raise TransportError(f"cannot reach the arena at {access.path}: {exc}") from exc
        if not fds:
            sock.close()
            raise TransportError(f"the arena refused this producer: {message.decode()[:200]}")
        for extra in fds[1:]:
            os.close(extra)
        try:
            hello = orjson.loads(message)
            if not isinstance(hello, dict):
                raise TypeError("not a table")
        except (orjson.JSONDecodeError, TypeError) as exc:
            sock.close()
            os.close(fds[0])
            raise TransportError(f"malformed hello from the arena: {exc}") from exc
        return sock, hello, fds[0]

    def _reconnect(self) -> None:
        """A new connection to the same arena (the lender closed an idle one)."""
        self._reader.close()
        self._sock.close()
        self._sock, hello, fd = self._connect()
        os.close(fd)  # this process mapped the arena already
        if hello.get("arena") != self.name:
            self._sock.close()
            raise TransportError(f"the arena at {self._access.path} is another one now")
        self._reader = self._sock.makefile("rb")

    def allocate(self, shape: Sequence[int], dtype: torch.dtype) -> tuple[torch.Tensor, Lent]:
        """A tensor in the arena to fill, and the handle the tokenizer claims it by.

        Raises:
            ArenaFull: the pipeline had no room within its ``timeout_s``.
            TransportError: the pipeline is gone.
        """
        name = dtype_name(dtype)
        nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
        reply = self._ask({"lease": nbytes})
        if "error" in reply:
            error = ArenaFull if reply.get("kind") == "ArenaFull" else TransportError
            raise error(str(reply["error"]))
        lent = Lent(self.name, int(reply["seq"]), int(reply["offset"]), nbytes, name, tuple(shape))
        arr = np.frombuffer(self._mm, dtype=np.uint8, count=nbytes, offset=lent.offset)
        tensor = torch.frombuffer(arr.data, dtype=torch.uint8).view(dtype).reshape(lent.shape)
        return tensor, lent

    def close(self) -> None:
        self._reader.close()
        self._sock.close()
        with contextlib.suppress(BufferError):  # tensors still held keep the mapping
            self._mm.close()

    def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        line = b""
        for attempt in range(2):
            try:
                self._sock.sendall(orjson.dumps(request) + b"\n")
                line = self._reader.readline(_MAX_LINE)
            except (BrokenPipeError, ConnectionResetError):
                line = b""
            except OSError as exc:
                raise TransportError(f"the arena's pipeline is gone: {exc}") from exc
            if line or attempt:
                break
            # Closed: the lender drops a connection idle for its idle_s, before it reads
            # anything more on it, so this request was never seen: ask again, once.
            self._reconnect()
        if not line:
            raise TransportError("the arena's pipeline closed the connection")
        try:
            reply = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise TransportError(f"malformed reply from the arena: {exc}") from exc
        if not isinstance(reply, dict):
            raise TransportError("malformed reply from the arena")
        return reply


class ArenaLender:
    """Serves an [`ArenaWriter`][mmsched.stores.arena.ArenaWriter]'s room to producers in
    other processes, on a Unix socket at ``path`` (0600, in the run's private directory).

    One thread accepts, one thread per producer answers. Whatever a client sends, the
    outcome is a reply or a closed connection: never an exception in the pipeline. A client
    that presents no token within ``hello_s`` (default ``min(5 s, lease_s)``), or sends no
    request for ``idle_s`` (default ``lease_s``), is disconnected and logged, so that a
    silent client cannot hold a thread and a socket for ever.
    """

    def __init__(
        self,
        writer: ArenaWriter,
        path: Path,
        token: str,
        lease_s: float,
        *,
        hello_s: float | None = None,
        idle_s: float | None = None,
    ) -> None:
        self._writer = writer
        self._token = token
        self._lease_s = lease_s
        self._hello_s = min(_HELLO_MAX_S, lease_s) if hello_s is None else hello_s
        self._idle_s = lease_s if idle_s is None else idle_s
        self.path = str(path)
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(self.path)
        os.chmod(self.path, 0o600)
        self._server.listen()
        self._closed = False
        self._clients: set[socket.socket] = set()
        threading.Thread(target=self._accept, name="mmsched-lender", daemon=True).start()

    def access(self) -> ArenaAccess:
        return ArenaAccess(self.path, self._token)

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)
        self._server.close()
        for client in list(self._clients):
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def claim(self, lent: Lent) -> torch.Tensor:
        """The tensor ``lent`` names, in this process's mapping.

        Raises:
            TransportError: not a live lease of this arena.
            CodecError: its dtype or shape does not match its bytes.
        """
        fields = (lent.seq, lent.offset, lent.nbytes) if isinstance(lent, Lent) else ()
        if (
            not isinstance(lent, Lent)
            or not isinstance(lent.arena, str)
            or not all(type(v) is int and v >= 0 for v in fields)
            or lent.dtype not in DTYPES
        ):
            raise TransportError(f"not a lent tensor: {str(lent)[:200]}")
        dtype = DTYPES[lent.dtype]
        itemsize = torch.empty((), dtype=dtype).element_size()
        shape = checked_shape(list(lent.shape), itemsize, lent.nbytes)
        arr = self._writer.claim(Ref(lent.arena, lent.seq, lent.offset, lent.nbytes))
        return torch.frombuffer(arr.data, dtype=torch.uint8).view(dtype).reshape(shape)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return  # closed
            self._clients.add(client)
            threading.Thread(
                target=self._serve, args=(client,), name="mmsched-lender-client", daemon=True
            ).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            with client, client.makefile("rb") as lines:
                self._converse(client, lines)  # returns once the connection is to close
        except OSError:
            return  # the producer went away, or we are closing
        except Exception:  # a client's input must never take the lender down with it
            log.exception("arena lender: dropped a producer after an unexpected error")
        finally:
            self._clients.discard(client)

    def _converse(self, client: socket.socket, lines: BinaryIO) -> None:
        waiting, bound = "no token", self._hello_s  # what we wait for, for the log
        try:
            client.settimeout(bound)
            hello = _parse(lines.readline(_MAX_LINE))
            token = hello.get("token") if hello else None
            if not isinstance(token, str) or not hmac.compare_digest(token, self._token):
                log.warning("arena lender: a producer presented a wrong token")
                client.sendall(b"refused: wrong token\n")
                return
            hello_reply = orjson.dumps({"arena": self._writer.name, "size": self._writer.size})
            socket.send_fds(client, [hello_reply], [self._writer.fd])
            waiting, bound = "no request", self._idle_s
            client.settimeout(bound)
            while not self._closed:
                request = _parse(lines.readline(_MAX_LINE))
                if request is None:
                    return  # gone, or sent what is not a request
                client.sendall(orjson.dumps(self._lease(request)) + b"\n")
        except TimeoutError:
            # Logged before the connection closes, so the log is there when the client
            # sees the hang-up.
            log.warning(
                "arena lender: dropped a producer that sent %s within %.1f s", waiting, bound
            )

    def _lease(self, request: dict[str, Any]) -> dict[str, Any]:
        nbytes = request.get("lease")
        if type(nbytes) is not int or not 0 <= nbytes <= self._writer.capacity:
            return {"error": f"bad lease request {str(request)[:100]}", "kind": "ConfigError"}
        try:
            ref = self._writer.lease(nbytes, self._lease_s)
        except ArenaFull as exc:
            return {"error": str(exc), "kind": "ArenaFull"}
        return {"seq": ref.seq, "offset": ref.offset}


def _parse(line: bytes) -> dict[str, Any] | None:
    if not line.endswith(b"\n"):
        return None
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None
