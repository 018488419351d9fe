"""Feature recipes for the SGLang golden vectors: each case's input, rebuilt from a seed.

The golden file (``tests/data/sglang_0_5_23_golden.json``) stores recipes, not tensors: a
recipe names the kind of feature (torch or numpy, its dtype and shape, and how it is laid
out: transposed, reversed, big-endian, a list, a nested list) and a seed.
``scripts/sglang_golden/make_golden.py`` builds each input with [`build`][] and records what
SGLang's own functions compute from it; the parity tests build the same input and compare.
The golden file also records the SHA-256 of each built input's bytes, so that a change in
how numpy draws random numbers shows up as "the input changed", never as a false mismatch.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch

_TORCH_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "uint8": torch.uint8,
}


def _values(seed: int, shape: list[int], dtype: str) -> np.ndarray[Any, Any]:
    rng = np.random.default_rng(seed)
    if dtype == "uint8":
        return rng.integers(0, 256, size=shape, dtype=np.uint8)
    return rng.standard_normal(size=shape, dtype=np.float32)


def _leaf(recipe: dict[str, Any]) -> Any:
    layout = recipe.get("layout", "contiguous")
    shape = list(recipe["shape"])
    # A transposed view is built from the transposed shape, so the result has ``shape``.
    drawn = shape[::-1] if layout == "transposed" else shape
    values = _values(recipe["seed"], drawn, recipe["dtype"])
    if recipe["lib"] == "numpy":
        array = values.astype(np.dtype(recipe["dtype"]).newbyteorder(recipe.get("byteorder", "=")))
        if layout == "transposed":
            return array.T
        if layout == "reversed":
            return array[::-1]
        if layout == "strided":
            return array[:, ::2]
        return array
    tensor = torch.from_numpy(values).to(_TORCH_DTYPES[recipe["dtype"]])
    if layout == "transposed":
        return tensor.t()
    if layout == "strided":
        return tensor[:, ::2]
    return tensor


def build(recipe: dict[str, Any]) -> Any:
    """The feature a recipe describes: a tensor, an array, or a (nested) list of them."""
    if "list" in recipe:
        return [build(part) for part in recipe["list"]]
    return _leaf(recipe)


def input_digest(feature: Any) -> str:
    """SHA-256 over every leaf's dtype, shape and C-order bytes, in order."""
    h = hashlib.sha256()

    def walk(value: Any) -> None:
        if isinstance(value, list):
            h.update(b"[")
            for part in value:
                walk(part)
            h.update(b"]")
        elif isinstance(value, np.ndarray):
            h.update(f"{value.dtype.str}{value.shape}".encode())
            h.update(np.ascontiguousarray(value).tobytes())
        else:
            flat = value.contiguous().reshape(-1).view(torch.uint8)
            h.update(f"{value.dtype}{tuple(value.shape)}".encode())
            h.update(flat.numpy().tobytes())

    walk(feature)
    return h.hexdigest()


def leaf(lib: str, dtype: str, shape: list[int], seed: int, **layout: str) -> dict[str, Any]:
    """A recipe for one tensor or array."""
    return {"lib": lib, "dtype": dtype, "shape": shape, "seed": seed, **layout}
