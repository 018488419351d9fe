"""Why the node agent keeps its received memory: run on two simulated hosts (needs root),
``python scripts/crossing/run.py``; output of one run in docs/results/crossing_microbench.txt."""
import os
import sys
from pathlib import Path

from mmsched.simhosts import SimulatedHosts

ROLE = Path(__file__).with_name("role.py")
envs = {
 "zmq, glibc defaults": {},
 "zmq, receiver kept its memory (as keep_received_memory)": {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "2147483647", "MALLOC_ARENA_MAX": "1"},
}
with SimulatedHosts(2) as h:
    for rep in range(2):
        for mode in ("tcp", "tcpfresh"):
            rx = h[1].popen([sys.executable, str(ROLE), "rx", mode]); tx = h[0].popen([sys.executable, str(ROLE), "tx", mode])
            tx.wait(120); rx.kill(); rx.wait()
        for name, extra in envs.items():
            rx = h[1].popen([sys.executable, str(ROLE), "rx", "zmq"], env={**os.environ, **extra})
            tx = h[0].popen([sys.executable, str(ROLE), "tx", "zmq"])
            tx.wait(120); rx.kill(); rx.wait(); print("  ^", name, flush=True)
