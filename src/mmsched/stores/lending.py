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
from typing import Any

import numpy as np
import orjson
import torch

from mmsched.errors import ArenaFull, TransportError
from mmsched.frames import DTYPES, checked_shape, dtype_name
from mmsched.stores.arena import ArenaWriter, Ref

log = logging.getLogger(__name__)

_MAX_LINE = 4096  # a request or a reply is one short JSON line


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
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout_s)
        try:
            self._sock.connect(access.path)
            self._sock.sendall(orjson.dumps({"token": access.token}) + b"\n")
            message, fds, _, _ = socket.recv_fds(self._sock, _MAX_LINE, 1)
        except OSError as exc:
            self._sock.close()
            raise TransportError(f"cannot reach the arena at {access.path}: {exc}") from exc
        if not fds:
            self._sock.close()
            raise TransportError(f"the arena refused this producer: {message.decode()[:200]}")
        try:
            hello = orjson.loads(message)
            self.name, size = str(hello["arena"]), int(hello["size"])
            self._mm = mmap.mmap(fds[0], size, flags=mmap.MAP_SHARED)
        finally:
            for fd in fds:
                os.close(fd)
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
        try:
            self._sock.sendall(orjson.dumps(request) + b"\n")
            line = self._reader.readline(_MAX_LINE)
        except OSError as exc:
            raise TransportError(f"the arena's pipeline is gone: {exc}") from exc
        if not line:
            raise TransportError("the arena's pipeline closed the connection")
        reply = orjson.loads(line)
        if not isinstance(reply, dict):
            raise TransportError("malformed reply from the arena")
        return reply


class ArenaLender:
    """Serves an [`ArenaWriter`][mmsched.stores.arena.ArenaWriter]'s room to producers in
    other processes, on a Unix socket at ``path`` (0600, in the run's private directory).

    One thread accepts, one thread per producer answers. Whatever a client sends, the
    outcome is a reply or a closed connection: never an exception in the pipeline.
    """

    def __init__(self, writer: ArenaWriter, path: Path, token: str, lease_s: float) -> None:
        self._writer = writer
        self._token = token
        self._lease_s = lease_s
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
                hello = _parse(lines.readline(_MAX_LINE))
                token = hello.get("token") if hello else None
                if not isinstance(token, str) or not hmac.compare_digest(token, self._token):
                    log.warning("arena lender: a producer presented a wrong token")
                    client.sendall(b"refused: wrong token\n")
                    return
                hello_reply = orjson.dumps({"arena": self._writer.name, "size": self._writer.size})
                socket.send_fds(client, [hello_reply], [self._writer.fd])
                while not self._closed:
                    request = _parse(lines.readline(_MAX_LINE))
                    if request is None:
                        return  # gone, or sent what is not a request
                    client.sendall(orjson.dumps(self._lease(request)) + b"\n")
        except OSError:
            return  # the producer went away, or we are closing
        except Exception:  # a client's input must never take the lender down with it
            log.exception("arena lender: dropped a producer after an unexpected error")
        finally:
            self._clients.discard(client)

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
