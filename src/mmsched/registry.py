"""Name-to-class registries (strategies, payload stores, transports), loaded on first use.

A registry maps a name to a class, or to ``"module:Class"`` so that a deployment imports only
the implementation it picks (and the libraries it needs).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from mmsched.errors import UnknownNameError


def lookup(kind: str, registry: Mapping[str, object], name: str, base: type) -> type[Any]:
    """The ``base`` subclass registered under ``name``.

    Raises:
        UnknownNameError: no entry of that name; the message lists the known ones.
    """
    try:
        target = registry[name]
    except KeyError:
        raise UnknownNameError(kind, name, list(registry)) from None
    if isinstance(target, str):
        module_name, _, attr = target.partition(":")
        target = getattr(importlib.import_module(module_name), attr)
    if not (isinstance(target, type) and issubclass(target, base)):
        raise UnknownNameError(kind, name, list(registry))  # registered, but not a kind of it
    return target
