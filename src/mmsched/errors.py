"""The exceptions mmsched raises, in one tree.

    MmschedError
    ├── InvalidMultimodalInput (also ValueError)   a processor output failed validation
    ├── ConfigError (also ValueError)              a config value or name is wrong
    │   └── UnknownNameError                       a registry has no entry of that name
    ├── CodecError (also ValueError)               frames do not decode to a message
    │   └── PickleRefused                          a frame needs unpickling, which is off
    ├── TransportError                             the data path between ranks failed
    │   ├── TransportClosed                        used after *this* side closed it
    │   ├── EndOfStream                            the sender closed; nothing more will come
    │   └── PeerLost                               a peer died or stopped answering in time
    ├── Overloaded                                 too many bytes in flight (backpressure)
    │   └── ArenaFull                              a shared-memory arena had no room in time
    ├── RequestFailed                              a request failed on a scheduler rank
    ├── ModelOutputError                           a rank callback's output for a request
    │                                              is missing or not ids (rank side: the
    │                                              caller gets RequestFailed of that kind)
    ├── PreprocessWorkerLost                       a preprocessing worker process died or
    │                                              hung with the request's image in hand
    └── NotRunning                                 the pipeline is not started, or closed

Errors from libraries underneath (torch.distributed, zmq) are translated at the transport
boundary so that callers only need to know this tree.
"""

from __future__ import annotations


class MmschedError(Exception):
    """Base class of every error mmsched raises on purpose."""


class InvalidMultimodalInput(MmschedError, ValueError):
    """A processor output is malformed. The message names the offending field.

    Attributes:
        field: dotted path of the offending field, e.g. ``mm_items[0].offsets``.
    """

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem

    def __reduce__(self) -> tuple[type[InvalidMultimodalInput], tuple[str, str]]:
        return (InvalidMultimodalInput, (self.field, self.problem))


class ConfigError(MmschedError, ValueError):
    """A configuration value is invalid."""


class UnknownNameError(ConfigError):
    """A name given in the config has no entry in its registry; the message lists known ones."""

    def __init__(self, kind: str, name: str, known: list[str]) -> None:
        super().__init__(f"unknown {kind} {name!r}; known: {', '.join(sorted(known))}")
        self.kind = kind
        self.name = name
        self.known = sorted(known)

    def __reduce__(self) -> tuple[type[UnknownNameError], tuple[str, str, list[str]]]:
        return (UnknownNameError, (self.kind, self.name, self.known))


class CodecError(MmschedError, ValueError):
    """Frames could not be turned into a message (corrupt, truncated or of unknown kind)."""


class PickleRefused(CodecError):
    """A frame holds a pickled value and this decoder does not unpickle (the safe default)."""


class TransportError(MmschedError):
    """The transport between ranks failed."""


class TransportClosed(TransportError):
    """This side closed the transport and then tried to use it."""


class EndOfStream(TransportError):
    """The sender closed the transport: no further message will arrive."""


class PeerLost(TransportError):
    """A peer process died or did not answer within the configured timeout."""


class Overloaded(MmschedError):
    """The pipeline holds ``max_inflight_mb`` of requests already: rejected, or waited too long."""


class ArenaFull(Overloaded):
    """A shared-memory arena had no room for a payload within the timeout: a reader is slow,
    holds old payloads, or is gone."""


class NotRunning(MmschedError):
    """The pipeline was used before ``start()`` or after ``aclose()``."""


class RequestFailed(MmschedError):
    """A request failed on a scheduler rank; ``kind`` names the error class there."""

    def __init__(self, rid: str, kind: str, message: str) -> None:
        super().__init__(f"request {rid!r} failed: {kind}: {message}")
        self.rid = rid
        self.kind = kind
        self.message = message

    def __reduce__(self) -> tuple[type[RequestFailed], tuple[str, str, str]]:
        return (RequestFailed, (self.rid, self.kind, self.message))


class PreprocessWorkerLost(MmschedError):
    """A preprocessing worker process died (or stopped answering) while it held an image of
    the request; the worker is replaced, and only the requests it held fail."""


class ModelOutputError(MmschedError):
    """A rank callback's output for one request is missing or malformed; that request
    fails alone (its caller gets [`RequestFailed`][mmsched.errors.RequestFailed] with
    ``kind == "ModelOutputError"``)."""
