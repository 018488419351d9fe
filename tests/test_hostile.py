"""Hostile input and faults (``pytest -m faults``): one bad request never kills or wedges the group.

One test (or more) per finding of an adversarial review, each through real processes where
the boundary is the point: a processor output that used to kill every rank, result frames
that used to kill the tokenizer's router, cancellations that leaked backpressure bytes,
wildcard listening sockets, orphaned ranks, a failed start that left files behind, forged
peers on the local sockets, a rank's start-up error that never reached the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Literal

import orjson
import psutil
import pytest
import zmq
import zmq.asyncio

from conftest import RunOnLoop
from malformed import base_sample
from mmsched import (
    Config,
    ConfigError,
    InvalidMultimodalInput,
    MultimodalInputs,
    PeerLost,
    Pipeline,
    RankTimings,
    RequestFailed,
)
from mmsched.bench.workloads import image_sample
from mmsched.codec import encode
from mmsched.credentials import present_credentials
from mmsched.messages import GenerateOutput
from mmsched.stores.arena import SHM_DIR
from mmsched.testing import SlowRank, stop_result_router
from own_run import rank_processes_of, run_dirs_of, segments_of

pytestmark = pytest.mark.faults

TP = 2
INPUT_LEN = 200


def padded_ids(ids: list[int]) -> list[int]:
    return ids + [0] * (INPUT_LEN - len(ids))


def results_address(pipeline: Pipeline) -> tuple[str, str]:
    addresses = pipeline.rank_addresses
    assert addresses is not None
    return addresses.results, addresses.token


# -- 1. one request must not kill every rank ----------------------------------------------


@pytest.mark.parametrize(
    ("strategy", "transport"), [("per-rank", "zmq"), ("entry-broadcast", "torch")]
)
async def test_big_endian_feature_and_huge_delta_fail_or_pass_alone(
    strategy: str, transport: str
) -> None:
    config = Config(strategy=strategy, transport=transport, tp_size=TP, timeout_s=20)
    good = base_sample()
    big_endian = base_sample()
    feature = big_endian.mm_inputs["mm_items"][0]["feature"]
    big_endian.mm_inputs["mm_items"][0]["feature"] = feature.numpy().astype(">f4")
    # The same values in native order: every rank must hold (and hash) exactly these bytes.
    expected = MultimodalInputs.from_dict(good.mm_inputs).content_digest()
    huge_delta = base_sample()
    huge_delta.mm_inputs["mrope_position_delta"] = 2**63 + 1
    async with Pipeline(config, probe=RankTimings(digest_prefix="")) as pipeline:
        trace = await asyncio.wait_for(
            pipeline.generate_traced("be", padded_ids(big_endian.input_ids), big_endian.mm_inputs),
            20,
        )
        assert {r.data["content_digest"] for r in trace.reports} == {expected}
        with pytest.raises(InvalidMultimodalInput, match="int64") as info:
            await asyncio.wait_for(
                pipeline.generate("delta", padded_ids(huge_delta.input_ids), huge_delta.mm_inputs),
                20,
            )
        assert info.value.field == "mrope_position_delta"
        for bad_ids, field in (
            ([None], "input_ids[0]"),
            ([-5], "input_ids[0]"),
            ("ids", "input_ids"),
        ):
            with pytest.raises(InvalidMultimodalInput) as info:
                await pipeline.generate("ids", bad_ids, None)  # type: ignore[arg-type]
            assert info.value.field == field
        # Every rank is still there and serves the next request, identically.
        after = await pipeline.generate_traced("next", padded_ids(good.input_ids), good.mm_inputs)
        assert {r.data["content_digest"] for r in after.reports} == {expected}
        if transport == "torch":
            # This run's gloo group is entry-broadcast's: its sockets are checked here rather
            # than in a second run of the same ranks (see the loopback test below).
            assert_loopback_only([os.getpid(), *pipeline.pids])


# -- 2. one frame must not wedge the tokenizer -----------------------------------------------


def forged_results(pending_rid: str) -> list[list[bytes]]:
    header = {"v": 1, "n": 1}
    return [
        [b"[" * 100_000],  # nesting deeper than any decoder's stack
        [orjson.dumps({"v": 1, "n": 0, "msg": {"$t": "output", "rid": [[[[[]]]]]}})],
        [
            orjson.dumps(
                {
                    **header,
                    "msg": {
                        "$t": "output",
                        "rid": pending_rid,
                        "output_ids": {"$tensor": 0, "dtype": "int64", "shape": [-1, 0]},
                    },
                }
            ),
            b"",
        ],
        [
            orjson.dumps(
                {
                    **header,
                    "msg": {
                        "$t": "output",
                        "rid": "nobody",
                        "output_ids": {"$tensor": 0, "dtype": "float32", "shape": [2**62 + 1, 4]},
                    },
                }
            ),
            b"\0" * 16,
        ],
        [
            orjson.dumps(
                {"v": 1, "n": 0, "msg": {"$t": "rank_progress", "rank": 99, "iteration": 1}}
            )
        ],
    ]


async def test_bad_result_frames_fail_their_request_and_the_router_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="mmsched")
    config = Config(strategy="tokenizer", transport="memory", tp_size=TP, timeout_s=20)
    sample = image_sample(2, 4)
    async with Pipeline(config, on_iteration=SlowRank(rank=0, seconds=1.0)) as pipeline:
        address, token = results_address(pipeline)
        ctx = zmq.asyncio.Context()
        rank_like = ctx.socket(zmq.PUSH)
        rank_like.setsockopt(zmq.LINGER, 0)
        present_credentials(rank_like, token)  # as a buggy rank would: a member of the run
        rank_like.connect(address)
        try:
            waiting = asyncio.create_task(
                pipeline.generate("victim", sample.input_ids, sample.mm_inputs)
            )
            await asyncio.sleep(0.3)  # sent, held by the slow entry rank
            for frames in forged_results("victim"):
                await rank_like.send_multipart(frames)
            # The request the bad frame names ends with an error, not a hang ...
            with pytest.raises(RequestFailed, match="CodecError"):
                await asyncio.wait_for(waiting, 10)
            # ... and every later request is served.
            for i in range(3):
                out = await asyncio.wait_for(
                    pipeline.generate(f"after-{i}", sample.input_ids, sample.mm_inputs), 10
                )
                assert out.rid == f"after-{i}"
            assert sum(pipeline.rejected_results().values()) == len(forged_results("victim"))
            dropped = [r for r in caplog.records if "dropped a result frame" in r.getMessage()]
            assert len(dropped) == len(forged_results("victim"))  # one log line per frame
        finally:
            ctx.destroy(linger=0)


RouterStop = Literal["socket fails", "cancelled"]


@pytest.mark.parametrize("how", ["socket fails", "cancelled"])
def test_a_dead_result_router_fails_every_waiting_caller(
    how: RouterStop, on_each_loop: RunOnLoop
) -> None:
    on_each_loop(_dead_router(how))


async def _dead_router(how: RouterStop) -> None:
    config = Config(strategy="tokenizer", transport="memory", tp_size=TP, timeout_s=5)
    sample = image_sample(2, 4)
    async with Pipeline(config, on_iteration=SlowRank(rank=0, seconds=3.0)) as pipeline:
        waiting = [
            asyncio.create_task(pipeline.generate(f"w{i}", sample.input_ids, sample.mm_inputs))
            for i in range(4)
        ]
        await asyncio.sleep(0.3)
        start = time.monotonic()
        stop_result_router(pipeline, how)
        results = await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), 5)
        assert all(isinstance(r, PeerLost) and "router" in str(r) for r in results), results
        assert time.monotonic() - start < config.timeout_s
        with pytest.raises(PeerLost, match="router"):
            await pipeline.generate("later", sample.input_ids, sample.mm_inputs)


# -- 3. cancelled callers give their bytes back ---------------------------------------------


def test_cancelled_callers_leak_no_inflight_bytes(on_each_loop: RunOnLoop) -> None:
    on_each_loop(_cancelled_callers())


async def _cancelled_callers() -> None:
    sample = image_sample(2, 20)  # 188 kB
    config = Config(strategy="tokenizer", transport="memory", tp_size=TP, max_inflight_mb=4)
    rng = random.Random(7)
    async with Pipeline(config) as pipeline:

        async def cancelled_after(i: int, delay: float) -> None:
            task = asyncio.create_task(
                pipeline.generate(f"c{i}", sample.input_ids, sample.mm_inputs)
            )
            await asyncio.sleep(delay)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

        await asyncio.gather(*(cancelled_after(i, rng.uniform(0.05, 0.2)) for i in range(200)))
        # Bytes of answered requests are released once every rank passed their iteration:
        # one more request, answered after the others, lets the ranks report progress.
        await pipeline.generate("last", sample.input_ids, sample.mm_inputs)
        deadline = time.monotonic() + 5
        while pipeline.inflight_bytes and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert pipeline.inflight_bytes == 0


# -- 4. no listening socket on a wildcard address ----------------------------------------


def listening(pids: list[int]) -> list[tuple[str, int]]:
    found = []
    for pid in pids:
        for conn in psutil.Process(pid).net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN:
                found.append((conn.laddr.ip, conn.laddr.port))
    return found


def assert_loopback_only(pids: list[int]) -> None:
    sockets = listening(pids)
    assert sockets, "gloo listens somewhere; the check must see it"
    assert all(ip in ("127.0.0.1", "::1") for ip, _ in sockets), sockets


# Entry-broadcast's gloo group over torch is checked in the big-endian test's run of it.
@pytest.mark.parametrize("strategy", ["tokenizer"])
async def test_torch_transport_listens_on_loopback_only(strategy: str) -> None:
    config = Config(strategy=strategy, transport="torch", tp_size=TP)
    sample = image_sample(2, 4)
    async with Pipeline(config) as pipeline:
        await pipeline.generate("r", sample.input_ids, sample.mm_inputs)
        assert_loopback_only([os.getpid(), *pipeline.pids])


async def test_tcp_legs_bind_where_asked_and_still_want_the_token() -> None:
    config = Config(
        strategy="tokenizer",
        transport="zmq",
        tp_size=TP,
        requests_address="tcp://127.0.0.1:*",
        results_address="tcp://127.0.0.1:*",
    )
    sample = image_sample(2, 4)
    async with Pipeline(config) as pipeline:
        output = await pipeline.generate("r", sample.input_ids, sample.mm_inputs)
        assert output.rid == "r"
        addresses = pipeline.rank_addresses
        assert addresses is not None
        legs = [addresses.requests, addresses.results]
        assert all(leg.startswith("tcp://127.0.0.1:") for leg in legs), legs
        ports = {int(leg.rsplit(":", 1)[1]) for leg in legs}
        assert ports <= {port for ip, port in listening([os.getpid()]) if ip == "127.0.0.1"}
        # A peer without the run's token gets nothing from the results leg over TCP either.
        ctx = zmq.Context()
        try:
            thief = ctx.socket(zmq.PUSH)
            thief.setsockopt(zmq.LINGER, 0)
            thief.connect(addresses.results)
            thief.send_multipart(encode(GenerateOutput(rid="r2", output_ids=[1])), flags=0)
            await asyncio.sleep(0.3)
            assert pipeline.running and not pipeline.rejected_results()
        finally:
            ctx.destroy(linger=0)
        again = await pipeline.generate("r2", sample.input_ids, sample.mm_inputs)
        assert again.output_ids != [1]  # the forged answer never arrived


async def test_a_busy_tcp_address_is_a_config_error() -> None:
    holder = zmq.Context()
    try:
        taken = holder.socket(zmq.PULL)
        port = taken.bind_to_random_port("tcp://127.0.0.1")
        config = Config(transport="memory", results_address=f"tcp://127.0.0.1:{port}")
        with pytest.raises(ConfigError, match="cannot bind"):
            await Pipeline(config).start()
    finally:
        holder.destroy(linger=0)
    assert not run_dirs_of([os.getpid()])


# -- 5. a parent killed during start-up leaves no orphan --------------------------------------

STARTING_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys, time
    from mmsched import Config, Pipeline

    def loading(rank, device):
        time.sleep(60)  # a model's load: the ranks are up, not ready

    async def main():
        method, slow = sys.argv[1], sys.argv[2] == "slow"
        config = Config(strategy="zero-copy", transport="shm", tp_size=2, shm_arena_mb=64,
                        timeout_s=30, startup_timeout_s=60, rank_start_method=method)
        async with Pipeline(config, on_rank_start=loading if slow else None):
            print("ready", flush=True)
            await asyncio.sleep(3600)

    if __name__ == "__main__":
        asyncio.run(main())
    """
)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize(
    ("method", "when"),
    [("spawn", "importing torch"), ("forkserver", "loading a model")],
)
async def test_parent_killed_during_startup_leaves_no_orphan(
    tmp_path: Path, method: str, when: str
) -> None:
    script = tmp_path / "starting.py"
    script.write_text(STARTING_SCRIPT)
    # Forked ranks start in milliseconds: a model's load keeps them starting.
    slow = "slow" if method == "forkserver" else "fast"
    proc = subprocess.Popen(
        [sys.executable, str(script), method, slow], stdout=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        ranks: list[psutil.Process] = []
        while len(ranks) < 2 and time.monotonic() < deadline:
            ranks = rank_processes_of(proc.pid)
            await asyncio.sleep(0.01)
        assert len(ranks) == 2, "the ranks were never started"
        run_dirs = run_dirs_of([proc.pid])
        assert len(run_dirs) == 1
        proc.send_signal(signal.SIGKILL)  # the ranks are still starting (when), not ready
        proc.wait()
        # Not a blocking read: the ranks hold the pipe open too, until they are gone.
        assert proc.stdout is not None
        os.set_blocking(proc.stdout.fileno(), False)
        try:
            printed = os.read(proc.stdout.fileno(), 1 << 16)
        except BlockingIOError:
            printed = b""
        assert b"ready" not in printed
        gone_by = time.monotonic() + 15
        while any(alive(r.pid) for r in ranks) and time.monotonic() < gone_by:
            await asyncio.sleep(0.05)
        assert not any(alive(r.pid) for r in ranks), "orphaned ranks are still running"
        # A rank that got to run removed the run's directory and segments on its way out.
        # One killed with its parent before it ran any code of ours could not: the next
        # run's start sweeps what a dead tokenizer left.
        async with Pipeline(Config(transport="zmq")):
            pass
        assert not any(d.exists() for d in run_dirs), "the run directory was left behind"
        assert not segments_of([proc.pid]), "the run's shared memory was left behind"
    finally:
        if proc.poll() is None:
            proc.kill()


# -- 6. a failed start leaves nothing --------------------------------------------------------


async def test_failed_start_leaves_no_directory_or_segment() -> None:
    config = Config(strategy="zero-copy", transport="shm", tp_size=TP, shm_arena_mb=16)
    with pytest.raises(ConfigError, match="module level"):
        await Pipeline(config, on_iteration=lambda rank, it, reqs: None).start()
    assert not run_dirs_of([os.getpid()])
    assert not segments_of([os.getpid()])


# -- 8. forged peers on the local sockets -------------------------------------------------


async def test_sockets_are_owner_only_and_refuse_peers_without_the_token() -> None:
    config = Config(strategy="tokenizer", transport="zmq", tp_size=TP)
    sample = image_sample(2, 4)
    async with Pipeline(config, on_iteration=SlowRank(rank=0, seconds=0.5)) as pipeline:
        addresses = pipeline.rank_addresses
        assert addresses is not None
        requests, results = addresses.requests, addresses.results
        for address in (requests, results):
            mode = stat.S_IMODE(os.stat(address.removeprefix("ipc://")).st_mode)
            assert mode == 0o600, oct(mode)
        ctx = zmq.asyncio.Context()
        try:
            forger = ctx.socket(zmq.PUSH)  # same user, no token
            forger.connect(results)
            thief = ctx.socket(zmq.PULL)
            thief.connect(requests)
            for sock in (forger, thief):
                sock.setsockopt(zmq.LINGER, 0)
            await asyncio.sleep(0.2)
            tasks = [
                asyncio.create_task(pipeline.generate(f"r{i}", sample.input_ids, sample.mm_inputs))
                for i in range(10)
            ]
            await asyncio.sleep(0.1)
            forged = encode(GenerateOutput(rid="r0", output_ids=[666], iteration=10**9))
            # Queued while the handshake is pending, or refused (Again) once it has failed:
            # either way it must never be delivered. A blocking send would wait forever.
            with contextlib.suppress(zmq.Again):
                await forger.send_multipart(forged, flags=zmq.NOBLOCK)
            outputs = await asyncio.wait_for(asyncio.gather(*tasks), 20)
            # No request was stolen by the extra PULL, none answered by the forger.
            assert [o.rid for o in outputs] == [f"r{i}" for i in range(10)]
            assert all(o.output_ids != [666] for o in outputs)
            assert not await thief.poll(100)
        finally:
            ctx.destroy(linger=0)


# -- 9. a rank's start-up error reaches start() -------------------------------------------


async def test_a_rank_start_up_error_reaches_the_caller_promptly() -> None:
    # More than /dev/shm holds even empty: its free space, read here, can grow before rank 0
    # asks (other tests close their arenas), and an arena that then passes the check would
    # take the host's memory. Under tokenizer/shm rank 0 makes the transport's arena. (The
    # inline store: the tokenizer then makes no arena of its own that would fail first.)
    shm_mb = shutil.disk_usage(SHM_DIR).total >> 20
    config = Config(
        strategy="tokenizer",
        transport="shm",
        payload_store="inline",
        tp_size=TP,
        shm_arena_mb=shm_mb + 1024,
        timeout_s=60,
        startup_timeout_s=120,
    )
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"scheduler rank 0: .*/dev/shm.*shm-size"):
        await Pipeline(config).start()
    assert time.monotonic() - start < 20  # not the other rank's 60 s wait
    assert not segments_of([os.getpid()])


