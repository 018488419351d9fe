"""A real consumer of the features: ``transformers``' own Qwen2-VL model on every rank.

[`TinyQwen2VL`][mmsched.models.qwen2_vl.TinyQwen2VL] builds
``Qwen2VLForConditionalGeneration`` from a tiny config with random weights (seeded, so every
rank builds the same model; nothing is downloaded) and is a rank callback: for each request
it takes the delivered ``pixel_values`` (made on the model's device from the image's uint8
pixels where those travelled instead: [`mmsched.pixels`][mmsched.pixels]) and
``image_grid_thw``, the input ids padded as a prefix cache sees them, turns each image's
span back into Qwen2-VL's image token (as SGLang's model code replaces its pad values by
the image's embeddings), and runs the real vision tower, M-RoPE position computation and
decoder, greedily. The model's own code checks that the image tokens match the vision
tower's output; a request whose features do not match fails alone with that error.

Its weights are random, so the text it generates means nothing: the point is that real model
code consumed what reached the rank. Sampling is limited to the ids the server's tokenizer
can decode (the byte tokenizer's 0-255) and ``<|im_end|>``, as a server limits sampling to
its tokenizer's vocabulary when the model's is padded. Each rank runs the whole model (a
tiny model is not sharded); rank 0's output is the answer. With ``stream=True`` the ids are
streamed as ``generate`` makes them.

On the CPU each rank process runs the model on one thread, so that TP ranks on one host do
not fight over the cores.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
from collections.abc import AsyncIterator
from typing import Any

import torch

from mmsched.errors import ModelOutputError
from mmsched.inputs import Modality, MultimodalInputs
from mmsched.messages import TokenizedGenerateReqInput
from mmsched.outputs import ModelOutput, RequestOutput
from mmsched.pixels import item_pixel_values
from mmsched.processes import RANK_PROCESS_PREFIX

log = logging.getLogger(__name__)

IMAGE_TOKEN, VIDEO_TOKEN = 151655, 151656
VISION_START, IM_END = 151652, 151645
VOCAB = 151_936  # Qwen2-VL's, so that its special token ids are real ids of the model
TEXT_IDS = 256  # what the byte tokenizer decodes

# The model of this rank process, built by on_rank_start, keyed by the callback's settings
# (a callback and its start hook reach the rank as two pickled copies).
_MODELS: dict[tuple[int, str], Any] = {}


def tiny_config() -> Any:
    """A Qwen2-VL config small enough for a CPU test: 2 text layers of width 64, 2 vision
    layers of width 32, Qwen2-VL's patching (14, temporal 2, merge 2) and token ids."""
    from transformers import Qwen2VLConfig

    return Qwen2VLConfig(
        text_config={
            "vocab_size": VOCAB,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 32_768,
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
            "eos_token_id": IM_END,
        },
        vision_config={
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": 64,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "in_chans": 3,
        },
        image_token_id=IMAGE_TOKEN,
        video_token_id=VIDEO_TOKEN,
        vision_start_token_id=VISION_START,
    )


def build_model(seed: int, device: torch.device | str = "cpu") -> Any:
    """The tiny model with weights drawn from ``seed`` (equal on every rank), in eval mode."""
    from transformers import Qwen2VLForConditionalGeneration

    # Its own draw: the process's random state (CPU and every GPU's) is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        model: Any = Qwen2VLForConditionalGeneration(tiny_config())
    return model.eval().to(device)


def model_inputs(
    input_ids: list[int], mm: MultimodalInputs | None, device: torch.device
) -> dict[str, torch.Tensor]:
    """What ``Qwen2VLForConditionalGeneration.generate`` takes, from a delivered request:
    the padded ids with each image span turned back into the image token, the images'
    ``pixel_values`` (in span order; from uint8 pixels, made on ``device``) and
    ``image_grid_thw``.

    Raises:
        ModelOutputError: a modality this model does not take, or an image without its
            ``image_grid_thw``.
        InvalidMultimodalInput: uint8 pixels that do not match their spec.
    """
    padded = mm.pad_input_ids(input_ids) if mm is not None else list(input_ids)
    ids = torch.tensor([padded], dtype=torch.long)
    pixels: list[torch.Tensor] = []
    grids: list[torch.Tensor] = []
    items = sorted(mm.mm_items, key=lambda i: i.offsets[0][0]) if mm is not None else []
    for item in items:
        if item.modality is not Modality.IMAGE:
            raise ModelOutputError(f"this model takes images, not {item.modality.value}")
        grid = item.model_specific_data.get("image_grid_thw")
        if grid is None:
            raise ModelOutputError("an image without its image_grid_thw")
        for start, end in item.offsets:
            ids[0, start : end + 1] = IMAGE_TOKEN
        # uint8 pixels (mmsched.pixels) are normalized and patchified here, on the device.
        pixels.append(item_pixel_values(item.feature, item.model_specific_data, device))
        grids.append(torch.as_tensor(grid, dtype=torch.long).reshape(-1, 3))
    out = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
    if pixels:
        out["pixel_values"] = torch.cat(pixels)
        out["image_grid_thw"] = torch.cat(grids).to(device)
    return out


