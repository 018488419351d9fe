"""Every command the README and the docs show is in the table and runs as shown (the rule, the
table and the checks: ``documented.py``). This file: the table against the docs, the
parse-only commands, and the first shard of the runs; ``test_documented_runs_*.py`` run the
others."""

from __future__ import annotations

import json

import pytest

from documented import (
    COMMANDS,
    DOCUMENTED,
    ROOT,
    ParseOnly,
    check_parse_only,
    command_id,
    exec_line,
    of_kind,
    shard_tests,
)


def test_the_table_lists_every_documented_command_and_no_other() -> None:
    assert len(DOCUMENTED) >= 30  # the rule still finds the benchmark page's commands
    missing = {c: pages for c, pages in DOCUMENTED.items() if c not in COMMANDS}
    assert not missing, (
        "documented commands with no entry in COMMANDS, tests/documented.py (add how each is "
        f"run small, or why it is parse-only): {json.dumps(missing, indent=2)}"
    )
    stale = sorted(set(COMMANDS) - set(DOCUMENTED))
    assert not stale, f"COMMANDS entries the docs no longer show: {stale}"


def test_scripts_the_docs_run_through_end_in_the_line_followed_here() -> None:
    # What `resolve` runs instead of the script (which reinstalls first) is its last line.
    expected = {
        "bench.sh": [".venv/bin/mmsched", "bench", "fanout", "$@"],
        "serve.sh": [".venv/bin/mmsched", "serve", "$@"],
        "docs.sh": [".venv/bin/mkdocs", "${@:-build}"],
        "test.sh": [".venv/bin/python", "-m", "pytest", "-n", "3", "--dist", "loadfile", "$@"],
    }
    for name, words in expected.items():
        assert exec_line(ROOT / "scripts" / name) == words, name
    assert exec_line(ROOT / "scripts" / "bench_serve.sh") is None  # it runs as itself


@pytest.mark.parametrize("command", of_kind(ParseOnly), ids=command_id)
def test_parse_only_command_is_accepted(command: str) -> None:
    check_parse_only(command)


test_command_runs_small, test_server_command_serves_one_request_and_stops_clean = shard_tests(0)
