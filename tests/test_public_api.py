"""The public face: ``__all__`` sorted and complete, the package typed."""

from __future__ import annotations

import importlib.resources

import mmsched


def test_all_is_sorted_and_complete() -> None:
    assert mmsched.__all__ == sorted(mmsched.__all__, key=lambda n: (not n.isupper(), n))
    public = {n for n in vars(mmsched) if not n.startswith("_")}
    modules = {n for n in public if type(getattr(mmsched, n)).__name__ == "module"}
    assert set(mmsched.__all__) - {"__version__"} == public - modules


def test_py_typed_ships() -> None:
    assert importlib.resources.files("mmsched").joinpath("py.typed").is_file()
