#!/usr/bin/env bash
# The documentation site: `bash scripts/docs.sh` builds it into site/, `bash scripts/docs.sh
# serve` shows it at http://127.0.0.1:8000. Arguments go to mkdocs (default: build).
set -euo pipefail
MMSCHED_EXTRAS="[docs]" source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
# The theme prints a banner about a future MkDocs release on every run unless told not to.
export NO_MKDOCS_2_WARNING=1
exec .venv/bin/mkdocs "${@:-build}"
