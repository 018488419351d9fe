#!/usr/bin/env bash
# Quickstart, command 2: install what is needed, then lint, type-check, build the
# documentation site strictly (a broken link or an unresolved API name fails), and run the
# tests. Arguments go to pytest.
set -euo pipefail
MMSCHED_EXTRAS="[test,lint,docs,serve]" source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
.venv/bin/ruff check src tests examples
.venv/bin/mypy
# Into site/ (ignored by git). Not --quiet: it hides the warnings that --strict counts, and
# the build then passes.
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict
# Three test processes, each test file whole on one (its module-scoped servers start once,
# and its timing-bound tests never run beside each other): most tests wait on processes
# they started, not on the CPU, so three overlap well even on 2 cores. `-n 0` runs serially.
exec .venv/bin/python -m pytest -n 3 --dist loadfile "$@"
