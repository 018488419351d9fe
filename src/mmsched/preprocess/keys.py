"""Content keys: BLAKE3 over an image's encoded bytes and the processor that turns them into
features.

A key is taken before any decoding, as soon as the image's bytes are out of the request
body, so a repeated image costs one hash of its (compressed) bytes (about 0.1 ms for a 1 MB
JPEG) instead of a decode and a processor run. What goes in, each field length-prefixed (8
bytes, big-endian) so that no field can run into the next:

1. a domain tag (``mmsched.media.v1``),
2. the processor's identity ([`processor_identity`][mmsched.preprocess.keys.processor_identity]:
   its class, library versions, the backend that runs it, and every option it was built
   with), so that another processor, or the same one with other options, never shares a
   key,
3. the media type the client declared (PNG or JPEG: it picks the decoder),
4. the encoded bytes.

The key is 32 bytes; its first 8, read big-endian, are the feature's content hash that the
pipeline carries to the ranks (their feature cache and the pad values), passed as the item's
``content_hash`` so that the features are not hashed a second time.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import blake3

KEY_BYTES = 32
_DOMAIN = b"mmsched.media.v1"


def _framed(fields: Iterable[bytes | memoryview]) -> Iterable[bytes | memoryview]:
    for value in fields:
        yield len(value).to_bytes(8, "big")  # bytes: a view's are cast to bytes below
        yield value


def content_key(data: bytes | memoryview, media_format: str, identity: bytes) -> bytes:
    """The 32-byte key of one encoded image under the processor ``identity``."""
    h = blake3.blake3()
    encoded = memoryview(data).cast("B")  # its bytes as they are: no copy of a megabyte
    for part in _framed((_DOMAIN, identity, media_format.encode(), encoded)):
        h.update(part)
    return h.digest(KEY_BYTES)


def key_hash(key: bytes) -> int:
    """The pipeline's 64-bit content hash of a key: its first 8 bytes, big-endian."""
    return int.from_bytes(key[:8], "big")


def processor_identity(
    backend: str, processor: Any, extra: Mapping[str, Any] | None = None
) -> bytes:
    """What makes a processor's output what it is, as bytes: the backend that runs it
    (``torchvision``, ``pil``, ``cuda``...), its class, the versions of the libraries that
    compute it, and every option it holds (``to_dict``, keys sorted)."""
    import transformers

    cls = type(processor)
    options = processor.to_dict() if hasattr(processor, "to_dict") else {}
    fields: dict[str, Any] = {
        "backend": backend,
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "transformers": transformers.__version__,
        "options": options,
        **(extra or {}),
    }
    return json.dumps(fields, sort_keys=True, default=_plain).encode()


def _plain(value: Any) -> Any:
    """Options JSON has no type for: enums (``resample``) by value, the rest as text."""
    inner = getattr(value, "value", None)
    return inner if isinstance(inner, int | str) else repr(value)
