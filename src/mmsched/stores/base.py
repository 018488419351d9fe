"""The payload-store interface: where tensor bytes live, and how a rank gets them back.

A message's tensors either travel inside its frames, or a store holds their bytes and the
message carries a [`PayloadRef`][mmsched.stores.base.PayloadRef] instead: a few hundred bytes
naming the store, the dtype, the shape, the device and the location. One store object exists
per process and pipeline:

- the **producer** (the tokenizer) makes it with
  [`create`][mmsched.stores.base.PayloadStore.create]; [`put`][mmsched.stores.base.PayloadStore.put]
  places a tensor (or [`allocate`][mmsched.stores.base.PayloadStore.allocate] gives a processor
  a tensor to fill in place, and ``put`` then copies nothing); a request's tensors are placed
  through an explicit [`Placement`][mmsched.stores.base.Placement] handle, which holds their
  room until the tokenizer settles it;
- every **consumer** (each scheduler rank) joins it with
  [`attach`][mmsched.stores.base.PayloadStore.attach], and
  [`resolve`][mmsched.stores.base.PayloadStore.resolve] turns a reference into a usable
  tensor. A consumer's ``put`` forwards a tensor it resolved (the entry rank passing a
  request on to its peers) as the same reference, and returns ``None`` for any other.

Lifetime: a resolved tensor holds its bytes for as long as it (or a view of it) lives; the
store reuses them only after every consumer has let go, and after the producer
[`settle`][mmsched.stores.base.PayloadStore.settle]s what it placed.

What a store can do is said by flags on its class, read before calling, never found out by
an exception: ``by_reference`` (tensor bytes travel outside the frames), ``shares_across_processes``
(a reference resolves in another process of the host), ``lends`` (producers in other
processes write into it: [`lend`][mmsched.stores.base.PayloadStore.lend]), ``device`` (where
the bytes a reference names live) and ``shares_allocations``.

The codec calls ``put`` and ``resolve`` ([`mmsched.codec`][]); the pipeline calls the rest.
A new store is one module with a subclass plus one line in [`mmsched.stores`][]; it passes
the store contract ([`mmsched.testing.run_store_contract`][]).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from mmsched.errors import CodecError, ConfigError


@dataclass(frozen=True)
class StoreOptions:
    """What a pipeline tells its store.

    Attributes:
        capacity_bytes: bytes the store may hold at once.
        consumers: how many processes attach (the scheduler ranks).
        timeout_s: longest wait for room before [`ArenaFull`][mmsched.errors.ArenaFull].
        min_bytes: tensors smaller than this travel inside the frames.
        device: the device of the process that makes or attaches the store: a rank's own
            (``cpu`` or ``cuda:N``), or, for the producer, rank 0's.
        reject_when_full: no room means [`ArenaFull`][mmsched.errors.ArenaFull] at once,
            without waiting (``backpressure="reject"``).
    """

    capacity_bytes: int = 256 << 20
    consumers: int = 1
    timeout_s: float = 60.0
    min_bytes: int = 64 << 10
    device: str = "cpu"
    reject_when_full: bool = False


@dataclass(frozen=True)
class PayloadRef:
    """Where a tensor's bytes are and what they are: all a consumer needs to get it back.

    Attributes:
        store: name of the store that made it.
        dtype: torch dtype name without the ``torch.`` prefix, e.g. ``float32``.
        shape: the tensor's shape.
        device: where the bytes live: ``cpu``, or ``cuda:N``.
        location: the store's own coordinates (strings and non-negative ints).
    """

    store: str
    dtype: str
    shape: tuple[int, ...]
    device: str
    location: tuple[str | int, ...]

    def to_tree(self) -> list[Any]:
        """The reference as JSON-able values (what the codec writes)."""
        return [self.store, self.dtype, list(self.shape), self.device, list(self.location)]

    @classmethod
    def from_tree(cls, tree: Any) -> PayloadRef:
        """The reference a decoded tree holds (it comes from another process).

        Raises:
            CodecError: ``tree`` is not a well-formed reference.
        """
        # Each part checked once, the three names without a generator: every rank reads
        # one reference per tensor of every request.
        if isinstance(tree, list) and len(tree) == 5:
            store, dtype, shape, device, location = tree
            if (
                isinstance(store, str)
                and isinstance(dtype, str)
                and isinstance(device, str)
                and isinstance(shape, list)
                and isinstance(location, list)
                and _non_negative_ints(shape)
                and _names_or_non_negative_ints(location)
            ):
                return cls(store, dtype, tuple(shape), device, tuple(location))
        raise CodecError(f"malformed payload reference {str(tree)[:200]}")


def _non_negative_ints(values: list[Any]) -> bool:
    return all(type(x) is int and 0 <= x < 2**63 for x in values)


def _names_or_non_negative_ints(values: list[Any]) -> bool:
    return all(isinstance(x, str) or (type(x) is int and 0 <= x < 2**63) for x in values)


class PayloadStore(ABC):
    """Where tensor bytes live between the tokenizer and the ranks (module docstring)."""

    name: ClassVar[str] = ""
    # -- capabilities (read by the pipeline, the config and the contract suite) --------------
    # Whether tensor bytes travel outside the frames (only references in them); not so for
    # a store that puts them in the frames, which a transport's arena must then hold.
    by_reference: ClassVar[bool] = True
    # Whether a reference made in one process resolves in another of the same host (ranks
    # in their own processes); a store that keeps its bytes in the producer's process only
    # serves ranks that are tasks of that process (the memory transport).
    shares_across_processes: ClassVar[bool] = False
    # Whether producers in other processes can write into it (lend/claim, the arena
    # lending protocol of mmsched.stores.lending).
    lends: ClassVar[bool] = False
    # Where the bytes a reference names live: "cpu" (host memory) or "cuda" (a GPU's).
    device: ClassVar[str] = "cpu"
    # Whether it delivers on a GPU only (a config must then give the ranks a device):
    # derived from ``device``.
    needs_gpu: ClassVar[bool] = False
    # Whether allocate() hands out memory the consumers read in place: a producer that
    # fills it sends its tensor without any copy.
    shares_allocations: ClassVar[bool] = False
    # The config field that sizes it (in MiB).
    capacity_setting: ClassVar[str] = "shm_arena_mb"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.device not in ("cpu", "cuda"):
            raise TypeError(f"{cls.__name__}.device must be 'cpu' or 'cuda', not {cls.device!r}")
        cls.needs_gpu = cls.device == "cuda"

    def __init__(self, options: StoreOptions) -> None:
        self.options = options

    # -- lifecycle (the pipeline) ------------------------------------------------------------

    @classmethod
    @abstractmethod
    def create(cls, options: StoreOptions) -> PayloadStore:
        """The producer's store, made once per pipeline (may block: called off the loop)."""

    @classmethod
    @abstractmethod
    def attach(cls, address: str | None, consumer: int, options: StoreOptions) -> PayloadStore:
        """Consumer ``consumer``'s view of the store the producer made at ``address``."""

    @property
    def address(self) -> str | None:
        """What consumers pass to ``attach``; ``None`` when there is nothing to find."""
        return None

    def consumers_attached(self) -> None:  # noqa: B027 (optional hook, nothing to do by default)
        """Every consumer has attached (a store may now drop its public name)."""

    def close(self) -> None:  # noqa: B027 (optional hook, nothing to do by default)
        """Give back what this process holds of the store."""

    @classmethod
    def sweep_stale(cls) -> list[str]:
        """Remove what crashed earlier runs of this store left behind; returns what went."""
        return []

    @classmethod
    def remove_leftovers(cls, address: str | None) -> None:
        """Remove what this run's store may leave if its processes were killed."""
        return None

    # -- data (the codec) --------------------------------------------------------------------

    def allocate(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """An empty tensor for a producer to fill; ``put`` of it then copies nothing."""
        return torch.empty(tuple(shape), dtype=dtype)

    # -- producers in other processes (the pipeline) ----------------------------------------

    def lend(self, path: Path, token: str) -> Any:
        """Let producers in other processes write into this store; returns the picklable
        access they connect with (see [`mmsched.stores.lending`][]). Only for a store whose
        ``lends`` is true (the caller checks the flag).

        Raises:
            ConfigError: this store has no memory to lend (``lends`` is false).
        """
        raise ConfigError(f"the {self.name!r} payload store lends no memory to other processes")

    def claim(self, lent: Any) -> torch.Tensor:
        """The tensor a producer in another process wrote under ``lent`` (``lends`` only).

        Raises:
            ConfigError: this store lends no memory (``lends`` is false).
            TransportError: ``lent`` is not a live lease of this store.
            CodecError: its dtype and shape do not match its size.
        """
        raise ConfigError(f"the {self.name!r} payload store lends no memory to other processes")

    @abstractmethod
    def put(self, tensor: torch.Tensor) -> PayloadRef | None:
        """A reference to ``tensor``'s bytes in this store, or ``None``: it travels inline.

        Raises:
            ArenaFull: no room within the store's timeout.
        """

    @abstractmethod
    def resolve(self, ref: PayloadRef) -> torch.Tensor:
        """The tensor ``ref`` names; it keeps its bytes alive while it lives.

        Raises:
            TransportError: the reference is not one this store could have made.
            CodecError: its dtype or shape does not match the bytes it names.
        """

    def placement(self, *, wait: bool = True) -> Placement:
        """Producer: a handle for one request's placements (see [`Placement`][]). With
        ``wait`` off, a placement that finds no room raises
        [`ArenaFull`][mmsched.errors.ArenaFull] at once (a caller on the event loop, whose
        own loop gives room back, must not wait for it)."""
        return Placement(self, wait=wait)

    def settle(self, placed: Sequence[Any], *, sent: bool = True) -> None:  # noqa: B027
        """Producer: give back what a [`Placement`][mmsched.stores.base.Placement] held
        (its ``placed``); its room is reused once no rank still holds a tensor on it, or at
        once if it was never ``sent``."""

    def borrowed(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` (a resolved one) is this store's memory that a rank copies out
        of and gives back as soon as it can, even when it already is on the rank's device."""
        return False

    def wants(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` is large enough to go by reference rather than inline."""
        return tensor.numel() * tensor.element_size() >= self.options.min_bytes


class Placement:
    """One request's placements in a producer's store: the codec places through this handle
    (``encode(message, placement)``), so a store needs no per-thread state to tell one
    request's room from another's.

    What it places is held from reuse and listed in ``placed`` until the tokenizer
    [`settle`][mmsched.stores.base.PayloadStore.settle]s it, once every rank has finished
    the iteration that ran the request (or at once, if it never went out): a rank's
    watermark cannot free it before, since a rank that has not received a message yet holds
    nothing of it. A store's ``put`` outside a placement is freed by the watermarks alone,
    which is right for one sender whose messages reach every reader in the order it placed
    them. This default places through the store's ``put`` and holds nothing.

    Use it as a context manager: on leaving, every copy it
    [`stage`][mmsched.stores.base.Placement.stage]d has finished, and staged room that no
    ``put`` took is given back.
    """

    def __init__(self, store: PayloadStore, *, wait: bool = True) -> None:
        self.store = store
        self.wait = wait
        self.placed: list[Any] = []

    def stage(self, tensors: Iterable[torch.Tensor]) -> None:
        """Start placing ``tensors`` (validated features) while the caller does other work
        (the producer hashes them); ``put`` of one of them then waits for its copy and
        returns its reference. By default nothing is started.

        Raises:
            ArenaFull: no room within the store's timeout.
        """

    def wants(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` goes by reference (the store's rule)."""
        return self.store.wants(tensor)

    def put(self, tensor: torch.Tensor) -> PayloadRef | None:
        """A reference to ``tensor``'s bytes in the store, held for this request, or
        ``None``: it travels inline.

        Raises:
            ArenaFull: no room (within the store's timeout, if ``wait``).
        """
        return self.store.put(tensor)

    def finish(self) -> None:
        """Wait for every staged copy; give back staged room that no ``put`` took."""

    def __enter__(self) -> Placement:
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()
