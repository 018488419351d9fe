"""The per-rank set-up hook (``on_rank_start``), under each way a rank starts, what a rank
that cannot start says, and how a rank watches the process that started it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import orjson
import pytest

import rank_hooks
from mmsched import Config, ConfigError, PeerLost, Pipeline
from mmsched.processes import wait_for_exit


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
async def test_every_rank_sets_up_before_start_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    monkeypatch.setenv("RANK_HOOKS_TEST_DIR", str(tmp_path))
    config = Config(transport="zmq", tp_size=2, timeout_s=30, rank_start_method=method)
    pipeline = Pipeline(
        config, on_iteration=rank_hooks.use_model, on_rank_start=rank_hooks.load_model
    )
    async with pipeline:
        records = [orjson.loads((tmp_path / f"rank{r}.json").read_bytes()) for r in (0, 1)]
        assert [r["pid"] for r in records] == pipeline.pids  # ran in each rank's process
        assert [r["device"] for r in records] == ["cpu", "cpu"]
        output = await pipeline.generate("r", [1, 2, 3])  # use_model finds the model
        assert output.output_ids == [1, 2, 3]


async def test_a_forked_rank_has_the_environment_its_starter_has_now(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = Config(transport="zmq", tp_size=2, timeout_s=30, rank_start_method="forkserver")
    async with Pipeline(config):
        pass  # the fork server runs from here on, with the environment of now
    monkeypatch.setenv("RANK_HOOKS_TEST_DIR", str(tmp_path))  # set after it started
    async with Pipeline(config, on_rank_start=rank_hooks.load_model):
        assert sorted(os.listdir(tmp_path)) == ["rank0.json", "rank1.json"]


def test_waiting_for_a_process_returns_as_it_exits() -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    waiter = threading.Thread(target=wait_for_exit, args=(sleeper.pid,), daemon=True)
    waiter.start()
    try:
        waiter.join(0.5)
        assert waiter.is_alive(), "returned while the process ran"
        sleeper.kill()
        waiter.join(5)
        assert not waiter.is_alive(), "still waiting after the exit"
    finally:
        sleeper.kill()
        sleeper.wait()
    started = time.monotonic()
    wait_for_exit(sleeper.pid)  # gone (and reaped): at once
    assert time.monotonic() - started < 1


async def test_a_failing_set_up_fails_start_naming_the_rank() -> None:
    config = Config(transport="zmq", tp_size=2, timeout_s=30)
    with pytest.raises(ConfigError, match="on_rank_start failed on rank 1: RuntimeError: weights"):
        await Pipeline(config, on_rank_start=rank_hooks.fail_on_rank_1).start()


async def test_in_process_ranks_run_the_hook_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RANK_HOOKS_TEST_DIR", str(tmp_path))
    config = Config(transport="memory", tp_size=2)
    async with Pipeline(config, on_rank_start=rank_hooks.load_model):
        assert sorted(os.listdir(tmp_path)) == ["rank0.json", "rank1.json"]


async def test_a_lambda_is_refused_before_anything_starts() -> None:
    with pytest.raises(ConfigError, match="module level"):
        await Pipeline(Config(transport="zmq", tp_size=1), on_rank_start=lambda r, d: None).start()


def test_a_script_without_a_main_guard_is_told_why(tmp_path: Path) -> None:
    script = tmp_path / "server.py"
    script.write_text(
        textwrap.dedent(
            """
            import asyncio
            from mmsched import Config, Pipeline

            async def main():
                async with Pipeline(Config(transport="zmq", tp_size=1, timeout_s=10)):
                    pass

            asyncio.run(main())  # no `if __name__ == "__main__":` guard
            """
        )
    )
    run = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert run.returncode != 0
    assert PeerLost.__name__ in run.stderr
    assert 'if __name__ == "__main__":' in run.stderr.splitlines()[-1]