async def test_rank_failure_names_its_cause_in_peer_lost() -> None:
    from mmsched.testing import FailingRank

    config = Config(strategy="tokenizer", transport="zmq", tp_size=TP, timeout_s=10)
    sample = image_sample(2, 4)
    async with Pipeline(config, on_iteration=FailingRank(rank=1)) as pipeline:
        # Under pub-sub the entry rank may answer a few more before the death is seen.
        with pytest.raises(PeerLost, match="rank 1 exited with code 1: RuntimeError: rank 1"):
            for i in range(200):
                await asyncio.wait_for(
                    pipeline.generate(f"r{i}", sample.input_ids, sample.mm_inputs), 10
                )
                await asyncio.sleep(0.05)


def test_json_of_failure_is_what_read_failure_reads(tmp_path: Path) -> None:
    from mmsched.runtime.rundir import leave_failure, read_failure

    leave_failure(str(tmp_path), 3, ConfigError("too small"))
    assert read_failure(tmp_path, 3) == ("ConfigError", "too small")
    assert read_failure(tmp_path, 4) is None
    (tmp_path / "rank-5.failed.json").write_text(json.dumps([1]))
    assert read_failure(tmp_path, 5) is None


# -- 10. every request gets an answer within timeout_s ---------------------------------------


async def test_a_request_without_an_answer_fails_alone_within_the_timeout() -> None:
    async def stuck_on_one(rank: int, iteration: int, requests: list[object]) -> None:
        if rank == 0 and any(getattr(r, "rid", "") == "stuck" for r in requests):
            await asyncio.sleep(2.0)  # longer than timeout_s: its answer comes too late

    config = Config(transport="memory", tp_size=2, timeout_s=0.5)
    sample = image_sample(2, 4)
    async with Pipeline(config, on_iteration=stuck_on_one) as pipeline:
        start = time.monotonic()
        with pytest.raises(PeerLost, match="no answer to request 'stuck' within"):
            await pipeline.generate("stuck", sample.input_ids, sample.mm_inputs)
        assert time.monotonic() - start < 1.5
        await asyncio.sleep(2.0)  # the late answer arrives and is dropped
        output = await pipeline.generate("next", sample.input_ids, sample.mm_inputs)
        assert output.rid == "next"


async def test_a_pipeline_closed_right_after_start_closes_promptly() -> None:
    # The entry rank can be ready while its request connection is still in its handshake; a
    # shutdown sent without waiting for it was dropped, and close() then waited timeout_s
    # for ranks that never heard it (under a CPU load, 2 closes of 8 took timeout_s).
    config = Config(transport="zmq", tp_size=2, timeout_s=30)
    for _ in range(3):
        pipeline = Pipeline(config)
        await pipeline.start()
        start = time.monotonic()
        await pipeline.aclose()
        assert time.monotonic() - start < 10.0  # not timeout_s
        assert not any(alive(p) for p in pipeline.pids)
