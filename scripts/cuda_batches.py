"""Where the ``cuda`` backend's time goes: its batches alone, and its batches in a server.

    python3 scripts/cuda_batches.py alone          # the backend alone on the bench's JPEGs
    python3 scripts/cuda_batches.py log SERVER_LOG # a server's batches, from its DEBUG lines

``alone`` builds 256 JPEGs of the kind ``mmsched bench serve`` sends (1024x768, random
pixels; made here with seed 7), runs them through a
[`CudaBackend`][mmsched.preprocess.cuda.CudaBackend] of its own (2 ms window, batches of up
to 32, a 16 GB budget) at 32, 128 and 256 images at once, under each wire format, then times
nvJPEG's decode of 1, 8 and 32 of them (and the calling thread's CPU time in it) and the
uint8 resize of 32 (ten runs each, after three to warm up). It needs a CUDA GPU and
torchvision.

``log`` reads the lines the backend logs at DEBUG, one per batch, from a server whose
``mmsched.preprocess.cuda`` logger is at DEBUG and has a handler (docs/serving.md; the log
plain or gzipped), and gives, by batch size, how many batches, how long their first image
waited and how long they ran (p50, p90), and, where the lines say it (servers since the
split was logged), where the run went: the decode call, the processor's calls, the wait for
the GPU, and the batch thread's CPU time in the first two (p50).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gzip
import re
import statistics
import time


def alone() -> None:
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    from mmsched.bench.serve import make_images
    from mmsched.preprocess.cuda import CudaBackend
    from mmsched.preprocess.processor import run_processor
    from mmsched.serve.media import EncodedImage, MediaLimits

    urls = make_images(256, (1024, 768), "jpeg", 7)
    images = [
        EncodedImage(f"image[{n}]", base64.b64decode(url.split(",", 1)[1]), "JPEG")
        for n, url in enumerate(urls)
    ]
    print("jpeg bytes", len(images[0].data))

    async def through_the_backend() -> None:
        for wire in ("uint8", "float32"):
            backend = CudaBackend(
                MediaLimits(), "cuda:0", 16384, batch_ms=2.0, batch_images=32, wire_pixels=wire
            )
            await backend.start(None)
            await backend.process(images[:32])
            for at_once in (32, 128, 256):
                backend.batches = backend.batched_images = 0
                start = time.perf_counter()
                await asyncio.gather(*(backend.process([image]) for image in images[:at_once]))
                elapsed = time.perf_counter() - start
                rate = round(at_once / elapsed)
                print(wire, "concurrency", at_once, "images/s", rate, "batches", backend.batches)
            await backend.aclose()

    asyncio.run(through_the_backend())
    data = [torch.frombuffer(bytearray(image.data), dtype=torch.uint8) for image in images[:32]]
    decoded: list[torch.Tensor] = []
    for n in (1, 8, 32):
        for _ in range(3):
            decode_jpeg(data[:n], mode=ImageReadMode.RGB, device="cuda")
        torch.cuda.synchronize()
        start, cpu_start = time.perf_counter(), time.thread_time()
        for _ in range(10):
            decoded = decode_jpeg(data[:n], mode=ImageReadMode.RGB, device="cuda")
        torch.cuda.synchronize()
        ms = (time.perf_counter() - start) / 10 * 1e3
        cpu_ms = (time.thread_time() - cpu_start) / 10 * 1e3
        print("decode batch", n, "ms", round(ms, 2), "thread CPU ms", round(cpu_ms, 2))
    backend = CudaBackend(MediaLimits(), "cuda:0", 16384, 2.0, 32, wire_pixels="uint8")
    device = torch.device("cuda")
    for _ in range(3):
        run_processor(backend.processor, "x", decoded, device, "uint8")
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        run_processor(backend.processor, "x", decoded, device, "uint8")
    torch.cuda.synchronize()
    print("resize batch 32 ms", round((time.perf_counter() - start) / 10 * 1e3, 2))


_LINE = re.compile(
    r"a batch of (\d+) images: the first admitted ([\d.]+) ms before it started; "
    r"it ran ([\d.]+) ms(?: \(decode ([\d.]+), process ([\d.]+), GPU wait ([\d.]+)"
    r"(?:; on the CPU: decode ([\d.]+), process ([\d.]+))?\))?"
)


def summarise(path: str) -> None:
    opener = gzip.open if path.endswith(".gz") else open  # the committed logs are gzipped
    with opener(path, "rt", encoding="utf-8") as log:
        found = [m for line in log if (m := _LINE.search(line))]
    rows = [(int(m[1]), float(m[2]), float(m[3])) for m in found]
    # Lines from servers since the split was logged also say where the run went.
    split = [(int(m[1]), *(float(f) for f in m.groups()[3:] if f)) for m in found if m[4]]
    print(f"{len(rows)} batches, {sum(r[0] for r in rows)} images")
    print("images per batch   batches   images   waited p50   p90   ran p50   p90 (ms)")
    for low, high in ((1, 8), (9, 31), (32, 10**6)):
        group = [r for r in rows if low <= r[0] <= high]
        if not group:
            continue
        waited = sorted(r[1] for r in group)
        ran = sorted(r[2] for r in group)
        p90 = int(0.9 * (len(group) - 1))
        print(
            f"{low}-{high if high < 10**6 else ''}".ljust(18),
            str(len(group)).rjust(7),
            str(sum(r[0] for r in group)).rjust(8),
            f"{statistics.median(waited):12.1f} {waited[p90]:5.1f}",
            f"{statistics.median(ran):9.1f} {ran[p90]:5.1f}",
        )
    if split:
        # The batch thread's CPU time too, where the lines give it (since it was logged).
        cpu = all(len(r) == 6 for r in split)
        print(
            "images per batch   decode p50   process p50   GPU wait p50"
            + ("   on the CPU: decode p50   process p50" if cpu else "")
            + " (ms)"
        )
        for low, high in ((1, 8), (9, 31), (32, 10**6)):
            parts = [r[1:] for r in split if low <= r[0] <= high]
            if parts:
                print(
                    f"{low}-{high if high < 10**6 else ''}".ljust(18),
                    *(
                        f"{statistics.median(p[n] for p in parts):11.1f}"
                        for n in range(5 if cpu else 3)
                    ),
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    which = parser.add_subparsers(dest="what", required=True)
    which.add_parser("alone", help="the backend alone on the bench's JPEGs (a CUDA GPU)")
    log = which.add_parser("log", help="a server's batches, from its DEBUG lines")
    log.add_argument("path", help="the server's log (its stderr)")
    args = parser.parse_args()
    if args.what == "alone":
        alone()
    else:
        summarise(args.path)


if __name__ == "__main__":
    main()
