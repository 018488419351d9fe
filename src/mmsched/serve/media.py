"""Images from a chat message's ``image_url`` parts: ``data:`` URLs of PNG or JPEG, decoded.

This is where a client's bytes enter the server. Whatever is wrong with them (another
scheme, another media type, bad base64, too many bytes or pixels, a file Pillow cannot
decode, or one whose content is not what its media type says) becomes a
[`BadRequest`][mmsched.serve.media.BadRequest] that names the message part, and the server
answers HTTP 400. Remote ``http(s)://`` URLs are refused: a server that fetches what a
client names can be made to reach hosts the client cannot.

A decoded image becomes RGB the way the model's own processor and ``transformers``' image
loading would make it (so that the pixels reaching the ranks are those a direct processor
call gives): the EXIF orientation is applied (``load_image``'s ``exif_transpose``), an alpha
channel or a transparent palette colour is composited onto white (the processor's
``convert_to_rgb``), and 16-bit greyscale keeps its top 8 bits (Pillow's own ``convert``
would clip it at 255, turning almost every pixel white; Pillow already reads 16-bit colour
PNGs that way).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np
from PIL import Image, ImageOps

from mmsched.errors import MmschedError


def _pick_b64decode() -> Callable[..., bytes]:
    """pybase64's SIMD decoder where it is installed (the ``serve`` extra's), else the
    standard library's. Undoing the base64 of a 0.94 MB image takes the standard library
    3.5 ms and pybase64 0.06 ms (one core of the development machine), and it was half of
    each HTTP process's time at 600 images/s. pybase64's ``validate=True`` is the standard
    library's, save that it also refuses padding past a complete group (``"QUJD="``), which
    the standard library ignores: that is malformed base64 either way."""
    try:
        from pybase64 import b64decode
    except ImportError:
        return base64.b64decode
    return b64decode


_b64decode = _pick_b64decode()

# Media types accepted, and the Pillow format each must decode as.
FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG"}
# Pillow's modes of 16-bit (and 32-bit integer) greyscale: scaled, not clipped, to 8 bits.
_WIDE_GREY = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})


class BadRequest(MmschedError):
    """A client request the server cannot use; ``param`` names the part (OpenAI's field)."""

    def __init__(self, param: str, problem: str) -> None:
        super().__init__(f"{param}: {problem}")
        self.param = param
        self.problem = problem


def _check_pixels(param: str, width: int, height: int, limits: MediaLimits) -> None:
    """Refuse an image of more than ``limits.max_pixels`` pixels (decompression bombs)."""
    if width * height > limits.max_pixels:
        raise BadRequest(param, f"{width}x{height} is more than {limits.max_pixels:,} pixels")


@dataclass(frozen=True)
class MediaLimits:
    """Bounds on one image: encoded bytes, and decoded pixels (a decompression bomb is a
    small file of enormous size)."""

    max_bytes: int = 20 << 20
    max_pixels: int = 40_000_000


Encoded: TypeAlias = bytes | memoryview
"""An image's encoded bytes: ``bytes``, or a view of a received message's frame
(``zmq.Frame.buffer``, a writable ``memoryview``, which nothing here writes: the engine of
``--api-servers`` takes them as they came off its socket, without a copy)."""


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header says, read before its pixels are decoded
    ([`read_header`][mmsched.serve.media.read_header]).

    Attributes:
        width, height: its size as stored (before any EXIF rotation).
        orientation: its EXIF orientation tag (1, upright, where there is none).
    """

    width: int
    height: int
    orientation: int = 1

    def fields(self) -> list[int]:
        """The header as it travels in JSON (``--api-servers``): ``[width, height,
        orientation]``, read back by
        [`from_fields`][mmsched.serve.media.ImageHeader.from_fields]."""
        return [self.width, self.height, self.orientation]

    @classmethod
    def from_fields(cls, param: str, fields: object, limits: MediaLimits) -> ImageHeader:
        """A header from its [`fields`][mmsched.serve.media.ImageHeader.fields], checked as
        what another process says of an image must be: positive sizes, at most
        ``limits.max_pixels`` pixels, and an EXIF orientation from 1 to 8.

        Raises:
            BadRequest: naming ``param``: fields that are not such a header.
        """
        if not isinstance(fields, list | tuple) or len(fields) != 3:
            raise BadRequest(
                param, f"expected a header [width, height, orientation]: {fields!r:.80}"
            )
        width, height, orientation = fields
        for name, value in (("width", width), ("height", height)):
            if type(value) is not int or value < 1:
                raise BadRequest(param, f"the header's {name} is not a positive int: {value!r:.40}")
        _check_pixels(param, width, height, limits)
        if type(orientation) is not int or not 1 <= orientation <= 8:
            raise BadRequest(
                param, f"the header's EXIF orientation is not 1 to 8: {orientation!r:.40}"
            )
        return cls(width, height, orientation)


@dataclass(frozen=True)
class EncodedImage:
    """One image's encoded bytes, as the client sent them (base64 undone), not decoded yet:
    what a content key is taken over and what a preprocessing worker decodes.

    ``header`` is its [`ImageHeader`][mmsched.serve.media.ImageHeader] where the process that
    read the bytes also read that (the HTTP processes of ``--api-servers`` do, on their own
    cores), so that a backend that needs the size before decoding need not open it again.
    """

    param: str
    data: Encoded
    format: str  # the Pillow format its media type names: PNG or JPEG
    header: ImageHeader | None = None


def decode_image_url(param: str, url: object, limits: MediaLimits) -> Image.Image:
    """The RGB image a ``data:image/png;base64,...`` (or JPEG) URL holds.

    Raises:
        BadRequest: naming ``param``, for anything but a decodable PNG or JPEG within limits.
    """
    encoded = read_image_url(param, url, limits)
    return decode_image(encoded, limits)


def read_image_url(param: str, url: object, limits: MediaLimits) -> EncodedImage:
    """The encoded bytes a ``data:`` URL holds, checked (scheme, media type, base64, size)
    but not decoded.

    Raises:
        BadRequest: naming ``param``, for anything but base64 PNG or JPEG within limits.
    """
    if not isinstance(url, str):
        raise BadRequest(param, f"expected a URL string, got {type(url).__name__}")
    if not url.startswith("data:"):
        scheme = url.split(":", 1)[0][:16] if ":" in url else "no scheme"
        raise BadRequest(param, f"only data: URLs are accepted (got {scheme})")
    header, sep, payload = url[5:].partition(",")
    media_type, *params = header.split(";")
    if not sep or "base64" not in params:
        raise BadRequest(param, "expected data:<media type>;base64,<data>")
    expected = FORMATS.get(media_type.strip().lower())
    if expected is None:
        accepted = ", ".join(sorted(FORMATS))
        raise BadRequest(
            param, f"media type {media_type[:40]!r} not accepted; accepted: {accepted}"
        )
    # The decoded size, exactly, before decoding: every 4 characters are 3 bytes, less one
    # per "=" of padding (validate=True below admits no whitespace that would skew it).
    if _decoded_size(payload) > limits.max_bytes:
        raise BadRequest(param, _too_large(limits.max_bytes))
    try:
        data = _b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest(param, f"invalid base64: {exc}") from None
    if len(data) > limits.max_bytes:  # the estimate above is exact for valid base64; belt
        raise BadRequest(param, _too_large(limits.max_bytes))
    return EncodedImage(param, data, expected)


def decode_image(encoded: EncodedImage, limits: MediaLimits) -> Image.Image:
    """``encoded`` decoded into an upright RGB image (module docstring).

    Raises:
        BadRequest: naming its ``param``: not decodable as its format, or too many pixels.
    """
    return _decode(encoded.param, encoded.data, encoded.format, limits)


def open_checked(encoded: EncodedImage, limits: MediaLimits) -> Image.Image:
    """``encoded`` opened (its header read, its pixels not decoded yet) and its size checked
    against ``limits``: a decompression bomb is refused before any pixel is decoded.

    Raises:
        BadRequest: naming its ``param``: not a file of its format, or too many pixels.
    """
    try:
        # Pillow's own bound (Image.MAX_IMAGE_PIXELS: a warning past it, an error past twice
        # it) is not the server's: limits.max_pixels, checked below, is. No warnings filter
        # around the open: warnings.catch_warnings swaps the process's filters, which is not
        # safe from the threads that open images at once.
        image = Image.open(io.BytesIO(encoded.data), formats=[encoded.format])
    except Exception as exc:  # whatever Pillow raises on foreign bytes: this image's error
        raise BadRequest(encoded.param, f"not a decodable {encoded.format} image: {exc}") from None
    width, height = image.size
    _check_pixels(encoded.param, width, height, limits)
    return image


def read_header(encoded: EncodedImage, limits: MediaLimits) -> ImageHeader:
    """``encoded``'s header, checked as [`open_checked`][mmsched.serve.media.open_checked]
    checks it (its pixels are not decoded); a JPEG's EXIF orientation read too, a broken
    EXIF block counting as none.

    Raises:
        BadRequest: naming its ``param``: not a file of its format, or too many pixels.
    """
    if encoded.header is not None:
        return encoded.header
    image = open_checked(encoded, limits)
    width, height = image.size
    orientation = 1
    if encoded.format == "JPEG":
        with contextlib.suppress(Exception):  # a broken EXIF block: decoded as it is
            orientation = int(image.getexif().get(0x0112, 1))
    if not 1 <= orientation <= 8:
        # 0 (cameras that leave it unset), 9, 65535: no transform, as exif_transpose reads it.
        orientation = 1
    return ImageHeader(width, height, orientation)


def with_header(encoded: EncodedImage, limits: MediaLimits) -> EncodedImage:
    """``encoded`` with its [`ImageHeader`][mmsched.serve.media.ImageHeader] read.

    Raises:
        BadRequest: as [`read_header`][mmsched.serve.media.read_header].
    """
    if encoded.header is not None:
        return encoded
    header = read_header(encoded, limits)
    return EncodedImage(encoded.param, encoded.data, encoded.format, header)


def _decoded_size(payload: str) -> int:
    padding = 2 if payload.endswith("==") else 1 if payload.endswith("=") else 0
    return len(payload) * 3 // 4 - padding


def _too_large(max_bytes: int) -> str:
    return f"image larger than {max_bytes >> 20} MiB ({max_bytes:,} bytes)"


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` upright and in RGB, as the model's processor would see it (module docstring).

    The image must be loaded (or loadable): its pixels are read.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode in _WIDE_GREY:
        wide = np.asarray(image)
        if wide.dtype.itemsize != 2:  # mode I: 32-bit, holding 16-bit values from a PNG
            wide = np.clip(wide, 0, 0xFFFF).astype(np.uint16)
        # The top 8 of 16 bits: 65535 is white, as 255 is in 8 bits.
        grey = Image.fromarray((wide >> 8).astype(np.uint8))
        transparent = image.info.get("transparency")
        if isinstance(transparent, int):  # a tRNS grey value: those pixels are see-through
            alpha = np.where(wide == transparent, 0, 255).astype(np.uint8)
            grey = Image.merge("LA", (grey, Image.fromarray(alpha)))
        image = grey
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        # As transformers' convert_to_rgb: what is transparent shows the white beneath.
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _decode(param: str, data: Encoded, expected: str, limits: MediaLimits) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data), formats=[expected])  # Pillow's bound: open_checked
        width, height = image.size
        _check_pixels(param, width, height, limits)
        image.load()  # decode now: a truncated or corrupt file fails here, not later
        return to_rgb(image)
    except BadRequest:
        raise
    except Exception as exc:  # whatever Pillow raises on foreign bytes: this image's error
        raise BadRequest(param, f"not a decodable {expected} image: {exc}") from None
