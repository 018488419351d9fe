"""A real model behind the server: ``mmsched serve --model tiny-qwen2-vl`` (transformers'
own Qwen2-VL class, tiny config, random weights) answers the ``openai`` client with the ids
that model generated from the features that reached the ranks.

The expected text is computed here, in this process, by the same model class from the
processor's own output: equal text means the ranks' model saw the same pixels, grid, image
token positions and M-RoPE positions (which the model code computes from them).
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Iterator

import pytest
import torch

pytest.importorskip("transformers", reason="the serve extra installs transformers")
openai = pytest.importorskip("openai", reason="the test extra installs the openai client")

from mmsched import Config, MultimodalInputs, Pipeline, RequestFailed  # noqa: E402
from mmsched.models import TINY_QWEN2_VL  # noqa: E402
from mmsched.models.qwen2_vl import (  # noqa: E402
    TinyQwen2VL,
    build_model,
    generate_ids,
    model_inputs,
)
from mmsched.serve.chat import ChatProcessor  # noqa: E402
from test_serve import Server, ask, clean_env, image_part, png  # noqa: E402
from test_serve import start_server as start_server_of  # noqa: E402

MAX_TOKENS = 6


def start_server(**env_values: str) -> Iterator[Server]:
    command = [sys.executable, "-m", "mmsched", "serve", "--model", TINY_QWEN2_VL, "--tp", "2"]
    running = start_server_of(command, clean_env(**env_values), wait_s=240)
    try:
        yield running
    finally:
        if running.process.poll() is None:
            running.process.send_signal(signal.SIGINT)
            running.process.wait(60)


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    yield from start_server()


@pytest.fixture(scope="module")
def reference() -> tuple[ChatProcessor, object]:
    return ChatProcessor(), build_model(0)


def expected_text(
    reference: tuple[ChatProcessor, object], messages: list[object], device: str = "cpu"
) -> str:
    chat, model = reference
    prepared = chat.prepare(messages)
    mm = MultimodalInputs.from_dict(prepared.mm_inputs) if prepared.mm_inputs else None
    inputs = model_inputs(prepared.input_ids, mm, torch.device(device))
    return chat.tokenizer.decode(generate_ids(model, inputs, MAX_TOKENS))


@pytest.mark.parametrize("images", [1, 2])
def test_the_real_model_answers_from_the_delivered_features(
    server: Server, reference: tuple[ChatProcessor, object], images: int
) -> None:
    parts = [image_part(png(96 + 32 * n, 64 + 48 * n, seed=n)) for n in range(images)]
    messages = ask(*parts, text=f"describe {images}")
    reply = server.client().chat.completions.create(
        model=TINY_QWEN2_VL, messages=messages, max_tokens=MAX_TOKENS
    )
    assert reply.choices[0].message.content == expected_text(reference, messages)
    assert reply.usage is not None and reply.usage.completion_tokens <= MAX_TOKENS


def test_the_real_model_streams(server: Server, reference: tuple[ChatProcessor, object]) -> None:
    messages = ask(image_part(png(128, 128, seed=7)), text="stream it")
    stream = server.client().chat.completions.create(
        model=TINY_QWEN2_VL, messages=messages, max_tokens=MAX_TOKENS, stream=True
    )
    deltas = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(deltas) == expected_text(reference, messages)
    assert len([d for d in deltas if d]) >= 2  # more than one piece: it streamed


def test_uint8_and_float32_pixels_give_the_same_answer(
    server: Server, reference: tuple[ChatProcessor, object]
) -> None:
    """The server's default sends the resized uint8 pixels, which the ranks make
    pixel_values of on their device; a server sending the processor's float32 pixel_values
    answers the same (the two differ by float rounding only: no greedy choice changes)."""
    parts = [image_part(png(96 + 32 * n, 64 + 48 * n, seed=n)) for n in range(2)]
    messages = ask(*parts, text="describe both")
    uint8_reference = (ChatProcessor(wire_pixels="uint8"), reference[1])
    expected = expected_text(uint8_reference, messages)
    assert expected == expected_text(reference, messages)
    assert Config().wire_pixels == "uint8"

    def answer(running: Server) -> str | None:
        reply = running.client().chat.completions.create(
            model=TINY_QWEN2_VL, messages=messages, max_tokens=MAX_TOKENS
        )
        return reply.choices[0].message.content

    assert answer(server) == expected
    floats = start_server(MMSCHED_WIRE_PIXELS="float32")
    try:
        assert answer(next(floats)) == expected
    finally:
        floats.close()  # its finally stops the server


async def test_features_that_do_not_match_their_tokens_fail_alone() -> None:
    chat = ChatProcessor()
    good = chat.prepare(ask(image_part(png(64, 64)), text="good"))
    assert good.mm_inputs is not None
    item = good.mm_inputs["mm_items"][0]
    start, end = item["offsets"][0]
    # One image token short of what the vision tower makes of these pixels.
    short_ids = good.input_ids[:end] + good.input_ids[end + 1 :]
    short = {"mm_items": [{**item, "offsets": [(start, end - 1)]}]}
    model = TinyQwen2VL()
    config = Config(tp_size=2, transport="memory", payload_store="inline")
    async with Pipeline(config, on_iteration=model, on_rank_start=model.on_rank_start) as pipe:
        bad, fine = await asyncio.gather(
            pipe.generate("short", short_ids, short, {"max_new_tokens": 2}),
            pipe.generate("fine", good.input_ids, good.mm_inputs, {"max_new_tokens": 2}),
            return_exceptions=True,
        )
    assert isinstance(bad, RequestFailed) and bad.kind == "ModelOutputError", bad
    assert "match" in str(bad)  # the model code's own check of tokens against features
    assert not isinstance(fine, BaseException) and len(fine.output_ids) <= 2


needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU; torch sees none here"
)


@pytest.mark.gpu
@needs_gpu
def test_the_real_model_on_gpu_ranks() -> None:
    # The features reach each rank's GPU through the pinned store; the model runs there.
    chat = ChatProcessor()
    reference = (chat, build_model(0, "cuda"))
    for running in start_server(MMSCHED_DEVICE="cuda", MMSCHED_PAYLOAD_STORE="pinned"):
        for images in (1, 3):
            parts = [image_part(png(200 + 40 * n, 150, seed=n)) for n in range(images)]
            messages = ask(*parts, text="on the gpu")
            reply = running.client().chat.completions.create(
                model=TINY_QWEN2_VL, messages=messages, max_tokens=MAX_TOKENS
            )
            assert reply.choices[0].message.content == expected_text(reference, messages, "cuda")
