"""Shard 2 of the documented commands' runs (see ``documented.py``): a file of its own so
that another test process takes it."""

from __future__ import annotations

from pathlib import Path

import pytest

from documented import check_run_small, check_server, command_id, shard

RUNS, SERVERS = shard(2)


@pytest.mark.parametrize("command", RUNS, ids=command_id)
def test_command_runs_small(command: str, tmp_path: Path) -> None:
    check_run_small(command, tmp_path)


@pytest.mark.parametrize("command", SERVERS, ids=command_id)
def test_server_command_serves_one_request_and_stops_clean(command: str) -> None:
    check_server(command)
