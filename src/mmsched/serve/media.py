"""Images from a chat message's ``image_url`` parts: ``data:`` URLs of PNG or JPEG, decoded.

This is where a client's bytes enter the server. Whatever is wrong with them (another
scheme, another media type, bad base64, too many bytes or pixels, a file Pillow cannot
decode, or one whose content is not what its media type says) becomes a
[`BadRequest`][mmsched.serve.media.BadRequest] that names the message part, and the server
answers HTTP 400. Remote ``http(s)://`` URLs are refused: a server that fetches what a
client names can be made to reach hosts the client cannot.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from dataclasses import dataclass

from PIL import Image

from mmsched.errors import MmschedError

# Media types accepted, and the Pillow format each must decode as.
FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG"}


class BadRequest(MmschedError):
    """A client request the server cannot use; ``param`` names the part (OpenAI's field)."""

    def __init__(self, param: str, problem: str) -> None:
        super().__init__(f"{param}: {problem}")
        self.param = param
        self.problem = problem


@dataclass(frozen=True)
class MediaLimits:
    """Bounds on one image: encoded bytes, and decoded pixels (a decompression bomb is a
    small file of enormous size)."""

    max_bytes: int = 20 << 20
    max_pixels: int = 40_000_000


def decode_image_url(param: str, url: object, limits: MediaLimits) -> Image.Image:
    """The RGB image a ``data:image/png;base64,...`` (or JPEG) URL holds.

    Raises:
        BadRequest: naming ``param``, for anything but a decodable PNG or JPEG within limits.
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
    if len(payload) * 3 // 4 > limits.max_bytes:
        raise BadRequest(param, f"image larger than {limits.max_bytes >> 20} MB")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest(param, f"invalid base64: {exc}") from None
    return _decode(param, data, expected, limits)


def _decode(param: str, data: bytes, expected: str, limits: MediaLimits) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=[expected])
            width, height = image.size
            if width * height > limits.max_pixels:
                raise BadRequest(
                    param, f"{width}x{height} is more than {limits.max_pixels:,} pixels"
                )
            image.load()  # decode now: a truncated or corrupt file fails here, not later
            return image.convert("RGB")
    except BadRequest:
        raise
    except Exception as exc:  # whatever Pillow raises on foreign bytes: this image's error
        raise BadRequest(param, f"not a decodable {expected} image: {exc}") from None
