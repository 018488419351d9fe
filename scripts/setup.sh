# Sourced by scripts/bench.sh and scripts/test.sh: make .venv and install what the project needs.
#
# torch goes in first, pinned: with a torch already there, installing the project pulls no
# other build. Installing the project first would let pip fetch the newest torch and its
# multi-GB CUDA wheels. Set MMSCHED_TORCH to choose another torch requirement.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
VENV=.venv
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  "$VENV/bin/pip" install -q --disable-pip-version-check "${MMSCHED_TORCH:-torch==2.13.0}"
fi
"$VENV/bin/pip" install -q --disable-pip-version-check -e ".${MMSCHED_EXTRAS:-}"
