"""The abstract transport: one sender to every rank of a group, moving frames.

A transport knows nothing of messages: it moves lists of byte buffers (frames) produced by
[`mmsched.codec`][]. Every implementation promises:

- **one sender**: rank 0 of the group sends; every other rank receives;
- **ordered and lossless**: each receiver gets every message exactly once, in send order,
  with every frame's bytes and the frame boundaries intact (empty frames included);
- **close**: after ``aclose()`` on the sender, receivers drain what was sent and then
  ``recv()`` raises [`EndOfStream`][]; using a transport after closing
  it *here* raises [`TransportClosed`][];
- **peers**: a peer that dies or stops answering surfaces as
  [`PeerLost`][mmsched.errors.PeerLost] within the group's timeout where the implementation can
  detect it (each implementation's docstring says where it can).

Blocking work (collectives, socket waits) runs off the event loop, in one worker thread per
transport, so that calls on one rank are issued in the order they were awaited.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar

from mmsched.errors import ConfigError, EndOfStream, TransportClosed, TransportError
from mmsched.frames import Buffer, Frames, frames_nbytes


@dataclass(frozen=True)
class TransportOptions:
    """What a transport is told beyond who and where: every setting any transport reads,
    typed, each with its default (a transport ignores those it has no use for).

    A pipeline fills it in one place,
    [`Config.transport_options`][mmsched.config.Config.transport_options].

    Attributes:
        token: the run's secret. Over ``zmq`` (and the ``shm`` transport's control channel)
            every receiver presents it in the handshake, and a peer without it is refused
            before it can subscribe; ``None``: any peer that reaches the address may.
        arena_bytes: the ``shm`` transport's arena.
        inline_max_bytes: the ``shm`` transport's frames smaller than this ride the control
            channel instead of the arena.
        linger_s: how long a ``zmq`` sender's ``aclose`` waits for queued messages to
            leave; ``None``: the group's ``timeout_s``.
    """

    token: str | None = None
    arena_bytes: int = 256 << 20
    inline_max_bytes: int = 64 << 10
    linger_s: float | None = None

    def __post_init__(self) -> None:
        if self.token is not None and not isinstance(self.token, str):
            raise ConfigError("transport option token must be a string")
        for name in ("arena_bytes", "inline_max_bytes"):
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise ConfigError(f"transport option {name} must be a non-negative int")
        if self.linger_s is not None and not (
            isinstance(self.linger_s, int | float) and self.linger_s >= 0
        ):
            raise ConfigError("transport option linger_s must be a non-negative number")

    @classmethod
    def of(cls, options: TransportOptions | Mapping[str, Any]) -> TransportOptions:
        """``options`` as typed options: a mapping of their names (what ``GroupSpec`` took
        before) is checked and converted.

        Raises:
            ConfigError: a name that is no option, or a value of the wrong type.
        """
        if isinstance(options, TransportOptions):
            return options
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"unknown transport options {unknown}; known: {sorted(known)}")
        return cls(**options)


@dataclass(frozen=True)
class GroupSpec:
    """How one rank joins its transport group.

    Attributes:
        rank: this rank's index; rank 0 is the sender.
        world_size: number of ranks, sender included.
        address: rendezvous made by the transport class's ``new_address``.
        timeout_s: how long a blocking step may wait for peers before failing.
        options: the transport's settings
            ([`TransportOptions`][mmsched.transports.base.TransportOptions]; a mapping of
            their names is converted, and unknown names refused).
        join_timeout_s: how long ``open`` may wait for the rest of the group to join;
            ``None``: ``timeout_s``. Ranks that start apart (a server's own processes, one
            loading a model first) need longer to meet than a live peer may stay silent.
    """

    rank: int
    world_size: int
    address: str
    timeout_s: float = 60.0
    options: TransportOptions | Mapping[str, Any] = field(default_factory=TransportOptions)
    join_timeout_s: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", TransportOptions.of(self.options))

    @property
    def settings(self) -> TransportOptions:
        """``options``, typed: always a
        [`TransportOptions`][mmsched.transports.base.TransportOptions] once the spec is made."""
        return TransportOptions.of(self.options)

    @property
    def join_within_s(self) -> float:
        """How long ``open`` waits for the group: ``join_timeout_s``, else ``timeout_s``."""
        return self.timeout_s if self.join_timeout_s is None else self.join_timeout_s


@dataclass
class TransportStatistics:
    """Counters of one transport endpoint."""

    messages_sent: int = 0
    messages_received: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0


__all__ = [
    "Buffer",
    "Frames",
    "GroupSpec",
    "Transport",
    "TransportOptions",
    "TransportStatistics",
]


class Transport(ABC):
    """One sender (rank 0) to every other rank; ordered; lossless. See the module docstring."""

    name: str = ""
    # Whether ranks may live in different processes; the pipeline runs the ranks of a
    # transport that cannot as tasks of the caller's process.
    cross_process: ClassVar[bool] = True

    def __init__(self, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} outside a group of {world_size}")
        self.rank = rank
        self.world_size = world_size
        self._stats = TransportStatistics()
        self._closed = False  # closed by this side
        self._ended = False  # the sender's end of stream was received

    @classmethod
    @abstractmethod
    def new_address(cls, workdir: Path) -> str:
        """A fresh rendezvous address for a new group; ``workdir`` is private to the run."""

    @classmethod
    def remove_leftovers(cls, address: str) -> None:
        """Remove what a group at ``address`` may leave behind if its ranks were killed
        (a shared-memory segment, say). Called by the process that made the address, after
        the group is gone; the default has nothing to remove."""
        return None

    @classmethod
    @abstractmethod
    async def open(cls, spec: GroupSpec) -> Transport:
        """Join the group described by ``spec``; returns once this rank can send or receive."""

    @property
    def is_sender(self) -> bool:
        return self.rank == 0

    @abstractmethod
    async def send(self, frames: Sequence[Buffer]) -> None:
        """Send one message to every other rank (sender only).

        Raises:
            TransportClosed: this side closed the transport.
            PeerLost: a receiver died or stopped answering (where detectable).
            ArenaFull: the ``shm`` transport's arena had no room within the timeout.
        """

    @abstractmethod
    async def recv(self) -> Frames:
        """The next message (receivers only).

        Raises:
            EndOfStream: the sender closed; nothing more will arrive.
            TransportClosed: this side closed the transport.
            PeerLost: the sender died or went quiet for longer than the timeout.
        """

    @abstractmethod
    async def aclose(self) -> None:
        """Close this endpoint. On the sender, receivers see end-of-stream after the rest."""

    def statistics(self) -> TransportStatistics:
        """Messages and bytes this endpoint has sent and received so far (a copy)."""
        return TransportStatistics(**vars(self._stats))

    def _count_sent(self, frames: Sequence[Buffer]) -> None:
        self._stats.messages_sent += 1
        self._stats.bytes_sent += frames_nbytes(frames)

    def _count_received(self, frames: Sequence[Buffer]) -> None:
        self._stats.messages_received += 1
        self._stats.bytes_received += frames_nbytes(frames)

    def _require_sender(self, sender: bool) -> None:
        if self.is_sender != sender:
            role = "the sender (rank 0)" if sender else "a receiver"
            raise TransportError(f"only {role} may call this; this is rank {self.rank}")

    def _check_send(self) -> None:
        """What every ``send`` checks first: the sender, not closed."""
        self._require_sender(True)
        if self._closed:
            raise TransportClosed("send on a closed transport")

    def _check_recv(self) -> None:
        """What every ``recv`` checks first: a receiver, not closed, stream not ended."""
        self._require_sender(False)
        if self._closed:
            raise TransportClosed("recv on a closed transport")
        if self._ended:
            raise EndOfStream("the sender closed the transport")

    def _end_of_stream(self) -> EndOfStream:
        """Record that the sender's end marker arrived; returns the error to raise."""
        self._ended = True
        return EndOfStream("the sender closed the transport")

    async def __aenter__(self) -> Transport:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
