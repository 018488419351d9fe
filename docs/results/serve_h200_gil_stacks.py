"""Where the cuda backend's batch thread was, from a py-spy raw profile of the engine.

    python3 docs/results/serve_h200_gil_stacks.py docs/results/serve_h200_gil_l6_pyspy_engine.txt

Keeps the samples under ``CudaBackend._run_batch`` and counts them by phase (the decode
call, the processor's calls, the rest), the decode call's samples by where in it they fell
(building the host tensors in ``_host_bytes`` or torchvision's ``decode_jpeg``), and by the
last six frames of each stack.
"""

import collections
import sys

by_tail: collections.Counter[str] = collections.Counter()
by_phase: collections.Counter[str] = collections.Counter()
in_decode: collections.Counter[str] = collections.Counter()
with open(sys.argv[1], encoding="utf-8") as profile:
    for line in profile:
        stack, _, count = line.rstrip().rpartition(" ")
        frames = [f.split(" (")[0] for f in stack.split(";")]
        if "CudaBackend._run_batch" not in frames:
            continue
        phase = next(
            (f for f in frames if f in ("CudaBackend._decode", "CudaBackend._process")), "rest"
        )
        gil = any("gil_scoped" in f or f == "take_gil" for f in frames)
        by_phase[f"{phase} ({'waiting for the GIL' if gil else 'other'})"] += int(count)
        if phase == "CudaBackend._decode":
            part = next((f for f in frames if f in ("_host_bytes", "decode_jpeg")), "elsewhere")
            in_decode[f"{part} ({'waiting for the GIL' if gil else 'other'})"] += int(count)
        by_tail[phase + " :: " + " < ".join(reversed(frames[-6:]))] += int(count)
total = sum(by_phase.values())
print(f"{total} samples of the batch thread")
for name, n in by_phase.most_common():
    print(f"{n:5d} {100 * n / total:5.1f}%  {name}")
print(f"{sum(in_decode.values())} samples in the decode call")
for name, n in in_decode.most_common():
    print(f"{n:5d}  {name}")
print("most frequent stacks (innermost first):")
for name, n in by_tail.most_common(12):
    print(f"{n:5d}  {name[:300]}")
