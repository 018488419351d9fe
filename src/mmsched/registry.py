"""Name-to-class registries (strategies, payload stores, transports), loaded on first use.

One [`Registry`][mmsched.registry.Registry] per kind maps a name to a class, or to
``"module:Class"`` so that a deployment imports only the implementation it picks (and the
libraries it needs). Names come from three places, in this order of precedence: a call to
[`register`][mmsched.registry.Registry.register] in this process, the built-in table, and
installed packages' entry points in the kind's group (``mmsched.stores``,
``mmsched.transports``, ``mmsched.strategies``): a plugin installed that way is found in
every process, the ranks' spawned ones included, with no call at all.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import threading
from collections.abc import Mapping
from typing import Any, Generic, TypeVar, cast

from mmsched.errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """Names of one kind of plugin (``kind``, for messages), each a subclass of ``base``.

    Args:
        kind: what the names are, as errors say it (``"payload store"``).
        base: the class every registered one must subclass.
        builtin: the names mmsched ships, to a class or ``"module:Class"``.
        entry_points: the entry-point group installed packages register in, if any.
    """

    def __init__(
        self,
        kind: str,
        base: type[Any],  # type[T] would refuse an abstract base (mypy's type-abstract)
        builtin: Mapping[str, str | type[T]],
        *,
        entry_points: str | None = None,
    ) -> None:
        self.kind = kind
        self.base = base
        self._builtin = dict(builtin)
        self._added: dict[str, str | type[T]] = {}
        self._group = entry_points
        self._installed: dict[str, str] | None = None  # read once, on first need
        self._lock = threading.Lock()

    def register(self, name: str, target: str | type[T]) -> None:
        """Register ``target`` (a class or ``"module:Class"``) under ``name``, in this process.

        Rank processes are started with ``spawn``: a name registered at run time must be
        registered again in them (at import of the callback's module, say), or installed as
        an entry point.
        """
        with self._lock:
            self._added[name] = target

    def unregister(self, name: str) -> None:
        """Forget a name registered in this process (a test's plugin, say)."""
        with self._lock:
            self._added.pop(name, None)

    def names(self) -> list[str]:
        """Every known name, sorted."""
        return sorted(self._table())

    def __contains__(self, name: object) -> bool:
        return name in self._table()

    def target(self, name: str) -> str:
        """``"module:Class"`` of ``name``: what another process imports to get the same class.

        Raises:
            UnknownNameError: no entry of that name.
        """
        cls = self.get(name)
        return f"{cls.__module__}:{cls.__qualname__}"

    def get(self, name: str) -> type[T]:
        """The ``base`` subclass registered under ``name`` (imported on first use).

        Raises:
            UnknownNameError: no entry of that name, or one that is not a ``base``
                subclass; the message lists the known names.
        """
        table = self._table()
        target: object
        try:
            target = table[name]
        except KeyError:
            raise UnknownNameError(self.kind, name, sorted(table)) from None
        if isinstance(target, str):
            # An ImportError propagates: a missing library says more than an unknown name.
            module_name, _, attr = target.partition(":")
            target = getattr(importlib.import_module(module_name), attr, None)
        if not (isinstance(target, type) and issubclass(target, self.base)):
            raise UnknownNameError(self.kind, name, sorted(table))  # registered, but not one
        return cast("type[T]", target)

    def _table(self) -> dict[str, str | type[T]]:
        with self._lock:
            if self._installed is None:
                self._installed = self._read_entry_points()
            return {**self._installed, **self._builtin, **self._added}

    def _read_entry_points(self) -> dict[str, str]:
        if self._group is None:
            return {}
        return {ep.name: ep.value for ep in importlib.metadata.entry_points(group=self._group)}
