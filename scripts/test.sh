#!/usr/bin/env bash
# Quickstart, command 2: install what is needed, then lint, type-check and run the tests.
# Arguments go to pytest.
set -euo pipefail
MMSCHED_EXTRAS="[test,lint]" source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
.venv/bin/ruff check src tests
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
