#!/usr/bin/env bash
# Quickstart, command 1: install what is needed, then run the OpenAI-compatible server on
# http://127.0.0.1:8000. Arguments go to `mmsched serve` (`--tp 2`, `--port`, `--config`...).
set -euo pipefail
MMSCHED_EXTRAS="[serve]" source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
exec .venv/bin/mmsched serve "$@"
