"""Client images at the server's door: what decodes, and what is refused by name."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest

Image = pytest.importorskip("PIL.Image", reason="the serve extra installs Pillow")

from mmsched.serve.media import (  # noqa: E402
    BadRequest,
    MediaLimits,
    decode_image_url,
    read_image_url,
)


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


@pytest.mark.parametrize(
    "payload",
    ["QUJD=", "QUJ", "QU JD", "QUJD\n", "QUJ\u00e9", "QU=D"],
    # padding-past-a-group: refused by pybase64 (the serve extra's), which the server uses
    ids=["padding-past-a-group", "short", "space", "newline", "non-ascii", "inner-padding"],
)
@pytest.mark.parametrize("decoder", ["picked", "standard library"])
def test_malformed_base64_is_refused(
    payload: str, decoder: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mmsched.serve import media

    if decoder == "standard library":  # the fallback where pybase64 is not installed
        monkeypatch.setattr(media, "_b64decode", base64.b64decode)
    if payload == "QUJD=" and media._b64decode is base64.b64decode:
        pytest.skip("the standard library ignores padding past a complete group")
    with pytest.raises(BadRequest, match=r"invalid base64|expected"):
        read_image_url("p", "data:image/png;base64," + payload, MediaLimits())


def test_base64_decodes_as_the_standard_library_decodes_it() -> None:
    rng = np.random.default_rng(2)
    for size in (0, 1, 2, 3, 4, 1000, 65_537):
        text = base64.b64encode(rng.bytes(size)).decode()
        assert read_image_url("p", "data:image/png;base64," + text, MediaLimits()).data == (
            base64.b64decode(text, validate=True)
        )


def test_random_bytes_are_refused_not_crashing() -> None:
    rng = np.random.default_rng(1)
    for _ in range(50):
        junk = base64.b64encode(rng.bytes(int(rng.integers(1, 4000)))).decode()
        with pytest.raises(BadRequest):
            decode_image_url("p", "data:image/png;base64," + junk, MediaLimits())


def encoded(image: Image.Image, fmt: str = "PNG", **save: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **save)
    return out.getvalue()


def url_of(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64," + base64.b64encode(data).decode()


def padded_png(size: int) -> bytes:
    """A valid PNG of exactly ``size`` bytes: pixels, then bytes after IEND Pillow ignores."""
    data = encoded(Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)))
    return data + b"\0" * (size - len(data))


def test_the_byte_limit_is_exact() -> None:
    limits = MediaLimits(max_bytes=20 << 20)
    for size in (limits.max_bytes - 1, limits.max_bytes - 2, limits.max_bytes):
        decode_image_url("p", url_of(padded_png(size)), limits)  # every padding: 0, 1, 2 "="
    with pytest.raises(BadRequest, match=r"larger than 20 MiB \(20,971,520 bytes\)"):
        decode_image_url("p", url_of(padded_png(limits.max_bytes + 1)), limits)


def logo() -> Image.Image:
    """A black square on a transparent background."""
    rgba = np.zeros((48, 64, 4), dtype=np.uint8)
    rgba[12:36, 16:48, 3] = 255
    return Image.fromarray(rgba)


def exif_rotated() -> bytes:
    """A JPEG stored 64x32 whose EXIF orientation (6: rotate 90° clockwise) shows it 32x64."""
    pixels = np.zeros((32, 64, 3), dtype=np.uint8)
    pixels[:, :8] = 255  # a white band on the left edge, stored: on top once shown
    exif = Image.Exif()
    exif[0x0112] = 6
    return encoded(Image.fromarray(pixels), "JPEG", exif=exif, quality=95)


def grey16() -> bytes:
    """A 16-bit greyscale PNG: a ramp from black to white."""
    ramp = np.linspace(0, 0xFFFF, 64 * 48).reshape(48, 64).astype(np.uint16)
    return encoded(Image.fromarray(ramp))


def test_alpha_is_composited_onto_white() -> None:
    for mode in ("RGBA", "LA"):
        image = decode_image_url("p", url_of(encoded(logo().convert(mode))), MediaLimits())
        pixels = np.asarray(image)
        assert image.mode == "RGB"
        assert (pixels[0, 0] == 255).all() and (pixels[20, 30] == 0).all(), mode
    palette = logo().convert("RGBA").quantize()  # a palette PNG with a transparent entry
    pixels = np.asarray(decode_image_url("p", url_of(encoded(palette)), MediaLimits()))
    assert (pixels[0, 0] == 255).all()


def test_exif_orientation_is_applied() -> None:
    image = decode_image_url("p", url_of(exif_rotated(), "image/jpeg"), MediaLimits())
    pixels = np.asarray(image)
    assert image.size == (32, 64)
    assert pixels[:4].mean() > 200 and pixels[-4:].mean() < 50


@pytest.mark.parametrize("tag", [0, 9, 65535])
def test_an_exif_orientation_outside_1_to_8_is_read_as_none(tag: int) -> None:
    # Cameras leave 0; decoding ignores such a tag, so the header the HTTP processes send
    # the engine (which refuses values outside 1 to 8) must read it as 1 as well.
    from mmsched.serve.media import ImageHeader, read_header

    pixels = np.zeros((32, 64, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = tag
    data = encoded(Image.fromarray(pixels), "JPEG", exif=exif, quality=95)
    image = read_image_url("p", url_of(data, "image/jpeg"), MediaLimits())
    header = read_header(image, MediaLimits())
    assert header == ImageHeader(64, 32, 1)
    assert ImageHeader.from_fields("p", header.fields(), MediaLimits()) == header
    assert decode_image_url("p", url_of(data, "image/jpeg"), MediaLimits()).size == (64, 32)


def test_16_bit_grey_is_scaled_not_clipped() -> None:
    pixels = np.asarray(decode_image_url("p", url_of(grey16()), MediaLimits()))[..., 0]
    ramp = np.linspace(0, 0xFFFF, 64 * 48).reshape(48, 64).astype(np.uint16)
    assert (pixels == ramp >> 8).all()
    assert pixels.min() == 0 and pixels.max() == 255 and 100 < pixels.mean() < 155


@pytest.mark.parametrize(
    ("data", "media_type"),
    [
        (encoded(logo()), "image/png"),
        (encoded(logo().convert("LA")), "image/png"),
        (exif_rotated(), "image/jpeg"),
        (grey16(), "image/png"),
        (encoded(Image.fromarray(np.full((40, 40, 3), 7, dtype=np.uint8))), "image/png"),
    ],
    ids=["rgba", "la", "exif", "16-bit", "rgb"],
)
def test_the_server_and_a_direct_processor_call_see_the_same_pixels(
    data: bytes, media_type: str
) -> None:
    from PIL import ImageOps
    from transformers.image_utils import load_image

    from mmsched.serve.chat import qwen2vl_image_processor

    processor = qwen2vl_image_processor()
    served = processor(
        images=[decode_image_url("p", url_of(data, media_type), MediaLimits())],
        return_tensors="np",
    )
    # The reference: transformers' loading (EXIF applied), alpha composited onto white
    # with Pillow (what transformers' convert_to_rgb does in 5.24; 5.17's drops the alpha
    # instead, a transparent pixel keeping the colour stored under it), 16 bits
    # scaled; load_image's own convert("RGB") would drop the alpha and clip 16 bits, so an
    # image with either is handed over before it.
    opened = Image.open(io.BytesIO(data))
    if "A" in opened.getbands():
        rgba = ImageOps.exif_transpose(opened).convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        reference_image = Image.alpha_composite(white, rgba).convert("RGB")
    elif opened.mode.startswith("I"):
        reference_image = Image.fromarray((np.asarray(opened) >> 8).astype(np.uint8))
    else:
        reference_image = load_image(opened)
    reference = processor(images=[reference_image], return_tensors="np")
    assert (served["image_grid_thw"] == reference["image_grid_thw"]).all()
    assert np.array_equal(served["pixel_values"], reference["pixel_values"])


def test_a_header_is_read_once_where_the_bytes_arrive() -> None:
    from mmsched.serve.chat import ChatProcessor
    from mmsched.serve.media import EncodedImage, ImageHeader, read_header, with_header

    limits = MediaLimits()
    rotated = EncodedImage("p", memoryview(exif_rotated()), "JPEG")
    assert read_header(rotated, limits) == ImageHeader(64, 32, 6)  # as stored, and its tag
    read = with_header(rotated, limits)
    assert read.header == ImageHeader(64, 32, 6) and read.data is rotated.data
    # Once read it is what a backend gets, without opening the bytes again.
    claimed = EncodedImage("p", b"not an image", "PNG", ImageHeader(5, 7))
    assert read_header(claimed, limits) == ImageHeader(5, 7)
    with pytest.raises(BadRequest, match="p"):
        read_header(EncodedImage("p", b"not an image", "PNG"), limits)

    def messages(url: str) -> list[dict[str, object]]:
        part = {"type": "image_url", "image_url": {"url": url}}
        return [{"role": "user", "content": [{"type": "text", "text": "hi"}, part]}]

    chat = ChatProcessor()
    good = chat.read(messages(url_of(exif_rotated(), "image/jpeg")), lambda i: b"k", headers=True)
    assert [i.header for i in good.images] == [ImageHeader(64, 32, 6)]
    plain = chat.read(messages(url_of(exif_rotated(), "image/jpeg")), lambda i: b"k")
    assert [i.header for i in plain.images] == [None]  # nothing opened unless asked
    broken = url_of(exif_rotated()[:200], "image/jpeg")  # a cut-off file: refused at the read
    with pytest.raises(BadRequest, match="image_url"):
        chat.read(messages(broken), lambda i: b"k", headers=True)


def test_a_header_travels_as_its_fields_and_comes_back_checked() -> None:
    from mmsched.serve.media import ImageHeader

    limits = MediaLimits(max_pixels=1000)
    for header in (ImageHeader(40, 25, 1), ImageHeader(1, 1, 8), ImageHeader(10, 100, 6)):
        assert ImageHeader.from_fields("p", header.fields(), limits) == header
    refused = {
        "expected a header": [[5, 7], [5, 7, 1, 1], {"width": 5}, None, "5x7"],
        "width is not a positive int": [[0, 7, 1], [-5, 7, 1], [5.0, 7, 1], [True, 7, 1]],
        "height is not a positive int": [[5, 0, 1], [5, "7", 1], [5, None, 1]],
        "more than 1,000 pixels": [[40, 26, 1], [10**9, 10**9, 1]],
        "orientation is not 1 to 8": [[5, 7, 0], [5, 7, 9], [5, 7, -1], [5, 7, 1.0]],
    }
    for problem, cases in refused.items():
        for fields in cases:
            with pytest.raises(BadRequest, match=problem) as info:
                ImageHeader.from_fields("messages[0].content[1].image_url", fields, limits)
            assert info.value.param == "messages[0].content[1].image_url", fields
