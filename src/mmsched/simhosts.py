"""Simulated hosts on one Linux machine, for the multi-host tests and ``bench fanout --hosts``.

Each simulated host is a network namespace with its own address and its own ``/dev/shm``
(a tmpfs of its own, bind-mounted over ``/dev/shm`` in a mount namespace of the host's
processes), so that nothing but the network joins two hosts: shared memory, ``ipc://``
sockets' peers and process trees stay apart as on separate machines. The hosts hang off
one bridge in a "switch" namespace, each by a veth pair: one link per host (``eth0`` inside
it), which can be cut (``ip link set ... down``) and whose byte counters a process on the
host reads in ``/sys/class/net/eth0/statistics``.

Only namespaces and addresses made here are touched (private ``10.77.0.0/24`` addresses
that exist only inside them). It needs root (``CAP_SYS_ADMIN`` and ``CAP_NET_ADMIN``);
[`available`][mmsched.simhosts.available] says why not where it cannot run.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

_SUBNET = "10.77.0"


def address_of(index: int) -> str:
    """The address simulated host ``index`` gets (each ``SimulatedHosts`` reuses them: they
    exist only inside its namespaces)."""
    return f"{_SUBNET}.{index + 1}"


def _run(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise OSError(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


def available() -> str | None:
    """``None`` where simulated hosts can be made here; else why not (a skip reason)."""
    if not Path("/proc/self/ns/net").exists() or shutil.which("ip") is None:
        return "needs Linux with iproute2 (ip)"
    if shutil.which("unshare") is None:
        return "needs util-linux's unshare"
    if os.geteuid() != 0:
        return "needs root to create network and mount namespaces"
    probe = f"mmsprobe{uuid.uuid4().hex[:6]}"
    try:
        _run("ip", "netns", "add", probe)
    except OSError as exc:
        return f"cannot create a network namespace here: {exc}"
    with contextlib.suppress(OSError):
        _run("ip", "netns", "del", probe)
    return None


@dataclass
class SimulatedHost:
    """One simulated host: its namespace, address, ``/dev/shm`` and link to the switch."""

    index: int
    namespace: str
    address: str
    shm_dir: Path  # what this host's processes see as /dev/shm
    link: str  # the host's end of its veth pair (in its namespace)

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run on this host: in its network namespace, with its own ``/dev/shm``."""
        inner = f'mount --bind {shlex.quote(str(self.shm_dir))} /dev/shm && exec "$@"'
        return [
            "ip", "netns", "exec", self.namespace,
            "unshare", "--mount", "--propagation", "private",
            "sh", "-c", inner, "sh", *argv,
        ]  # fmt: skip

    def popen(
        self,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        output: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` on this host; its stdout and stderr go to ``output`` if given."""
        sink = open(output, "wb") if output is not None else None  # noqa: SIM115
        try:
            return subprocess.Popen(
                self.command(argv), env=env, stdout=sink, stderr=subprocess.STDOUT if sink else None
            )
        finally:
            if sink is not None:
                sink.close()  # the child holds its own descriptor

    def pids(self) -> list[int]:
        """Every process running on this host now."""
        return [int(p) for p in _run("ip", "netns", "pids", self.namespace).split()]

    def shm_entries(self) -> list[str]:
        """What is in this host's ``/dev/shm`` now."""
        return sorted(os.listdir(self.shm_dir))

    def cut(self) -> None:
        """Cut this host's link (its processes keep running, unreachable)."""
        _run("ip", "-n", self.namespace, "link", "set", self.link, "down")

    def kill_all(self) -> None:
        """Kill every process on this host at once."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


class SimulatedHosts:
    """``count`` hosts on one switch; ``with`` removes namespaces, mounts and processes."""

    def __init__(self, count: int, shm_mb: int = 2048) -> None:
        self.count = count
        self.shm_mb = shm_mb
        self.tag = uuid.uuid4().hex[:6]
        self.switch = f"mms{self.tag}sw"
        self.hosts: list[SimulatedHost] = []
        self._root = Path(tempfile.mkdtemp(prefix=f"mmsched-hosts-{self.tag}-"))

    def __enter__(self) -> SimulatedHosts:
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[SimulatedHost]:
        return iter(self.hosts)

    def __getitem__(self, index: int) -> SimulatedHost:
        return self.hosts[index]

    def _create(self) -> None:
        _run("ip", "netns", "add", self.switch)
        _run("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", self.switch, "link", "set", "br0", "up")
        for index in range(self.count):
            namespace = f"mms{self.tag}h{index}"
            shm_dir = self._root / f"host{index}-shm"
            shm_dir.mkdir()
            _run(
                "mount",
                "-t",
                "tmpfs",
                "-o",
                f"size={self.shm_mb}m,mode=1777",
                "tmpfs",
                str(shm_dir),
            )
            host = SimulatedHost(index, namespace, address_of(index), shm_dir, "eth0")
            self.hosts.append(host)
            _run("ip", "netns", "add", namespace)
            port = f"p{index}"
            _run(
                "ip", "-n", self.switch, "link", "add", port, "type", "veth",
                "peer", "name", "eth0", "netns", namespace,
            )  # fmt: skip
            _run("ip", "-n", self.switch, "link", "set", port, "master", "br0")
            _run("ip", "-n", self.switch, "link", "set", port, "up")
            _run("ip", "-n", namespace, "addr", "add", f"{host.address}/24", "dev", "eth0")
            _run("ip", "-n", namespace, "link", "set", "eth0", "up")
            _run("ip", "-n", namespace, "link", "set", "lo", "up")

    def close(self) -> None:
        """Kill what still runs on the hosts, then remove namespaces, mounts, directories."""
        for host in self.hosts:
            with contextlib.suppress(OSError):
                host.kill_all()
        deadline = time.monotonic() + 5
        while any(self._alive(h) for h in self.hosts) and time.monotonic() < deadline:
            time.sleep(0.05)
        for host in self.hosts:
            with contextlib.suppress(OSError):
                _run("ip", "netns", "del", host.namespace)
            with contextlib.suppress(OSError):
                _run("umount", str(host.shm_dir))
        with contextlib.suppress(OSError):
            _run("ip", "netns", "del", self.switch)
        shutil.rmtree(self._root, ignore_errors=True)

    @staticmethod
    def _alive(host: SimulatedHost) -> bool:
        try:
            return bool(host.pids())
        except OSError:
            return False
