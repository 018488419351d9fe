"""RankGroup: the drop-in for a server's own per-iteration broadcast, in processes the server
starts itself (examples/own_scheduler.py, run here with real processes)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import orjson
import psutil
import pytest
import torch

from mmsched import Config, ConfigError, MultimodalInputs, PeerLost, TokenizedGenerateReqInput
from mmsched.rank_group import RENDEZVOUS_FILE, RankGroup

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "own_scheduler.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("own_scheduler", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["own_scheduler"] = module
    if str(EXAMPLE.parent) not in sys.path:  # spawned ranks import it by name (spawn copies
        sys.path.append(str(EXAMPLE.parent))  # this process's sys.path into each child)
    spec.loader.exec_module(module)
    return module


def shm_segments() -> set[str]:
    return (
        {p.name for p in Path("/dev/shm").glob("mmsched*")} if Path("/dev/shm").is_dir() else set()
    )


def made_by_another_live_process(segment: str) -> bool:
    """Whether ``segment`` (``mmsched-<pid>-...``, its creator's pid) is a live other's."""
    pid = segment.split("-")[1]
    return pid.isdigit() and int(pid) != os.getpid() and psutil.pid_exists(int(pid))


@pytest.mark.parametrize(
    ("transport", "store"), [("zmq", "shm"), ("shm", "inline"), ("torch", "inline")]
)
def test_a_servers_own_ranks_see_the_same_inputs(transport: str, store: str) -> None:
    example = load_example()
    before = shm_segments()
    config = Config(transport=transport, payload_store=store, tp_size=3, timeout_s=30)
    requests = [(f"req-{i}", 64 * (1 + i % 3), i, i == 4) for i in range(10)]
    seen = example.serve(config, requests)
    by_rid: dict[str, list[object]] = {}
    for s in seen:
        by_rid.setdefault(s.rid, []).append(s)
    assert set(by_rid) == {rid for rid, *_ in requests}
    (refused,) = by_rid.pop("req-4")
    assert refused.rank == 0 and refused.error == "InvalidMultimodalInput: mm_items[0].offsets"
    for rid, views in by_rid.items():
        assert sorted(v.rank for v in views) == [0, 1, 2], rid
        assert len({(v.digest, v.pad_values) for v in views}) == 1, rid  # identical everywhere
    # Nothing left in /dev/shm: a new segment is a leak if this process or a dead one (its
    # ranks, gone by now) made it; other live processes' (tests running beside this one)
    # come and go on their own.
    assert {s for s in shm_segments() - before if not made_by_another_live_process(s)} == set()


async def test_features_cross_through_the_store_not_the_transport(tmp_path: Path) -> None:
    config = Config(transport="zmq", payload_store="shm", tp_size=2, timeout_s=10)
    entry, other = await asyncio.gather(
        RankGroup.join(config, 0, tmp_path), RankGroup.join(config, 1, tmp_path)
    )
    async with entry, other:
        assert (tmp_path / RENDEZVOUS_FILE).stat().st_mode & 0o777 == 0o600
        feature = entry.allocate_tensor((4000, 1176), torch.float32)  # 18.8 MB, in the arena
        feature.normal_()
        mm = {"mm_items": [{"modality": "image", "feature": feature, "offsets": [(0, 3)]}]}
        published = await entry.publish([TokenizedGenerateReqInput("r", [5] * 4, {}, mm)])
        received = await other.receive()
        assert published.index == received.index == 0
        (req,) = received.requests
        assert isinstance(req.mm_inputs, MultimodalInputs)
        assert torch.equal(req.mm_inputs.mm_items[0].feature, feature)
        assert entry.statistics().bytes_sent < 4096  # a reference, not 18.8 MB
        empty = await entry.publish([])  # the per-iteration heartbeat
        assert (empty.index, (await other.receive()).requests) == (1, [])
    assert not (tmp_path / RENDEZVOUS_FILE).exists()


async def test_a_bad_request_fails_alone_on_the_entry_rank(tmp_path: Path) -> None:
    config = Config(transport="zmq", tp_size=2, timeout_s=10)
    entry, other = await asyncio.gather(
        RankGroup.join(config, 0, tmp_path), RankGroup.join(config, 1, tmp_path)
    )
    async with entry, other:
        good = TokenizedGenerateReqInput("good", [1, 2], {}, None)
        bad_ids = TokenizedGenerateReqInput("ids", [-1], {}, None)
        bad_mm = TokenizedGenerateReqInput("mm", [1], {}, {"mm_items": "garbage"})
        published = await entry.publish([bad_ids, good, bad_mm])
        assert [e.rid for e in published.failed] == ["ids", "mm"]
        assert [r.rid for r in (await other.receive()).requests] == ["good"]


async def test_join_refuses_what_cannot_work(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="memory"):
        await RankGroup.join(Config(transport="memory", tp_size=2), 0, tmp_path)
    with pytest.raises(ConfigError, match="outside"):
        await RankGroup.join(Config(transport="zmq", tp_size=2), 2, tmp_path)
    with pytest.raises(ConfigError, match="not a directory"):
        await RankGroup.join(Config(transport="zmq", tp_size=2), 1, tmp_path / "missing")


async def test_a_rank_whose_entry_rank_never_comes_fails_in_time(tmp_path: Path) -> None:
    (tmp_path / RENDEZVOUS_FILE).write_bytes(b'{"pid": 999999999, "store": null, "group": "x"}')
    config = Config(transport="zmq", tp_size=2, startup_timeout_s=0.5)
    start = asyncio.get_running_loop().time()
    with pytest.raises(PeerLost, match="no entry rank"):
        await RankGroup.join(config, 1, tmp_path)  # a dead server's file is not followed
    assert asyncio.get_running_loop().time() - start < 5


async def test_receivers_see_end_of_stream_when_the_entry_rank_closes(tmp_path: Path) -> None:
    from mmsched import EndOfStream

    config = Config(transport="zmq", tp_size=2, timeout_s=10)
    entry, other = await asyncio.gather(
        RankGroup.join(config, 0, tmp_path), RankGroup.join(config, 1, tmp_path)
    )
    await entry.aclose()
    with pytest.raises(EndOfStream):
        await other.receive()
    await other.aclose()
    assert os.listdir(tmp_path) == []  # the rendezvous file and the ipc sockets are gone


async def test_a_request_the_codec_refuses_fails_alone(tmp_path: Path) -> None:
    config = Config(transport="zmq", tp_size=2, timeout_s=10)
    entry, other = await asyncio.gather(
        RankGroup.join(config, 0, tmp_path), RankGroup.join(config, 1, tmp_path)
    )
    async with entry, other:
        good = TokenizedGenerateReqInput("good", [1, 2], {"stop": ["\n"]}, None)
        odd = TokenizedGenerateReqInput("odd", [1, 2], {"stop": {1, 2}}, None)  # a set: pickled
        published = await entry.publish([good, odd])
        assert [e.rid for e in published.failed] == ["odd"]
        assert [r.rid for r in published.requests] == ["good"]
        assert [r.rid for r in (await other.receive()).requests] == ["good"]
        # A value the codec cannot encode at all fails alone too.
        huge = TokenizedGenerateReqInput("huge", [1], {"seed": 2**70}, None)
        published = await entry.publish([huge, good])
        assert [e.rid for e in published.failed] == ["huge"]
        assert [r.rid for r in (await other.receive()).requests] == ["good"]


# -- rendezvous between the server's own processes ----------------------------------------

MEMBER = Path(__file__).parent / "group_member.py"


def _start_member(
    tmp_path: Path, config: Config, rank: int, delay_s: float = 0.0
) -> tuple[subprocess.Popen[bytes], Path]:
    out = tmp_path / f"rank{rank}.json"
    spec = {
        "config": config.as_dict(),
        "rank": rank,
        "rendezvous": str(tmp_path / "rendezvous"),
        "delay_s": delay_s,
        "out": str(out),
    }
    proc = subprocess.Popen([sys.executable, str(MEMBER), json.dumps(spec)])
    return proc, out


def _outcome(proc: subprocess.Popen[bytes], out: Path) -> dict[str, object]:
    try:
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
    result: dict[str, object] = json.loads(out.read_text())
    return result


def test_the_entry_rank_waits_startup_timeout_for_a_late_receiver(tmp_path: Path) -> None:
    """A receiver that starts well after the entry rank, past ``timeout_s`` but within
    ``startup_timeout_s``, joins: meeting is bounded by the startup timeout, silence in
    service by ``timeout_s``."""
    (tmp_path / "rendezvous").mkdir()
    config = Config(transport="zmq", tp_size=2, timeout_s=1.5, startup_timeout_s=30)
    entry = _start_member(tmp_path, config, 0)
    late = _start_member(tmp_path, config, 1, delay_s=5.0)  # 3x timeout_s after the entry
    first, second = _outcome(*entry), _outcome(*late)
    assert first["ok"], first
    assert second["ok"], second
    assert first["rids"] == second["rids"] == ["r"]
    assert first["sum"] == second["sum"] == float(sum(range(64)))
    assert float(str(first["join_s"])) > 3.0  # it did wait for the late one


def test_a_rendezvous_too_deep_for_socket_paths_still_meets(tmp_path: Path) -> None:
    """A rendezvous directory whose path leaves no room for a Unix socket's (107 bytes): the
    group's sockets go in the temp directory, which the announcement names, and the members
    meet; nothing is left there afterwards."""
    deep = tmp_path / ("d" * 70)
    (deep / "rendezvous").mkdir(parents=True)
    config = Config(transport="zmq", tp_size=2, timeout_s=5, startup_timeout_s=30)
    members = [_start_member(deep, config, rank) for rank in (0, 1)]
    first, second = (_outcome(*member) for member in members)
    assert first["ok"] and second["ok"], (first, second)
    assert first["rids"] == second["rids"] == ["r"]
    runs = Path(tempfile.gettempdir()).glob(f"mmsched-{members[0][0].pid}-*")
    assert not list(runs)  # the entry's run directory went with it


def test_a_stale_file_whose_pid_is_alive_again_is_not_followed(tmp_path: Path) -> None:
    """An earlier run's rendezvous file names a pid that another process has now (pid
    reuse): a receiver started first must not commit to that run's dead address, and
    joins the real entry rank when it announces itself."""
    where = tmp_path / "rendezvous"
    where.mkdir()
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        # What the earlier run's entry rank wrote, with its own start time: the pid lives
        # on in another process, started later.
        earlier = psutil.Process(stranger.pid).create_time() - 100.0
        stale = {
            "pid": stranger.pid,
            "started": earlier,
            "store": None,
            "group": f"ipc://{tmp_path}/gone/zmq-dead",
        }
        (where / RENDEZVOUS_FILE).write_bytes(orjson.dumps(stale))
        # The inline store attaches to anything: only the file's own checks stand between
        # the receiver and the dead address.
        config = Config(
            transport="zmq", payload_store="inline", tp_size=2, timeout_s=3, startup_timeout_s=30
        )
        receiver = _start_member(tmp_path, config, 1)
        entry = _start_member(tmp_path, config, 0, delay_s=2.0)  # after the receiver looked
        first, second = _outcome(*entry), _outcome(*receiver)
    finally:
        stranger.kill()
        stranger.wait()
    assert first["ok"], first
    assert second["ok"], second
    assert second["rids"] == ["r"] and second["sum"] == float(sum(range(64)))
    assert not (where / RENDEZVOUS_FILE).exists()
