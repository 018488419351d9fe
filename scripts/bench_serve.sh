#!/usr/bin/env bash
# Start `mmsched serve` (its flags in SERVE_ARGS, its config in MMSCHED_* variables), wait until
# it is healthy, run `mmsched bench serve` against it with this script's arguments, stop it.
# Uses the current Python environment: `PYTHON=.venv/bin/python bash scripts/bench_serve.sh ...`.
set -euo pipefail
PY=${PYTHON:-python3}
PORT=${PORT:-8000}
# shellcheck disable=SC2086 # SERVE_ARGS is a list of flags
"$PY" -m mmsched serve --port "$PORT" ${SERVE_ARGS:-} &
server=$!
trap 'kill -INT "$server" 2>/dev/null || true; wait "$server" || true' EXIT
"$PY" - "$PORT" "$server" <<'PYEOF'
import sys, time, urllib.request, os
port, pid = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 300
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit("the server exited before it was healthy")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            if r.status == 200:
                sys.exit(0)
    except OSError:
        pass
    time.sleep(0.2)
sys.exit("the server was not healthy within 300 s")
PYEOF
"$PY" -m mmsched bench serve --base-url "http://127.0.0.1:$PORT/v1" "$@"
