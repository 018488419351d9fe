"""Compare the preprocessing backends on one synthetic photo-like JPEG: time per image and how
far each backend's pixel_values lie from the Pillow backend's (max and mean absolute
difference after normalisation), then images/s through each backend with many at once.

    .venv/bin/python scripts/preprocess_compare.py --size 1024x768 --images 64

Backends it cannot run here (torchvision absent, no GPU) are reported as skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import time
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmsched.preprocess.backend import Processed
from mmsched.preprocess.processor import PIL, TORCHVISION, torchvision_available
from mmsched.serve.media import EncodedImage, MediaLimits


def photo(width: int, height: int, seed: int) -> EncodedImage:
    """A smooth image with noise (JPEG-friendly, unlike pure noise), as a camera's would be."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack(
        [128 + 100 * np.sin(x / (40 + 10 * c) + y / (60 + 5 * c) + seed) for c in range(3)], -1
    )
    pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return EncodedImage(f"image[{seed}]", out.getvalue(), "JPEG")


async def throughput(backend: Any, images: list[EncodedImage]) -> float:
    await backend.process(images[:2])  # warm
    start = time.perf_counter()
    results = await asyncio.gather(*(backend.process([image]) for image in images))
    elapsed = time.perf_counter() - start
    assert all(isinstance(r[0], Processed) for r in results), results[:1]
    return len(images) / elapsed


def difference(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    d = (a.float().cpu() - b.float().cpu()).abs()
    return {"max": round(float(d.max()), 3), "mean": round(float(d.mean()), 4)}


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="1024x768")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--device", default="cuda:0")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    limits = MediaLimits()
    images = [photo(width, height, seed) for seed in range(args.images)]
    report: dict[str, Any] = {"size": args.size, "jpeg_bytes": len(images[0].data)}

    from mmsched.preprocess.threads import ThreadBackend

    threads = ThreadBackend(limits)
    reference = threads.process_one(images[0])
    assert isinstance(reference, Processed)
    start = time.perf_counter()
    for image in images[:8]:
        threads.process_one(image)
    report["pil_ms_per_image_one_thread"] = round((time.perf_counter() - start) / 8 * 1e3, 2)
    report["threads_images_per_s"] = round(await throughput(threads, images), 1)
    await threads.aclose()

    from mmsched.preprocess.pool import ProcessPoolBackend

    kind = TORCHVISION if torchvision_available() else PIL
    pool = ProcessPoolBackend(limits, args.workers, kind)
    await pool.start(None)
    try:
        [pooled] = await pool.process(images[:1])
        assert isinstance(pooled, Processed)
        report[f"cpu_pool_{kind}"] = {
            "workers": args.workers,
            "images_per_s": round(await throughput(pool, images), 1),
            "vs_pil": difference(pooled.pixels, reference.pixels),
        }
    finally:
        await pool.aclose()

    if not (torch.cuda.is_available() and torchvision_available()):
        report["cuda"] = "skipped: needs a CUDA GPU and torchvision"
    else:
        from mmsched.preprocess.cuda import CudaBackend

        cuda = CudaBackend(limits, args.device, 4096, batch_ms=2.0, batch_images=32)
        await cuda.start(None)
        try:
            [gpu] = await cuda.process(images[:1])
            assert isinstance(gpu, Processed)
            one = time.perf_counter()
            for image in images[:8]:
                await cuda.process([image])
            report["cuda"] = {
                "ms_per_image_alone": round((time.perf_counter() - one) / 8 * 1e3, 2),
                "images_per_s": round(await throughput(cuda, images), 1),
                "batches": cuda.batches,
                "vs_pil": difference(gpu.pixels, reference.pixels),
                "vs_cpu_pool": difference(gpu.pixels, pooled.pixels),
            }
        finally:
            await cuda.aclose()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
