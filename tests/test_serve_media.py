"""Client images at the server's door: what decodes, and what is refused by name."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest

Image = pytest.importorskip("PIL.Image", reason="the serve extra installs Pillow")

from mmsched.serve.media import BadRequest, MediaLimits, decode_image_url  # noqa: E402


def data_url(fmt: str, media_type: str, width: int = 64, height: int = 48) -> str:
    out = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(out, format=fmt)
    return f"data:{media_type};base64," + base64.b64encode(out.getvalue()).decode()


@pytest.mark.parametrize(("fmt", "media_type"), [("PNG", "image/png"), ("JPEG", "image/jpeg")])
def test_png_and_jpeg_decode_to_rgb(fmt: str, media_type: str) -> None:
    image = decode_image_url("p", data_url(fmt, media_type), MediaLimits())
    assert (image.mode, image.size) == ("RGB", (64, 48))


@pytest.mark.parametrize(
    ("url", "limits", "problem"),
    [
        (data_url("PNG", "image/png", 400, 300), MediaLimits(max_pixels=100_000), "pixels"),
        (data_url("PNG", "image/png", 400, 300), MediaLimits(max_bytes=1000), "larger than"),
        (data_url("GIF", "image/gif"), MediaLimits(), "not accepted"),
        (data_url("PNG", "image/png").replace(";base64", ""), MediaLimits(), "base64"),
        (None, MediaLimits(), "expected a URL string"),
        ("file:///etc/passwd", MediaLimits(), "only data: URLs"),
    ],
    ids=["pixels", "bytes", "gif", "not-base64", "not-a-string", "file"],
)
def test_refusals_name_the_part(url: object, limits: MediaLimits, problem: str) -> None:
    with pytest.raises(BadRequest, match=problem) as info:
        decode_image_url("messages[0].content[1].image_url", url, limits)
    assert info.value.param == "messages[0].content[1].image_url"


def test_random_bytes_are_refused_not_crashing() -> None:
    rng = np.random.default_rng(1)
    for _ in range(50):
        junk = base64.b64encode(rng.bytes(int(rng.integers(1, 4000)))).decode()
        with pytest.raises(BadRequest):
            decode_image_url("p", "data:image/png;base64," + junk, MediaLimits())