def generate_ids(
    model: Any,
    inputs: dict[str, torch.Tensor],
    max_new_tokens: int,
    streamer: Any = None,
) -> list[int]:
    """Greedy generation limited to the byte tokenizer's ids and ``<|im_end|>``."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class TextIdsOnly(LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            keep = scores[:, IM_END].clone()
            scores[:, TEXT_IDS:] = float("-inf")
            scores[:, IM_END] = keep
            return scores

    with torch.inference_mode():
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            logits_processor=LogitsProcessorList([TextIdsOnly()]),
            streamer=streamer,
            pad_token_id=IM_END,
        )
    return [int(i) for i in out[0, inputs["input_ids"].shape[1] :].tolist()]


class TinyQwen2VL:
    """The rank callback and start hook of the tiny model (module docstring).

    Args:
        seed: the weights' seed.
        max_new_tokens: ids generated where a request names no ``max_new_tokens``.
        stream: stream each request's ids as they are generated.
    """

    def __init__(self, seed: int = 0, max_new_tokens: int = 16, *, stream: bool = False) -> None:
        self.seed = seed
        self.max_new_tokens = max_new_tokens
        self.stream = stream

    def on_rank_start(self, rank: int, device: torch.device) -> None:
        """Build this rank's model on ``device``."""
        if device.type == "cpu" and multiprocessing.current_process().name.startswith(
            RANK_PROCESS_PREFIX
        ):
            torch.set_num_threads(1)  # a rank process of its own: leave the cores to the others
        _MODELS[(self.seed, str(device))] = build_model(self.seed, device)
        log.info("rank %d: tiny Qwen2-VL (seed %d) on %s", rank, self.seed, device)

    async def __call__(
        self, rank: int, iteration: int, requests: list[TokenizedGenerateReqInput]
    ) -> dict[str, RequestOutput]:
        outputs: dict[str, RequestOutput] = {}
        for req in requests:
            mm = req.mm_inputs if isinstance(req.mm_inputs, MultimodalInputs) else None
            device = mm.mm_items[0].feature.device if mm is not None and mm.mm_items else None
            model = self._model(device)
            try:  # whatever one request's inputs or parameters raise is that request's error
                limit = _token_limit(req.sampling_params.get("max_new_tokens", self.max_new_tokens))
                inputs = model_inputs(req.input_ids, mm, model.device)
            except Exception as exc:
                outputs[req.rid] = _failing(exc)
                continue
            if self.stream:
                outputs[req.rid] = _streamed(model, inputs, limit)
            else:
                outputs[req.rid] = await _whole(model, inputs, limit)
        return outputs

    def _model(self, device: torch.device | None) -> Any:
        models = [m for (seed, _), m in _MODELS.items() if seed == self.seed]
        if not models:
            raise RuntimeError("the tiny Qwen2-VL runs without its on_rank_start hook")
        for (seed, where), model in _MODELS.items():
            if seed == self.seed and device is not None and where == str(device):
                return model
        return models[0]

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (self.seed, self.max_new_tokens, self.stream))


def _token_limit(value: Any) -> int:
    if type(value) is not int or value < 1:
        raise ModelOutputError(f"max_new_tokens must be a positive int, got {value!r}")
    return value


def _rebuild(seed: int, max_new_tokens: int, stream: bool) -> TinyQwen2VL:
    return TinyQwen2VL(seed, max_new_tokens, stream=stream)


async def _whole(model: Any, inputs: dict[str, torch.Tensor], limit: int) -> RequestOutput:
    try:
        ids = await asyncio.to_thread(generate_ids, model, inputs, limit)
    except Exception as exc:  # the model's own check (image tokens vs features), say
        return _failing(exc)
    return ModelOutput(ids, "length" if len(ids) >= limit and IM_END not in ids else "stop")


async def _failing(exc: BaseException) -> AsyncIterator[ModelOutput]:
    if isinstance(exc, ModelOutputError):
        raise exc
    raise ModelOutputError(f"{type(exc).__name__}: {exc}")
    yield ModelOutput([])  # pragma: no cover - makes this an async generator


async def _streamed(
    model: Any, inputs: dict[str, torch.Tensor], limit: int
) -> AsyncIterator[ModelOutput]:
    """``generate`` on a worker thread; each id handed over as it comes."""
    loop = asyncio.get_running_loop()
    chunks: asyncio.Queue[list[int] | None] = asyncio.Queue()

    class Handover:
        """transformers' streamer protocol: the prompt first, then each new id, then end."""

        def __init__(self) -> None:
            self.prompt_seen = False

        def put(self, value: torch.Tensor) -> None:
            if not self.prompt_seen:
                self.prompt_seen = True
                return
            loop.call_soon_threadsafe(chunks.put_nowait, [int(i) for i in value.reshape(-1)])

        def end(self) -> None:
            loop.call_soon_threadsafe(chunks.put_nowait, None)

    def run() -> list[int]:
        try:
            return generate_ids(model, inputs, limit, Handover())
        finally:  # generate ends the streamer only when it succeeds
            loop.call_soon_threadsafe(chunks.put_nowait, None)

    job = asyncio.ensure_future(asyncio.to_thread(run))
    count = 0
    while (chunk := await chunks.get()) is not None:
        count += len(chunk)
        yield ModelOutput(chunk)
    try:
        ids = await job
    except Exception as exc:  # the model's own check, say: one kind whether streamed or not
        raise ModelOutputError(f"{type(exc).__name__}: {exc}") from exc
    yield ModelOutput([], "length" if count >= limit and IM_END not in ids else "stop")
