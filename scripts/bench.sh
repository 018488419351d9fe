#!/usr/bin/env bash
# The fan-out benchmark: install what is needed, then run it.
# Arguments go to `mmsched bench fanout` (defaults: TP=4, 1/10/50/100 MB, all strategies).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
exec .venv/bin/mmsched bench fanout "$@"
