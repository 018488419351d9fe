#!/usr/bin/env bash
# The study of serve_h200_gil.txt: `mmsched serve --tp 4 --preprocess cuda --api-servers 4`
# with the cuda backend's DEBUG line on, `mmsched bench serve` against it, per configuration:
#   main    the tree as it is
#   before  _host_bytes as it was (a torch.frombuffer, then a view of it)
#   inline  the batches run on the event loop's thread (no batch thread)
#   switch  sys.setswitchinterval(0.0005) in the engine
#   b8      MMSCHED_PREPROCESS_BATCH_IMAGES=8
# (the three but main patch the server in its process, below; nothing of them is in the
# package). Env: CFGS (the configurations, in order), RUNS, RUN0 (the first run's number - 1),
# REQ, RATES, BUDGET (seconds after which no further run starts), ALONE=1 (first
# `scripts/cuda_batches.py alone`), PYSPY=1 (a py-spy profile of main's engine under load).
# Writes into $OUT/r.tgz. Needs the wheels of what the host lacks in .whl/.
set -uo pipefail
cd "$(dirname "$0")/../.."
R=${OUT:-/tmp/out}/r; mkdir -p "$R"
PY=python3
if [ -d .whl ] && [ -z "${NOINSTALL:-}" ]; then
  $PY -m pip install -q --no-index --find-links .whl pyzmq orjson blake3 xxhash psutil rich \
    cloudpickle anyio fastapi uvicorn prometheus-client pybase64 opentelemetry-api py-spy > "$R/pip.txt" 2>&1
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
BACKEND=${BACKEND:-cuda}; RUNS=${RUNS:-2}; REQ=${REQ:-2400}; RATES=${RATES:-200,600}
TP=${TP:-4}; API=${API:-4}; CLIENTS=${CLIENTS:-6}
git log --oneline -1 > "$R/tree.txt"; nvidia-smi -L >> "$R/tree.txt" 2>&1; nproc >> "$R/tree.txt"

health() {  # $1 port $2 pid
  $PY - "$1" "$2" <<'PYEOF'
import os, sys, time, urllib.request
port, pid = sys.argv[1], int(sys.argv[2]); deadline = time.monotonic() + 300
while time.monotonic() < deadline:
    try: os.kill(pid, 0)
    except ProcessLookupError: sys.exit("server exited")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            if r.status == 200: sys.exit(0)
    except OSError: pass
    time.sleep(0.2)
sys.exit("not healthy")
PYEOF
}
serve() {  # $1 name $2 port; env SWITCH for the GIL switch interval
  PATCH=${PATCH:-} SW=${SWITCH:-} $PY -c "
import logging, os, runpy, sys
if os.environ.get('SW'): sys.setswitchinterval(float(os.environ['SW']))
patch = os.environ.get('PATCH', '')
import mmsched.preprocess.cuda as c, mmsched.frames as f
if patch == 'before':
    c._host_bytes = lambda d: f.tensor_from_frame(d, 'uint8', [memoryview(d).nbytes])
if patch == 'inline':
    import concurrent.futures as cf
    class Inline:
        def submit(self, fn, *a):
            fut = cf.Future()
            try: fut.set_result(fn(*a))
            except BaseException as e: fut.set_exception(e)
            return fut
        def shutdown(self, wait=True): pass
    init = c.CudaBackend.__init__
    def patched(self, *a, **k):
        init(self, *a, **k); self._runner.shutdown(); self._runner = Inline()
    c.CudaBackend.__init__ = patched
h = logging.StreamHandler(); h.setFormatter(logging.Formatter('%(asctime)s %(processName)s %(message)s'))
l = logging.getLogger('mmsched.preprocess.cuda'); l.setLevel(logging.DEBUG); l.addHandler(h)
sys.argv = ['mmsched', 'serve', '--port', '$2', '--tp', '$TP', '--preprocess', '$BACKEND', '--api-servers', '$API']
runpy.run_module('mmsched', run_name='__main__')
" > "$R/$1_server.txt" 2>&1 &
  S=$!
  health "$2" "$S" || { echo "server $1 failed"; tail -20 "$R/$1_server.txt"; }
}
stop() { kill -INT $S; timeout 30 tail --pid=$S -f /dev/null || kill -9 $S; }
bench() {  # $1 out $2 port $3 seed [$4 rates $5 requests]
  $PY -m mmsched bench serve --base-url "http://127.0.0.1:$2/v1" --clients $CLIENTS \
    --rates "${4:-$RATES}" --images 1 --requests "${5:-$REQ}" --seed "$3" --json "$R/$1.json" > "$R/$1.txt" 2>&1
  tail -8 "$R/$1.txt"
}

port=8050
[ -n "${ALONE:-}" ] && { $PY scripts/cuda_batches.py alone > "$R/alone.txt" 2>&1; cat "$R/alone.txt"; }
for cfg in ${CFGS:-before main inline}; do
  port=$((port + 1))
  [ $SECONDS -gt ${BUDGET:-400} ] && { echo "skip $cfg: $SECONDS s"; continue; }
  SWITCH=; unset MMSCHED_PREPROCESS_BATCH_IMAGES
  [ $cfg = switch ] && SWITCH=0.0005
  PATCH=; [ $cfg = before ] && PATCH=before; [ $cfg = inline ] && PATCH=inline
  [ $cfg = b8 ] && export MMSCHED_PREPROCESS_BATCH_IMAGES=8
  PATCH=$PATCH SWITCH=$SWITCH serve $cfg $port
  echo "== $cfg (switch ${SWITCH:-default}) engine $S"
  for n in $(seq 1 $RUNS); do
    [ $SECONDS -gt ${BUDGET:-400} ] && { echo "skip $cfg run $n: $SECONDS s"; continue; }
    echo "-- $cfg run $n ($SECONDS s)"; bench ${cfg}_run$((n + ${RUN0:-0})) $port $((700 + n + ${RUN0:-0}))
  done
  if [ -n "${PYSPY:-}" ] && [ $cfg = main ] && command -v py-spy >/dev/null; then
    P=$S
    echo "-- $cfg py-spy run"; bench ${cfg}_pyspy $port 799 600 ${PYSPY_REQ:-7200} &
    B=$!
    base=$(wc -l < "$R/${cfg}_server.txt")
    for i in $(seq 1 600); do  # until the load is on: 300 batch lines past the start
      [ $(( $(wc -l < "$R/${cfg}_server.txt") - base )) -gt 300 ] && break; sleep 0.1
    done
    echo "load on after $i polls"
    top -b -H -n 3 -d 1 -p "$P" > "$R/top_engine_threads.txt" &
    timeout 30 py-spy record --native --idle --rate 50 --format raw --duration 5 -p "$P" -o "$R/pyspy_engine.txt" > "$R/pyspy_log.txt" 2>&1
    wait $B
  fi
  stop
  $PY scripts/cuda_batches.py log "$R/${cfg}_server.txt" > "$R/${cfg}_batches.txt" 2>&1; cat "$R/${cfg}_batches.txt"
done
cd "$R/.." && tar czf "${OUT:-/tmp/out}/r.tgz" r && rm -rf r
