"""mmsched inside a small server: the worked example of the documentation's embedding page.

A server's request handler gets a processor's output for each request (here: Qwen2-VL-shaped
images, made up on the spot) and hands it to an ``mmsched.Pipeline``. The pipeline
validates and hashes it once, carries it to every tensor-parallel rank, and on each rank calls
``on_iteration`` with the iteration's requests: the place where a real server runs its model.

Run it with ``python examples/serve.py`` (TP=2, ``zero-copy`` over shared memory); any
``MMSCHED_*`` variable overrides the defaults below, e.g. ``MMSCHED_TP_SIZE=4`` or
``MMSCHED_STRATEGY=tokenizer MMSCHED_TRANSPORT=zmq``.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

from mmsched import (
    Config,
    InvalidMultimodalInput,
    MultimodalInputs,
    Pipeline,
    TokenizedGenerateReqInput,
)

IMAGE_TOKEN_ID = 151655  # Qwen2-VL's <|image_pad|>
PATCH_ROW = 1176  # 3 channels x 2 frames x 14 x 14 values per patch
MERGE = 4  # 2 x 2 patches become one token

Allocate = Callable[[Sequence[int], torch.dtype], torch.Tensor]


def on_iteration(rank: int, iteration: int, requests: list[TokenizedGenerateReqInput]) -> None:
    """Runs in every rank process, once per scheduler iteration that has requests.

    Every rank sees the same requests in the same iteration, with ``mm_inputs`` already built:
    hashed, pad values set, checked. A real server runs its forward pass here. Under
    ``zero-copy`` the features are views of shared memory: copy what must outlive the call.
    """
    for req in requests:
        if not isinstance(req.mm_inputs, MultimodalInputs):  # a text-only request
            continue
        for item in req.mm_inputs.mm_items:
            # One write per line: ranks share the terminal, and lines must not interleave.
            print(
                f"rank {rank} iteration {iteration}: {req.rid} {item.modality.value} "
                f"{tuple(item.feature.shape)} hash {item.hash & 0xFFFFFFFF:08x} "
                f"pad {item.pad_value}\n",
                end="",
                flush=True,
            )


def process_image(
    prompt: list[int], grid_h: int, grid_w: int, allocate: Allocate
) -> tuple[list[int], dict[str, Any]]:
    """A stand-in for an image processor: input ids and the processor's output dict.

    The processor writes ``pixel_values`` where ``allocate`` puts them: under ``zero-copy``
    that is shared memory, so no byte of the image is copied on its way to the ranks.
    """
    patches = grid_h * grid_w
    pixel_values = allocate((patches, PATCH_ROW), torch.float32)
    pixel_values.normal_()  # a real processor writes normalised pixels here
    image_tokens = patches // MERGE
    input_ids = [*prompt, *[IMAGE_TOKEN_ID] * image_tokens, *prompt]
    start = len(prompt)
    processor_output = {
        "mm_items": [
            {
                "modality": "image",
                "feature": pixel_values,
                "offsets": [(start, start + image_tokens - 1)],  # inclusive, as in SGLang
                "image_grid_thw": torch.tensor([[1, grid_h, grid_w]]),
            }
        ],
        "im_token_id": IMAGE_TOKEN_ID,
    }
    return input_ids, processor_output


async def handle(pipeline: Pipeline, rid: str, grid_h: int, grid_w: int, *, broken: bool) -> str:
    """One request handler: process, send, answer; a bad input fails this request alone."""
    input_ids, processor_output = process_image([1, 2, 3], grid_h, grid_w, pipeline.allocate_tensor)
    if broken:  # a processor bug: the image's tokens said to end past the prompt
        processor_output["mm_items"][0]["offsets"] = [(3, len(input_ids) + 10)]
    try:
        output = await pipeline.generate(rid, input_ids, processor_output)
    except InvalidMultimodalInput as exc:
        return f"{rid}: rejected: {exc}"
    return f"{rid}: {len(output.output_ids)} tokens, pad values {output.pad_values}"


async def main(requests: int) -> None:
    config = Config(strategy="zero-copy", transport="shm", tp_size=2).with_env()
    print(
        f"strategy {config.strategy}, payload store {config.payload_store}, "
        f"transport {config.transport}, TP={config.tp_size}"
    )
    async with Pipeline(config, on_iteration=on_iteration) as pipeline:
        # Requests arrive concurrently, as they do at a server; the third is malformed.
        answers = await asyncio.gather(
            *(
                handle(pipeline, f"req-{i}", 50, 80, broken=(i == 2))  # a 1120x700 image
                for i in range(requests)
            )
        )
    for answer in answers:
        print(answer)


if __name__ == "__main__":  # rank processes are spawned: this guard is required
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 4))
