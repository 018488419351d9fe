"""A chat request's messages, turned into what the pipeline takes: input ids and images.

[`ChatProcessor`][mmsched.serve.chat.ChatProcessor] renders OpenAI-style ``messages`` with
Qwen2-VL's chat layout (``<|im_start|>role ... <|im_end|>``, each image as
``<|vision_start|>`` + one ``<|image_pad|>`` per merged patch + ``<|vision_end|>``), runs
every image through the real Hugging Face ``transformers`` Qwen2-VL image processor, built
from its defaults (no download), and returns the processor-output dict that
``Pipeline.generate`` validates and hashes: one item per image, with its ``pixel_values``,
``image_grid_thw`` and the span of its pad tokens. With ``wire_pixels="uint8"`` an item's
feature is instead the processor's resized uint8 pixels, from
[`mmsched.pixels.resized_pixels`][] (the function a worker process can call too), with the
spec each rank needs to make ``pixel_values`` of them.

The text tokenizer is a stand-in that needs no download:
[`ByteTokenizer`][mmsched.serve.chat.ByteTokenizer] gives one id per UTF-8 byte. A
deployment passes its model's own tokenizer (anything with ``encode`` and ``decode``).
Qwen2-VL's special token ids are kept, so the ids have the real layout around each image.

Every malformed message raises [`BadRequest`][mmsched.serve.media.BadRequest] naming the
field (``messages[1].content[0].image_url``), which the server turns into an HTTP 400.

The server calls [`prepare_async`][mmsched.serve.chat.ChatProcessor.prepare_async]: the
images' bytes are read out of their URLs and keyed there, before any decoding, and the
preprocessing stage ([`mmsched.preprocess`][]) decodes and processes those its cache does
not hold, each item then carrying its key as ``content_hash``.
[`prepare`][mmsched.serve.chat.ChatProcessor.prepare] is the blocking path for callers
without an event loop: Pillow on threads, no cache.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from mmsched.errors import ConfigError, MmschedError
from mmsched.pixels import ITEM_KEY, WIRE_FORMATS, resized_pixels, specs_of
from mmsched.serve.media import (
    BadRequest,
    EncodedImage,
    MediaLimits,
    decode_image_url,
    read_image_url,
    with_header,
)

if TYPE_CHECKING:
    from mmsched.preprocess.stage import Preprocessor

log = logging.getLogger(__name__)

# Qwen2-VL's special token ids.
IM_START, IM_END = 151644, 151645
VISION_START, VISION_END, IMAGE_PAD = 151652, 151653, 151655
ROLES = ("system", "user", "assistant")
_NEWLINE = 10  # "\n" under the byte tokenizer
# Images of every request are processed here, side by side (one thread per core).
_POOL = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="mmsched-image")


class TextTokenizer(Protocol):
    """What the processor needs of a tokenizer."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """One id per UTF-8 byte (0-255): a tokenizer that needs no vocabulary file."""

    max_chars_per_token = 1
    """Every character is at least one token: a text of more characters than the prompt
    bound is refused without encoding it (``ChatProcessor`` reads this attribute of any
    tokenizer that has it: the longest token's length, in characters)."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


def qwen2vl_image_processor() -> Any:
    """The Qwen2-VL image processor of ``transformers``, built from its defaults (no
    download): patch 14, temporal patch 2, merge 2, CLIP normalisation, resized to between
    3,136 and 1,003,520 pixels. The Pillow/numpy implementation: it needs no torchvision."""
    import transformers

    # transformers 5 names the Pillow backend's class apart; in 4 the default class is it.
    name = "Qwen2VLImageProcessorPil"
    processor_class = getattr(transformers, name, None) or transformers.Qwen2VLImageProcessor
    return processor_class()


@dataclass
class PreparedChat:
    """One chat request, ready for ``Pipeline.generate``."""

    input_ids: list[int]
    mm_inputs: dict[str, Any] | None
    image_grids: list[tuple[int, int, int]] = field(default_factory=list)
    # Seconds spent, through a preprocessing stage: "key" (reading each image's bytes from
    # its URL and keying them), "process" (the cache, or decoding and the processor).
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def images(self) -> int:
        return len(self.image_grids)

    @property
    def feature_bytes(self) -> int:
        """Bytes of every processed image's ``pixel_values``."""
        items = (self.mm_inputs or {}).get("mm_items", [])
        return sum(int(item["feature"].nbytes) for item in items)


@dataclass
class ReadChat:
    """A chat request read but not processed: its layout (token runs, and where each image
    goes, by index), its images' encoded bytes and their content keys."""

    layout: list[list[int] | int]
    images: list[EncodedImage]
    keys: list[bytes]


class ChatProcessor:
    """Messages to input ids and processed images (module docstring)."""

    def __init__(
        self,
        tokenizer: TextTokenizer | None = None,
        *,
        limits: MediaLimits | None = None,
        max_images: int = 16,
        max_prompt_tokens: int | None = None,
        wire_pixels: str = "float32",
        preprocessor: Preprocessor | None = None,
    ) -> None:
        self.tokenizer = tokenizer or ByteTokenizer()
        self.limits = limits or MediaLimits()
        self.max_images = max_images
        self.max_prompt_tokens = max_prompt_tokens
        self.image_processor = qwen2vl_image_processor()
        self.merge = int(self.image_processor.merge_size)
        if wire_pixels not in WIRE_FORMATS:
            raise ConfigError(f"wire_pixels must be one of {', '.join(WIRE_FORMATS)}")
        self.wire_pixels = wire_pixels
        # uint8: only the processor's resize runs here; each rank does the rest.
        self.resize, patch_spec = specs_of(self.image_processor)
        self._item_data = {ITEM_KEY: patch_spec.as_dict()} if wire_pixels == "uint8" else {}
        self.preprocessor: Preprocessor | None = None
        if preprocessor is not None:
            self.attach(preprocessor)

    def attach(self, preprocessor: Preprocessor) -> None:
        """Process images through ``preprocessor`` (started by the caller) from now on, in
        [`prepare_async`][mmsched.serve.chat.ChatProcessor.prepare_async]; it must produce
        the pixels this processor's ``wire_pixels`` names.

        Raises:
            ConfigError: the stage's ``wire_pixels`` is not this processor's.
        """
        if preprocessor.settings.wire_pixels != self.wire_pixels:
            raise ConfigError(
                f"the preprocessing stage makes {preprocessor.settings.wire_pixels} pixels, "
                f"this chat processor sends {self.wire_pixels}"
            )
        self.preprocessor = preprocessor
        self.image_processor = preprocessor.backend.processor
        self.merge = int(self.image_processor.merge_size)
        self.resize, patch_spec = specs_of(self.image_processor)
        self._item_data = {ITEM_KEY: patch_spec.as_dict()} if self.wire_pixels == "uint8" else {}

    def prepare(self, messages: Any) -> PreparedChat:
        """Render, tokenize and process ``messages`` (blocking: call it off the event loop).

        The images of one request are decoded and processed side by side, on a pool of
        threads (Pillow and numpy release the GIL for most of the work): a request with
        four images then takes about as long as one with one.

        Raises:
            BadRequest: naming the first field that cannot be used.
        """
        layout, images = self._layout(messages)
        # The images, side by side; the first failure (in request order) is the answer.
        processed = list(_POOL.map(lambda job: self._image(*job), images))
        return self._assemble(layout, [(pixels, grid, None) for pixels, grid in processed])

    async def prepare_async(self, messages: Any) -> PreparedChat:
        """Like [`prepare`][mmsched.serve.chat.ChatProcessor.prepare], through the attached
        preprocessing stage (without one: ``prepare`` on a worker thread). Each image's
        bytes are read from its URL and keyed before anything is decoded; the stage's cache
        answers a repeat, the backend the rest.

        Raises:
            BadRequest: naming the first field that cannot be used (HTTP 400).
            Overloaded: a preprocessing budget is full (HTTP 503).
            PreprocessWorkerLost: a worker process died holding one of the images (503).
        """
        stage = self.preprocessor
        if stage is None:
            return await asyncio.to_thread(self.prepare, messages)
        started = time.perf_counter()
        headers = stage.backend.wants_headers
        read = await asyncio.to_thread(self.read, messages, stage.key, headers=headers)
        keyed = time.perf_counter()
        prepared = await self.process_read(read)
        prepared.timings = {"key": keyed - started, **prepared.timings}  # in their order
        return prepared

    def read(
        self, messages: Any, key: Callable[[EncodedImage], bytes], *, headers: bool = False
    ) -> ReadChat:
        """The first half of [`prepare_async`][mmsched.serve.chat.ChatProcessor.prepare_async]
        (blocking, and the bulk of an HTTP process's work): ``messages`` laid out, the text
        tokenized, each image's bytes read out of its URL (base64 undone, limits checked) and
        keyed by ``key``. Nothing is decoded; with ``headers`` each image's header is read
        too (its size checked against the pixel bound, its orientation: [`read_header`][
        mmsched.serve.media.read_header]), for a backend that
        [wants it][mmsched.preprocess.backend.Backend.wants_headers].

        Raises:
            BadRequest: naming the first field that cannot be used.
        """
        layout, images = self._layout(messages)
        encoded = [read_image_url(param, url, self.limits) for param, url in images]
        if headers:
            encoded = [with_header(image, self.limits) for image in encoded]
        return ReadChat(layout, encoded, [key(image) for image in encoded])

    async def process_read(self, read: ReadChat) -> PreparedChat:
        """The second half: ``read``'s images through the attached preprocessing stage (its
        cache answers a repeat), then the ids and items assembled.

        Raises:
            BadRequest: an image that does not decode or process (HTTP 400).
            Overloaded: a preprocessing budget is full (HTTP 503).
            PreprocessWorkerLost: a worker process died holding one of the images (503).
            ConfigError: no stage is attached.
        """
        stage = self.preprocessor
        if stage is None:
            raise ConfigError("process_read needs a preprocessing stage (attach)")
        layout, encoded, keys = read.layout, read.images, read.keys
        started = time.perf_counter()
        results = await stage.process(encoded, keys) if encoded else []
        processed = time.perf_counter()
        done: list[tuple[torch.Tensor, tuple[int, int, int], bytes | None]] = []
        for image, result in zip(encoded, results, strict=True):
            # The first failure, in request order, is the answer; named as this request
            # names the image (a repeat's failure may be another request's).
            if isinstance(result, BadRequest):
                raise BadRequest(image.param, result.problem)
            if isinstance(result, MmschedError):
                raise result
            supplied = result.key if stage.settings.supply_keys else None
            done.append((result.processed.pixels, result.processed.grid, supplied))
        prepared = self._assemble(layout, done)
        prepared.timings["process"] = processed - started
        return prepared

    def _layout(self, messages: Any) -> tuple[list[list[int] | int], list[tuple[str, Any]]]:
        """The prompt's token runs with an image's index where it goes, and each image's
        ``(param, url)``; the text is checked against the prompt bound on the way."""
        if not isinstance(messages, list) or not messages:
            raise BadRequest("messages", "expected a non-empty list of messages")
        # First the layout: token runs, and (param, url) where each image goes.
        layout: list[list[int] | int] = []
        text_tokens = 0  # so far: a prompt too long is refused before any more is encoded
        images: list[tuple[str, Any]] = []
        for m, message in enumerate(messages):
            where = f"messages[{m}]"
            if not isinstance(message, dict):
                raise BadRequest(where, f"expected an object, got {type(message).__name__}")
            role = message.get("role")
            if role not in ROLES:
                raise BadRequest(f"{where}.role", f"expected one of {', '.join(ROLES)}")
            layout.append([IM_START, *self.tokenizer.encode(f"{role}\n")])
            for p, part in enumerate(_parts(where, message.get("content"))):
                kind = part.get("type")
                if kind == "text":
                    text = part.get("text")
                    if not isinstance(text, str):
                        raise BadRequest(f"{where}.content[{p}].text", "expected a string")
                    self._check_text(text, text_tokens)
                    encoded = self.tokenizer.encode(text)
                    layout.append(encoded)
                    text_tokens += len(encoded)
                    self._check_length(text_tokens, "text")
                elif kind == "image_url":
                    if len(images) == self.max_images:
                        raise BadRequest(where, f"more than {self.max_images} images")
                    image_url = part.get("image_url")
                    url = image_url.get("url") if isinstance(image_url, dict) else image_url
                    layout.append(len(images))
                    images.append((f"{where}.content[{p}].image_url", url))
                else:
                    raise BadRequest(f"{where}.content[{p}].type", f"unsupported: {kind!r}")
            layout.append([IM_END, _NEWLINE])
        layout.append([IM_START, *self.tokenizer.encode("assistant\n")])
        # Before any image is decoded: a prompt whose text alone is too long costs no more.
        self._check_length(sum(len(r) for r in layout if isinstance(r, list)), "text")
        return layout, images

    def _assemble(
        self,
        layout: list[list[int] | int],
        processed: Sequence[tuple[torch.Tensor, tuple[int, int, int], bytes | None]],
    ) -> PreparedChat:
        """The ids and the processor-output dict from the layout and each image's
        ``pixel_values``, grid and key (``content_hash``, when the stage supplies it)."""
        ids: list[int] = []
        items: list[dict[str, Any]] = []
        grids: list[tuple[int, int, int]] = []
        for run in layout:
            if isinstance(run, list):
                ids += run
                continue
            pixels, grid, key = processed[run]
            tokens = _tokens(grid, self.merge)
            start = len(ids) + 1  # after <|vision_start|>
            ids += [VISION_START, *[IMAGE_PAD] * tokens, VISION_END]
            items.append(
                {
                    "modality": "image",
                    "feature": pixels,
                    "offsets": [(start, start + tokens - 1)],  # inclusive, as SGLang's
                    "image_grid_thw": torch.tensor([list(grid)]),
                    **self._item_data,
                }
            )
            if key is not None:  # the image's content key: the pipeline hashes nothing
                items[-1]["content_hash"] = key
            grids.append(grid)
        self._check_length(len(ids), "text and images")
        mm = None
        if items:
            mm = {
                "mm_items": items,
                "im_token_id": IMAGE_PAD,
                "im_start_id": VISION_START,
                "im_end_id": VISION_END,
            }
        return PreparedChat(ids, mm, grids)

    def _check_text(self, text: str, so_far: int) -> None:
        """Refuse, before encoding it (a long text costs time and memory to encode), a text
        that cannot fit: more characters than the bound, times the tokenizer's longest
        token, allow."""
        longest = getattr(self.tokenizer, "max_chars_per_token", None)
        if self.max_prompt_tokens is None or not isinstance(longest, int) or longest < 1:
            return
        least = -(-len(text) // longest)  # tokens the text needs at the very least
        self._check_length(so_far + least, "text, at least")

    def _check_length(self, length: int, what: str) -> None:
        """Refuse a prompt already ``length`` tokens long (of ``what``) past the bound."""
        bound = self.max_prompt_tokens
        if bound is not None and length > bound:
            raise BadRequest(
                "messages",
                f"the prompt is {length:,} tokens ({what}), more than max_prompt_tokens={bound:,}",
            )

    def _image(self, param: str, url: Any) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """One image's ``pixel_values`` (or resized uint8 pixels) and ``(t, h, w)`` grid."""
        image = decode_image_url(param, url, self.limits)
        try:
            if self._item_data:
                return resized_pixels(image, self.resize)
            out = self.image_processor(images=[image], return_tensors="np")
            pixels = np.ascontiguousarray(out["pixel_values"], dtype=np.float32)
            t, h, w = (int(x) for x in np.asarray(out["image_grid_thw"]).reshape(-1)[:3])
        except Exception as exc:  # an image the processor refuses (an extreme aspect ratio)
            raise BadRequest(param, f"the image processor refused it: {exc}") from None
        return torch.from_numpy(pixels), (t, h, w)


def _tokens(grid: tuple[int, int, int], merge: int) -> int:
    t, h, w = grid
    return t * h * w // (merge * merge)


def _parts(where: str, content: Any) -> list[dict[str, Any]]:
    """A message's content as parts: a plain string is one text part."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise BadRequest(f"{where}.content", "expected a string or a list of parts")
    for p, part in enumerate(content):
        if not isinstance(part, dict):
            raise BadRequest(f"{where}.content[{p}]", "expected an object")
    return content
