"""The few CUDA runtime calls torch does not expose: device memory and its IPC handles.

A GPU pool shared between processes must be freed by its owner when the owner says so.
torch's own sharing (``torch.multiprocessing``) counts the importers' references and, when
an importer dies without giving its reference back, keeps the memory forever: one killed
rank would leak the whole pool. Here the pool is a plain ``cudaMalloc`` allocation, its
handle is ``cudaIpcGetMemHandle``'s 64 bytes, and importers map it with
``cudaIpcOpenMemHandle``; both sides see it as an ordinary torch tensor through
``__cuda_array_interface__``. The owner frees it when its store closes, after the ranks
have exited (their mappings go with their processes).

The runtime library is the one torch loaded (found among this process's mappings), so the
calls share torch's CUDA contexts.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mmsched.errors import ConfigError

HANDLE_BYTES = 64
_LAZY_ENABLE_PEER_ACCESS = 1  # cudaIpcMemLazyEnablePeerAccess


class _IpcHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_char * HANDLE_BYTES)]


@functools.cache
def _runtime() -> ctypes.CDLL:
    torch.cuda.init()  # type: ignore[no-untyped-call]
    candidates = [
        line.split()[-1]
        for line in Path("/proc/self/maps").read_text().splitlines()
        if "libcudart" in line and line.split()[-1].startswith("/")
    ]
    found = ctypes.util.find_library("cudart")
    path = candidates[0] if candidates else found
    if path is None:
        raise ConfigError("cannot find the CUDA runtime library (libcudart) torch uses")
    lib = ctypes.CDLL(path)
    lib.cudaMalloc.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t]
    lib.cudaFree.argtypes = [ctypes.c_void_p]
    lib.cudaIpcGetMemHandle.argtypes = [ctypes.POINTER(_IpcHandle), ctypes.c_void_p]
    lib.cudaIpcOpenMemHandle.argtypes = [
        ctypes.POINTER(ctypes.c_void_p),
        _IpcHandle,
        ctypes.c_uint,
    ]
    lib.cudaIpcCloseMemHandle.argtypes = [ctypes.c_void_p]
    lib.cudaGetErrorString.restype = ctypes.c_char_p
    for name in ("cudaMalloc", "cudaFree", "cudaIpcGetMemHandle", "cudaIpcOpenMemHandle"):
        getattr(lib, name).restype = ctypes.c_int
    lib.cudaIpcCloseMemHandle.restype = ctypes.c_int
    return lib


def _check(code: int, what: str) -> None:
    if code != 0:
        message = _runtime().cudaGetErrorString(code).decode(errors="replace")
        raise RuntimeError(f"{what} failed: CUDA error {code} ({message})")


class DeviceBuffer:
    """``nbytes`` of device memory at ``address`` on ``device``, given back by ``free`` when
    the last tensor on it is gone (torch keeps this object alive under its tensors)."""

    def __init__(
        self, address: int, nbytes: int, device: torch.device, free: Callable[[int], None]
    ) -> None:
        self.address = address
        self.nbytes = nbytes
        self.device = device
        weakref.finalize(self, free, address)

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return {
            "shape": (self.nbytes,),
            "typestr": "|u1",
            "data": (self.address, False),
            "version": 2,
        }

    def tensor(self) -> torch.Tensor:
        """The memory as a flat uint8 tensor (no copy)."""
        with torch.cuda.device(self.device):
            return torch.as_tensor(self, device=self.device)


def allocate(nbytes: int, device: torch.device) -> DeviceBuffer:
    """``nbytes`` of fresh device memory on ``device`` (outside torch's caching allocator).

    Raises:
        RuntimeError: the device has no room (CUDA's own error, named).
    """
    lib = _runtime()
    address = ctypes.c_void_p()
    with torch.cuda.device(device):
        _check(lib.cudaMalloc(ctypes.byref(address), nbytes), f"cudaMalloc({nbytes})")
    assert address.value is not None

    def free(at: int) -> None:
        with torch.cuda.device(device):
            lib.cudaFree(ctypes.c_void_p(at))

    return DeviceBuffer(address.value, nbytes, device, free)


def export_handle(buffer: DeviceBuffer) -> bytes:
    """The IPC handle of memory from [`allocate`][mmsched.cudart.allocate]."""
    handle = _IpcHandle()
    with torch.cuda.device(buffer.device):
        _check(
            _runtime().cudaIpcGetMemHandle(ctypes.byref(handle), ctypes.c_void_p(buffer.address)),
            "cudaIpcGetMemHandle",
        )
    return ctypes.string_at(ctypes.addressof(handle), HANDLE_BYTES)


def open_handle(handle: bytes, nbytes: int, device: torch.device) -> DeviceBuffer:
    """Another process's memory, by its IPC handle, mapped into this process.

    Raises:
        ConfigError: ``handle`` is not 64 bytes.
        RuntimeError: the driver refused it (a stale or foreign handle).
    """
    if len(handle) != HANDLE_BYTES:
        raise ConfigError(f"a CUDA IPC handle is {HANDLE_BYTES} bytes, not {len(handle)}")
    lib = _runtime()
    raw = _IpcHandle()
    ctypes.memmove(ctypes.addressof(raw), handle, HANDLE_BYTES)
    address = ctypes.c_void_p()
    with torch.cuda.device(device):
        _check(
            lib.cudaIpcOpenMemHandle(ctypes.byref(address), raw, _LAZY_ENABLE_PEER_ACCESS),
            "cudaIpcOpenMemHandle",
        )
    assert address.value is not None

    def close(at: int) -> None:
        with torch.cuda.device(device):
            lib.cudaIpcCloseMemHandle(ctypes.c_void_p(at))

    return DeviceBuffer(address.value, nbytes, device, close)
