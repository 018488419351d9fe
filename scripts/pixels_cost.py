"""What each image costs the front end and a rank, float32 against uint8 pixels on the wire.

For one JPEG of the size ``mmsched bench serve`` sends (random pixels, as it makes them), the
median of ``--repeats`` runs of: decoding it (Pillow), the float32 path's processor call
(Qwen2-VL's Pillow image processor: resize, rescale, normalize, patchify), the uint8 path's
front end (the resize alone, ``mmsched.pixels.resized_pixels``), a rank's
``mmsched.pixels.pixel_values`` on one thread (as a rank process runs) and on all, and
BLAKE3 over each form's bytes (what the tokenizer hashes); then the bytes of each form. One
line of JSON per figure, then a table. Run it with the project's Python (the serve extra).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import blake3
import numpy as np
import torch
from PIL import Image

from mmsched.pixels import pixel_values, resized_pixels, specs_of
from mmsched.serve.chat import qwen2vl_image_processor


def median_ms(job: Callable[[], Any], repeats: int) -> float:
    job()  # warm: first-call costs (imports, allocator) are not the steady state
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        job()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", default="1024x768", help="WIDTHxHEIGHT")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    width, height = (int(n) for n in args.image_size.split("x"))
    rng = np.random.default_rng(0)
    encoded = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(
        encoded, format="JPEG", quality=90
    )
    jpeg = encoded.getvalue()
    image = Image.open(io.BytesIO(jpeg)).convert("RGB")
    processor = qwen2vl_image_processor()
    resize, spec = specs_of(processor)
    floats = torch.from_numpy(processor(images=[image], return_tensors="np")["pixel_values"])
    pixels, _ = resized_pixels(image, resize)
    threads = torch.get_num_threads()

    def on_one_thread() -> None:
        torch.set_num_threads(1)
        try:
            pixel_values(pixels, spec)
        finally:
            torch.set_num_threads(threads)

    rows = {
        "decode_ms": median_ms(lambda: Image.open(io.BytesIO(jpeg)).convert("RGB"), args.repeats),
        "float32_front_end_ms": median_ms(
            lambda: processor(images=[image], return_tensors="np"), args.repeats
        ),
        "uint8_front_end_ms": median_ms(lambda: resized_pixels(image, resize), args.repeats),
        "uint8_rank_ms_1_thread": median_ms(on_one_thread, args.repeats),
        f"uint8_rank_ms_{threads}_threads": median_ms(
            lambda: pixel_values(pixels, spec), args.repeats
        ),
        "float32_blake3_ms": median_ms(
            lambda: blake3.blake3(floats.numpy().tobytes()).digest(), args.repeats
        ),
        "uint8_blake3_ms": median_ms(
            lambda: blake3.blake3(pixels.numpy().tobytes()).digest(), args.repeats
        ),
        "jpeg_bytes": len(jpeg),
        "float32_bytes": floats.numel() * floats.element_size(),
        "uint8_bytes": pixels.numel(),
    }
    print(json.dumps({"image_size": args.image_size, "repeats": args.repeats, **rows}))
    for name, value in rows.items():
        print(f"{name:>28}  {value:,.2f}" if isinstance(value, float) else f"{name:>28}  {value:,}")


if __name__ == "__main__":
    main()
