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
exec .venv/bin/python -m pytest "$@"
