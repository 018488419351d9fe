"""uint8 pixels on the wire (``mmsched.pixels``): the front end's resize and each rank's
normalize-and-patchify give the image processor's own ``pixel_values``, on the CPU and on a
GPU, for both of ``transformers``' backends; the boundary refuses pixels that do not match
their grid; the server and both models work with them.

Tolerances are measured, not guessed: against the Pillow backend the largest difference is
4.8e-7 (one or two float32 ulps of values near 2: the same uint8 pixels, rescaled and
normalized in float32 here where numpy rescales in float64 first), asserted below 1e-6.
"""

from __future__ import annotations

import asyncio
import io
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("transformers", reason="the serve extra installs transformers")
from PIL import Image

from mmsched import (
    Config,
    InvalidMultimodalInput,
    MultimodalInputs,
    Pipeline,
    RequestFailed,
)
from mmsched.errors import ConfigError
from mmsched.models.qwen2_vl import (
    TinyQwen2VL,
    build_model,
    generate_ids,
    model_inputs,
)
from mmsched.pixels import (
    ITEM_KEY,
    PatchSpec,
    item_pixel_values,
    pixel_values,
    resized_pixels,
    specs_of,
)
from mmsched.serve.chat import ChatProcessor, qwen2vl_image_processor

TOLERANCE = 1e-6
"""Largest |difference| from the processor's own pixel_values (measured: 4.8e-7)."""

