#!/usr/bin/env bash
# The checks that need a CUDA GPU, on a machine that has one, with their output in OUT_DIR:
#   1. the GPU test files (every store delivering on each rank's GPU, the CUDA IPC pool,
#      the store contract over the GPU stores, the tiny Qwen2-VL on GPU ranks): gpu_tests.txt
#   2. `mmsched serve --model tiny-qwen2-vl` with the features on each rank's GPU (pinned
#      store), under `mmsched bench serve`: serve_tiny_qwen2_vl_gpu.{txt,json}
# Runs with the python3 it finds (PYTHON to choose), from the source tree (no install).
# Usage: bash scripts/gpu_checks.sh OUT_DIR [TP]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT_DIR=${1:?usage: gpu_checks.sh OUT_DIR [TP]}
TP=${2:-4}
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT_DIR"
nvidia-smi -L | tee "$OUT_DIR/gpu_tests.txt"
"$PY" -m pytest tests/test_gpu.py tests/test_stores.py tests/test_serve_model.py -v -rs \
  -p no:cacheprovider \
  2>&1 | tee -a "$OUT_DIR/gpu_tests.txt" || true

PORT=8123
MMSCHED_DEVICE=cuda MMSCHED_PAYLOAD_STORE=pinned "$PY" -m mmsched serve \
  --model tiny-qwen2-vl --tp "$TP" --port "$PORT" >"$OUT_DIR/serve_tiny_qwen2_vl_gpu.log" 2>&1 &
SERVER=$!
trap 'kill -INT $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 300); do
  "$PY" -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$PORT/health', timeout=1)" \
    2>/dev/null && break
  sleep 0.5
done
"$PY" -m mmsched bench serve --base-url "http://127.0.0.1:$PORT/v1" --rates 5,20 --images 1,4 \
  --requests 40 --max-tokens 16 --json "$OUT_DIR/serve_tiny_qwen2_vl_gpu.json" \
  2>&1 | tee "$OUT_DIR/serve_tiny_qwen2_vl_gpu.txt"
