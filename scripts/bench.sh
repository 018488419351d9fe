#!/usr/bin/env bash
# Quickstart, command 1: install what is needed, then run the fan-out benchmark.
# Arguments go to `mmsched bench fanout` (defaults: TP=4, 1/10/50/100 MB, all strategies).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
exec .venv/bin/mmsched bench fanout "$@"
