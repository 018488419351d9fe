"""A payload store that is not part of mmsched: this one file plus one registry line
(``test_stores.py``) is all a new store takes, and it passes the store contract.

``files``: each tensor the tokenizer places is one file in a directory of its own in
``/dev/shm`` (tmpfs: memory, not disk); a reference names the file. A rank reads the file
into memory of its own when it resolves, so nothing it keeps pins the store, and the
tokenizer deletes a request's files when it settles them. Slower than the ``shm`` arena (a
copy on each side, a file per tensor), which is what makes it a toy; but it is a real
cross-process store: ranks in processes of their own resolve its references.
"""

from __future__ import annotations

import itertools
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mmsched.errors import ArenaFull, TransportError
from mmsched.frames import DTYPES, dtype_name, tensor_from_frame
from mmsched.hashing import tensor_bytes
from mmsched.stores import PayloadRef, PayloadStore, Placement, StoreOptions

_ROOT = Path("/dev/shm")
_FILE = re.compile(r"t[0-9]{1,18}")


class FileStore(PayloadStore):
    name = "files"
    shares_across_processes = True

    def __init__(self, options: StoreOptions, directory: Path, writer: bool) -> None:
        super().__init__(options)
        self._dir = directory
        self._writer = writer
        self._numbers = itertools.count()
        self._sizes: dict[str, int] = {}  # file -> bytes, the writer's live placements
        self._room = threading.Condition()

    @classmethod
    def create(cls, options: StoreOptions) -> FileStore:
        # The creator's pid in the name, as every mmsched segment has, for leak checks.
        directory = _ROOT / f"mmsched-{os.getpid()}-files-{secrets.token_hex(4)}"
        directory.mkdir(mode=0o700)
        return cls(options, directory, writer=True)

    @classmethod
    def attach(cls, address: str | None, consumer: int, options: StoreOptions) -> FileStore:
        if address is None or not (_ROOT / address).is_dir():
            raise TransportError(f"no files store at {address!r}")
        return cls(options, _ROOT / address, writer=False)

    @property
    def address(self) -> str | None:
        return self._dir.name

    def close(self) -> None:
        if self._writer:
            shutil.rmtree(self._dir, ignore_errors=True)

    @classmethod
    def remove_leftovers(cls, address: str | None) -> None:
        if address is not None and address.startswith("mmsched-") and "/" not in address:
            shutil.rmtree(_ROOT / address, ignore_errors=True)

    def placement(self, *, wait: bool = True) -> Placement:
        return _FilePlacement(self, wait=wait)

    def put(self, tensor: torch.Tensor) -> PayloadRef | None:
        return self.place(tensor, wait=True)

    def place(self, tensor: torch.Tensor, *, wait: bool) -> PayloadRef | None:
        """``put``, waiting for room only if ``wait``."""
        if not self._writer or dtype_name(tensor.dtype) not in DTYPES:
            return None  # a rank holds copies: what it forwards travels inline
        data = tensor_bytes(tensor)
        if data.nbytes > self.options.capacity_bytes:
            return None  # can never fit
        file = self._reserve(data.nbytes, wait)
        partial = self._dir / f"{file}.part"
        with open(partial, "wb") as f:
            f.write(data)
        partial.rename(self._dir / file)  # a reader never sees half a file
        location = (self._dir.name, file)
        return PayloadRef(self.name, dtype_name(tensor.dtype), tuple(tensor.shape), "cpu", location)

    def _reserve(self, nbytes: int, wait: bool) -> str:
        """A new file's name, its bytes counted against the capacity (waiting for room)."""
        wait_s = 0.0 if self.options.reject_when_full or not wait else self.options.timeout_s
        deadline = time.monotonic() + wait_s
        with self._room:
            while sum(self._sizes.values()) + nbytes > self.options.capacity_bytes:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ArenaFull(f"no room for {nbytes} bytes in the files store")
                self._room.wait(left)
            file = f"t{next(self._numbers)}"
            self._sizes[file] = nbytes
            return file

    def settle(self, placed: Sequence[Any], *, sent: bool = True) -> None:
        # Every rank copied what it resolved: sent or not, the files can go.
        with self._room:
            for file in placed:
                (self._dir / str(file)).unlink(missing_ok=True)
                self._sizes.pop(str(file), None)
            self._room.notify_all()

    def resolve(self, ref: PayloadRef) -> torch.Tensor:
        if ref.store != self.name or len(ref.location) != 2:
            raise TransportError(f"not a reference of this files store: {ref}")
        directory, file = ref.location
        # Only a file of this store's own directory: a reference comes from another process.
        if directory != self._dir.name or not isinstance(file, str) or not _FILE.fullmatch(file):
            raise TransportError(f"not a file of this files store: {ref.location}")
        try:
            data = (self._dir / file).read_bytes()
        except FileNotFoundError:
            raise TransportError(f"no file {file} in the files store (settled?)") from None
        return tensor_from_frame(bytearray(data), ref.dtype, list(ref.shape))


class _FilePlacement(Placement):
    """One request's files: each put's file is listed, to be deleted when it is settled."""

    def put(self, tensor: torch.Tensor) -> PayloadRef | None:
        assert isinstance(self.store, FileStore)
        ref = self.store.place(tensor, wait=self.wait)
        if ref is not None:
            self.placed.append(ref.location[1])
        return ref