# (width, height): a photo, odd aspect ratios both ways, below min_pixels, a 1x1 dot, a
# strip near the processor's 200:1 bound, and one past max_pixels (shrunk).
SIZES = [(1024, 768), (333, 517), (2000, 90), (5, 300), (28, 28), (1, 1), (4000, 3000)]


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth structure plus noise: a resize of it exercises every filter tap."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = 127 + 100 * np.sin(x / 17.0)[..., None] * np.cos(y / 11.0)[..., None]
    noisy = base + rng.normal(0, 30, (height, width, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def processor_output(processor: Any, image: Image.Image) -> tuple[torch.Tensor, list[int]]:
    out = processor(images=[image], return_tensors="pt")
    return out["pixel_values"].to(torch.float32), out["image_grid_thw"].reshape(-1).tolist()


@pytest.fixture(scope="module")
def pil_processor() -> Any:
    return qwen2vl_image_processor()


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_equal_to_the_pillow_processors_pixel_values(
    pil_processor: Any, width: int, height: int
) -> None:
    resize, spec = specs_of(pil_processor)
    assert resize.backend == "pil"
    image = photo(width, height)
    expected, grid = processor_output(pil_processor, image)
    pixels, wire_grid = resized_pixels(image, resize)
    assert pixels.dtype == torch.uint8 and pixels.is_contiguous()
    assert list(wire_grid) == grid
    got = pixel_values(pixels, spec)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert (got - expected).abs().max().item() <= TOLERANCE
    # An eighth of the bytes: C*H*W uint8 against (H/14 * W/14) rows of C*2*14*14 float32.
    assert pixels.numel() * 8 == expected.numel() * expected.element_size()


def test_a_uint8_tensor_is_resized_as_its_pil_image(pil_processor: Any) -> None:
    resize, spec = specs_of(pil_processor)
    image = photo(301, 199, seed=4)
    chw = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()
    from_pil, grid = resized_pixels(image, resize)
    from_tensor, same_grid = resized_pixels(chw, resize)
    assert grid == same_grid and torch.equal(from_pil, from_tensor)
    with pytest.raises(ValueError, match=r"uint8 \(3, H, W\)"):
        resized_pixels(chw.float(), resize)
    with pytest.raises(ValueError, match="aspect ratio"):  # the processor's own refusal
        resized_pixels(photo(2010, 10), resize)
    grey = image.convert("L")  # made RGB as the processor makes it
    expected, _ = processor_output(pil_processor, grey)
    grey_pixels, _ = resized_pixels(grey, resize)
    assert (pixel_values(grey_pixels, spec) - expected).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize(("width", "height"), [(1024, 768), (333, 517), (5, 300), (1, 1)])
def test_equal_to_the_torchvision_processors_pixel_values(width: int, height: int) -> None:
    pytest.importorskip("torchvision", reason="the torchvision backend needs torchvision")
    import transformers

    processor = transformers.Qwen2VLImageProcessor()
    if getattr(processor, "backend", None) != "torchvision":
        pytest.skip("this transformers' Qwen2VLImageProcessor is not the torchvision backend")
    resize, spec = specs_of(processor)
    assert resize.backend == "torchvision"
    image = photo(width, height, seed=1)
    expected, grid = processor_output(processor, image)
    pixels, wire_grid = resized_pixels(image, resize)
    assert list(wire_grid) == grid
    # Measured: 4.8e-7 (rescale then normalize here; transformers fuses the two).
    assert (pixel_values(pixels, spec) - expected).abs().max().item() <= TOLERANCE


def test_images_of_one_size_resized_together_equal_each_resized_alone() -> None:
    pytest.importorskip("torchvision", reason="the torchvision backend needs torchvision")
    import transformers

    from mmsched.pixels import resized_batch

    processor = transformers.Qwen2VLImageProcessor()
    if getattr(processor, "backend", None) != "torchvision":
        pytest.skip("this transformers' Qwen2VLImageProcessor is not the torchvision backend")
    resize, _ = specs_of(processor)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        sizes = [(1024, 768), (333, 517), (1024, 768), (1024, 768), (5, 300)]
        images: list[Any] = [
            torch.from_numpy(np.array(photo(w, h, seed=n))).permute(2, 0, 1).contiguous().to(device)
            for n, (w, h) in enumerate(sizes)
        ]
        images.append(photo(64, 64, seed=9))  # a PIL image among them: resized alone
        together = resized_batch(images, resize)
        assert len(together) == len(images)
        for image, (pixels, grid) in zip(images, together, strict=True):
            alone, alone_grid = resized_pixels(image, resize)
            assert grid == alone_grid and torch.equal(pixels.cpu(), alone.cpu()), device
            assert pixels.is_contiguous() and pixels.untyped_storage().nbytes() == pixels.nbytes


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; torch sees none")
@pytest.mark.parametrize(("width", "height"), [(1024, 768), (2000, 90), (1, 1)])
def test_on_a_gpu_equal_to_the_processors_pixel_values(
    pil_processor: Any, width: int, height: int
) -> None:
    resize, spec = specs_of(pil_processor)
    image = photo(width, height, seed=2)
    expected, _ = processor_output(pil_processor, image)
    pixels, _ = resized_pixels(image, resize)
    got = pixel_values(pixels, spec, "cuda")
    assert got.device.type == "cuda"
    assert (got.cpu() - expected).abs().max().item() <= TOLERANCE


# -- the boundary ------------------------------------------------------------------------------


def uint8_item(pixels: torch.Tensor, grid: list[int], spec: Any) -> dict[str, Any]:
    return {
        "mm_items": [
            {
                "modality": "image",
                "feature": pixels,
                "offsets": [(1, 4)],
                "image_grid_thw": torch.tensor([grid]),
                ITEM_KEY: spec,
            }
        ]
    }


def test_the_boundary_takes_matching_pixels_and_refuses_the_rest(pil_processor: Any) -> None:
    resize, spec = specs_of(pil_processor)
    pixels, grid = resized_pixels(photo(64, 64), resize)
    good = MultimodalInputs.from_dict(uint8_item(pixels, list(grid), spec.as_dict()))
    item = good.mm_items[0]
    assert (
        item.feature.dtype == torch.uint8
        and PatchSpec.from_dict(item.model_specific_data[ITEM_KEY]) == spec
    )
    values = item_pixel_values(item.feature, item.model_specific_data, torch.device("cpu"))
    assert values.shape == (grid[1] * grid[2], 1176)

    def refused(raw: dict[str, Any], field: str, problem: str) -> None:
        with pytest.raises(InvalidMultimodalInput) as info:
            MultimodalInputs.from_dict(raw)
        assert info.value.field == field and problem in info.value.problem, info.value

    where = "mm_items[0]"
    wrong_grid = [1, grid[1] + 2, grid[2]]
    refused(
        uint8_item(pixels, wrong_grid, spec.as_dict()), f"{where}.image_grid_thw", "does not match"
    )
    refused(
        uint8_item(pixels[:, :50], list(grid), spec.as_dict()),
        f"{where}.feature",
        "multiples of 28",
    )
    refused(
        uint8_item(pixels[:2], list(grid), spec.as_dict()), f"{where}.feature", "uint8 (3, H, W)"
    )
    refused(
        uint8_item(pixels.float(), list(grid), spec.as_dict()),
        f"{where}.feature",
        "uint8 (3, H, W)",
    )
    bad_std = {**spec.as_dict(), "image_std": [0.2, 0.0, 0.3]}
    refused(uint8_item(pixels, list(grid), bad_std), f"{where}.{ITEM_KEY}.image_std[1]", "positive")
    short = {k: v for k, v in spec.as_dict().items() if k != "merge_size"}
    refused(uint8_item(pixels, list(grid), short), f"{where}.{ITEM_KEY}", "expected the fields")
    refused(uint8_item(pixels, list(grid), "uint8"), f"{where}.{ITEM_KEY}", "expected an object")
    no_grid = uint8_item(pixels, list(grid), spec.as_dict())
    del no_grid["mm_items"][0]["image_grid_thw"]
    refused(no_grid, f"{where}.image_grid_thw", "missing")
    audio = uint8_item(pixels, list(grid), spec.as_dict())
    audio["mm_items"][0]["modality"] = "audio"
    del audio["mm_items"][0]["image_grid_thw"]
    refused(audio, f"{where}.{ITEM_KEY}", "not allowed on a audio item")


def test_a_processor_the_front_end_cannot_reproduce_is_refused_at_start() -> None:
    import transformers

    name = "Qwen2VLImageProcessorPil"
    processor_class = getattr(transformers, name, None) or transformers.Qwen2VLImageProcessor
    with pytest.raises(ConfigError, match="do_normalize=True"):
        specs_of(processor_class(do_normalize=False))
    with pytest.raises(ConfigError, match="not a Qwen2-VL image processor"):
        specs_of(object())
    with pytest.raises(ConfigError, match="wire_pixels must be one of float32, uint8"):
        ChatProcessor(wire_pixels="uint16")


def test_the_config_field_its_variable_and_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    from mmsched.cli import _config, build_parser

    assert Config().wire_pixels == "uint8"
    assert Config.from_env({"MMSCHED_WIRE_PIXELS": "float32"}).wire_pixels == "float32"
    with pytest.raises(ConfigError, match="wire_pixels must be one of float32, uint8"):
        Config(wire_pixels="fp16")
    monkeypatch.setenv("MMSCHED_WIRE_PIXELS", "float32")
    assert _config(build_parser().parse_args(["serve"])).wire_pixels == "float32"
    flag = build_parser().parse_args(["serve", "--wire-pixels", "uint8"])
    assert _config(flag).wire_pixels == "uint8"  # the flag overrides the variable


# -- through the pipeline, to the model ------------------------------------------------------


def png_url(image: Image.Image) -> str:
    import base64

    out = io.BytesIO()
    image.save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def chat(*images: Image.Image, text: str = "what is it") -> list[object]:
    parts = [{"type": "image_url", "image_url": {"url": png_url(i)}} for i in images]
    return [{"role": "user", "content": [{"type": "text", "text": text}, *parts]}]


def test_the_chat_processor_sends_an_eighth_of_the_bytes() -> None:
    messages = chat(photo(1024, 768), photo(90, 700, seed=3))
    floats, uint8 = (
        ChatProcessor().prepare(messages),
        ChatProcessor(wire_pixels="uint8").prepare(messages),
    )
    assert floats.input_ids == uint8.input_ids and floats.image_grids == uint8.image_grids
    assert floats.feature_bytes == 8 * uint8.feature_bytes
    assert uint8.feature_bytes == 3 * 756 * 1036 + 3 * 700 * 84
    assert uint8.mm_inputs is not None and floats.mm_inputs is not None
    for f, u in zip(floats.mm_inputs["mm_items"], uint8.mm_inputs["mm_items"], strict=True):
        values = item_pixel_values(u["feature"], u, torch.device("cpu"))
        assert (values - f["feature"]).abs().max().item() <= TOLERANCE
    refused = chat(photo(2010, 10))  # the processor's own aspect-ratio bound: a 400
    from mmsched.serve.media import BadRequest

    with pytest.raises(BadRequest, match="the image processor refused it"):
        ChatProcessor(wire_pixels="uint8").prepare(refused)


async def test_the_tiny_model_gets_the_same_pixel_values_and_a_bad_item_fails_alone() -> None:
    floats_chat, uint8_chat = ChatProcessor(), ChatProcessor(wire_pixels="uint8")
    messages = chat(photo(96, 64, seed=5), text="same")
    floats, uint8 = floats_chat.prepare(messages), uint8_chat.prepare(messages)
    assert uint8.mm_inputs is not None and floats.mm_inputs is not None
    device = torch.device("cpu")
    from_floats = model_inputs(
        floats.input_ids, MultimodalInputs.from_dict(floats.mm_inputs), device
    )
    from_uint8 = model_inputs(uint8.input_ids, MultimodalInputs.from_dict(uint8.mm_inputs), device)
    assert torch.equal(from_floats["input_ids"], from_uint8["input_ids"])
    assert torch.equal(from_floats["image_grid_thw"], from_uint8["image_grid_thw"])
    difference = (from_floats["pixel_values"] - from_uint8["pixel_values"]).abs().max().item()
    assert difference <= TOLERANCE
    expected = generate_ids(build_model(0), from_uint8, 3)

    item = uint8.mm_inputs["mm_items"][0]
    wrong = {"mm_items": [{**item, "image_grid_thw": torch.tensor([[1, 2, 8]])}]}
    model = TinyQwen2VL()
    config = Config(tp_size=2, transport="memory", payload_store="inline")
    async with Pipeline(config, on_iteration=model, on_rank_start=model.on_rank_start) as pipe:
        good, bad = await asyncio.gather(
            pipe.generate("good", uint8.input_ids, uint8.mm_inputs, {"max_new_tokens": 3}),
            pipe.generate("bad", uint8.input_ids, wrong, {"max_new_tokens": 3}),
            return_exceptions=True,
        )
    assert isinstance(bad, InvalidMultimodalInput), bad
    assert bad.field == "mm_items[0].image_grid_thw"
    assert not isinstance(good, BaseException) and not isinstance(good, RequestFailed)
    assert list(good.output_ids) == expected


# -- the server ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def uint8_server() -> Iterator[Any]:
    pytest.importorskip("openai", reason="the test extra installs the openai client")
    import signal

    from test_serve import clean_env, start_server

    command = [sys.executable, "-m", "mmsched", "serve", "--tp", "2", "--wire-pixels", "uint8"]
    running = start_server(command, clean_env())
    yield running
    if running.process.poll() is None:
        running.process.send_signal(signal.SIGINT)
        running.process.wait(60)


def test_the_stub_server_carries_uint8_pixels(uint8_server: Any) -> None:
    from test_serve import MODEL

    reply = uint8_server.client().chat.completions.create(
        model=MODEL, messages=chat(photo(1024, 768), text="uint8")
    )
    content = reply.choices[0].message.content or ""
    assert content.startswith("1 image(s) reached all 2 rank(s).")
    assert "resized to 1036x756, 3996 patches" in content
    metrics = uint8_server.get("/metrics")[1].decode()
    line = next(ln for ln in metrics.splitlines() if ln.startswith("mmsched_feature_bytes_total"))
    assert float(line.split()[1]) == 3 * 756 * 1036  # the uint8 pixels, not 18.8 MB of floats
