"""Every command the README and the docs show runs as shown, at small sizes.

What counts as a documented command (in ``README.md`` and every page under ``docs/``):

* In a fenced code block (indented ones in lists too) tagged ``bash``, ``sh``, ``shell`` or
  ``console``, or untagged: each line, once ``\\``-continuations are joined, a ``$`` prompt
  and ``# comments`` dropped, whose first word after any ``VAR=value`` assignments is a
  runner: ``bash``, ``sh``, ``python``, ``python3``, ``sudo``, ``mmsched``, ``.venv/bin/...``
  or ``scripts/...``. In a shell-tagged block every line must be such a command (a new
  runner fails here, to be added on purpose); untagged blocks also hold diagrams, whose lines
  start otherwise. Blocks of other languages (``python``, ``toml``, ``text``) are not
  commands.
* In an inline code span of the prose: a span that starts (after any ``VAR=value``) with
  ``bash``, ``sh``, ``python``, ``python3``, ``sudo`` or ``.venv/bin/``; or with ``mmsched``
  or ``scripts/`` and carries a flag (``--x``). ``mmsched serve`` alone names a command,
  ``mmsched serve --tp 2`` shows one. A span of assignments alone (``MMSCHED_X=y``) is a
  setting.

A command is keyed by its normalized text: its words, whitespace inside each collapsed, quoted
as a shell reads them (in double quotes where a word holds single quotes: Python code) and
joined by one space, the value after ``--json`` written ``PATH`` (runs that differ only in
where they write their records are one command).

``COMMANDS`` maps every key to how it is checked, and the two must agree both ways: a
documented command missing from the table fails, and so does an entry the docs no longer
show. Each runnable entry runs the real command line, with flags appended that make it small
(argparse lets a later flag win) and ``--json`` and ``--out`` pointed into a temporary
directory; two lines whose arguments are the same once made small run once. A server
(``Serve``) is started on a free port, asked one chat request with an image once
``/health`` answers, and stopped with SIGINT: it exits 0, its ranks exit, its shared memory
is gone. ``bash scripts/X.sh ARGS`` runs the line that script ends with (``exec ...``),
read from the script itself, rather than the script: the scripts first run ``setup.sh``,
which reinstalls the project into the environment the tests run in. A script without an
``exec`` line runs as itself. The rest are ``ParseOnly``, each with its reason (CUDA, root,
several hosts, this suite itself, the network): their arguments must still be accepted by
``mmsched``'s parser, or their script must exist and answer ``--help``.

This module holds the rule, the table and the checks; ``test_documented_commands.py`` and
``test_documented_runs_*.py`` run them, the runs split in ``SHARDS`` files so that the
suite's test processes share them (each test file runs whole on one process).
"""

from __future__ import annotations

import ast
import base64
import io
import itertools
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mmsched.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BIN = Path(sys.executable).parent  # the environment the tests run in: the docs' .venv/bin

SHELL_TAGS = {"bash", "sh", "shell", "console"}
RUNNERS = {"bash", "sh", "python", "python3", "sudo", "mmsched"}
ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")
TIMEOUT_S = 240


# --- collection -----------------------------------------------------------------------------


def _words(text: str) -> list[str]:
    return shlex.split(text, comments=True)


def _split_env(words: list[str]) -> tuple[dict[str, str], list[str]]:
    env: dict[str, str] = {}
    while words and ASSIGNMENT.match(words[0]):
        name, _, value = words[0].partition("=")
        env[name] = value
        words = words[1:]
    return env, words


def _is_runner(word: str) -> bool:
    return word in RUNNERS or word.startswith((".venv/bin/", "scripts/"))


def _quote(word: str) -> str:
    word = " ".join(word.split())
    if shlex.quote(word) == word or re.search(r'["\\$`]', word):
        return shlex.quote(word)
    return f'"{word}"'  # readable where the word holds single quotes (Python code)


def normalize(words: list[str]) -> str:
    shown = list(words)
    for i, word in enumerate(shown[:-1]):
        if word == "--json":
            shown[i + 1] = "PATH"
    return " ".join(_quote(w) for w in shown)


def _block_commands(tag: str, body: str, where: str) -> list[str]:
    commands = []
    for line in body.replace("\\\n", " ").splitlines():
        line = line.strip().removeprefix("$ ")
        first = re.match(r"(?:\w+=(?:\"[^\"]*\"|'[^']*'|\S+)\s+)*(\S+)", line)
        if not first or not _is_runner(first.group(1)):
            if tag in SHELL_TAGS and line and not line.startswith("#"):
                pytest.fail(f"{where}: a {tag} line with no known runner: {line!r}")
            continue
        commands.append(normalize(_words(line)))
    return commands


def _inline_commands(text: str) -> list[str]:
    commands = []
    for span in re.findall(r"`([^`]+)`", text):
        span = " ".join(span.split())
        try:
            words = _split_env(_words(span))[1]
        except ValueError:
            continue
        if not words:
            continue
        first = words[0]
        flagged = any(w.startswith("--") for w in words)
        runs = first in RUNNERS - {"mmsched"} or first.startswith(".venv/bin/")
        if runs or (flagged and (first == "mmsched" or first.startswith("scripts/"))):
            commands.append(normalize(_words(span)))
    return commands


def documented_commands() -> dict[str, list[str]]:
    """Every documented command's key, with the pages that show it."""
    found: dict[str, list[str]] = {}
    fence = re.compile(r"^[ \t]*```(\w*)[^\n]*\n(.*?)^[ \t]*```", flags=re.S | re.M)
    for page in PAGES:
        text = page.read_text()
        name = str(page.relative_to(ROOT))
        commands = []
        for tag, body in fence.findall(text):
            if tag in SHELL_TAGS or tag == "":
                commands += _block_commands(tag, body, name)
        commands += _inline_commands(fence.sub("", text))
        for command in commands:
            found.setdefault(command, [])
            if name not in found[command]:
                found[command].append(name)
    return found


# --- the table ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """Run the command with ``extra`` appended and ``env`` laid over its own assignments."""

    extra: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Serve:
    """A server: start it with ``extra`` on a free port, wait for ``/health``, ask one chat
    request with an image, stop it with SIGINT; it exits 0 and leaves nothing behind."""

    extra: tuple[str, ...] = ()
    reply: str = ""  # what the answer's text holds


@dataclass(frozen=True)
class ParseOnly:
    """Not run here, for ``reason``; its arguments (placeholders replaced by ``values``) are
    checked as the command would read them."""

    reason: str
    values: dict[str, str] = field(default_factory=dict)


FANOUT = ("--tp", "2", "--sizes", "0.01", "--requests", "2", "--warmup", "1")
ONE_ROW = ("--input", "copy", "--consume", "none")  # where the docs leave the axes open
# bench load's lines differ in their workload, input and cache flags, which the tokenizer's
# side reads: over the memory transport (the ranks are tasks of the command's own process)
# each runs its own path without spawning ranks. bench load over spawned ranks (zmq and torch,
# every input, the multiturn cache) is tests/test_bench_load.py's.
LOAD = ("--tp", "2", "--rates", "20", "--requests", "4", "--distinct", "2", "--transport", "memory")
CUDA = "needs a CUDA GPU (--consume cuda, the pinned and cuda-ipc stores)"
ROOT_NS = "simulates hosts with network namespaces: needs root and iproute2"
HOSTS = "joins node 0 on another host"
RECURSES = "runs this test suite, this file included"

COMMANDS: dict[str, Run | Serve | ParseOnly] = {
    # README.md, docs/index.md, docs/serving.md
    "bash scripts/serve.sh --tp 2": Serve(reply="reached all 2 rank(s)"),
    "bash scripts/serve.sh --tp 2 --model tiny-qwen2-vl": Serve(),
    # docs/serving.md: two HTTP processes in front of the engine
    "bash scripts/serve.sh --tp 2 --api-servers 2": Serve(reply="reached all 2 rank(s)"),
    "bash scripts/test.sh": ParseOnly(RECURSES),
    "bash scripts/test.sh -m faults": ParseOnly(RECURSES),
    # The whole matrix at full size takes minutes: every strategy with its defaults, ranks as
    # tasks of one process (memory); the spawned transports run in the benchmark page's lines.
    "bash scripts/bench.sh": Run((*FANOUT, *ONE_ROW, "--transports", "memory")),
    "scripts/bench.sh --help": Run(),
    ".venv/bin/mmsched bench load": Run(LOAD),  # its defaults: every strategy
    "mmsched rank --nnodes N --node-rank K --dist-init-addr HOST:PORT": ParseOnly(
        HOSTS, {"N": "2", "K": "1", "HOST:PORT": "127.0.0.1:29500"}
    ),
    "mmsched bench fanout --hosts 2 --tp 8": ParseOnly(ROOT_NS),
    "mmsched bench fanout --hosts N": ParseOnly(ROOT_NS, {"N": "2"}),
    "mmsched bench fanout --hosts 2": ParseOnly(ROOT_NS),
    ".venv/bin/mmsched bench load ...": ParseOnly(
        "a pattern (...: the flags of the sections above); bare it is the README's, which runs",
        {"...": ""},
    ),
    "bash scripts/docs.sh": Run(("--site-dir", "{tmp}/site")),
    "bash scripts/docs.sh serve": ParseOnly(
        "serves until stopped; the build it serves is `bash scripts/docs.sh`'s, which runs"
    ),
    ".venv/bin/python examples/serve.py": Run(),
    # docs/embedding.md
    "MMSCHED_STRATEGY=tokenizer MMSCHED_TRANSPORT=zmq MMSCHED_TP_SIZE=4 "
    ".venv/bin/python examples/serve.py": Run(env={"MMSCHED_TP_SIZE": "2"}),
    # docs/benchmarks.md. Spawned ranks where a line is the only one to show its path: the tp
    # sweep and --consume read over zmq, torch, the cache over zmq. The first two lines' rows
    # over spawned ranks are other lines' (zero-copy over zmq) and tests/test_cli.py's (every
    # strategy over shm, arena input, both consume modes): they run with the ranks in process.
    "python -m mmsched bench fanout --strategies zero-copy --transports zmq --sizes 10,100 "
    "--json PATH": Run((*FANOUT, "--consume", "none", "--transports", "memory")),
    "python -m mmsched bench fanout --consume none --json PATH": Run(
        (*FANOUT, "--strategies", "tokenizer", "--transports", "memory")
    ),
    "python -m mmsched bench fanout --consume read --json PATH": Run(
        (*FANOUT, "--strategies", "zero-copy", "--transports", "zmq", "--input", "copy")
    ),
    "python -m mmsched bench fanout --strategies zero-copy --transports zmq --sizes 10,100 "
    "--tp 1,8 --consume none --json PATH": Run((*FANOUT, "--tp", "1,2", "--input", "copy")),
    "python -m mmsched bench fanout --transports torch --strategies "
    "per-rank,entry-broadcast,tokenizer --hasher sha256 --consume none --json PATH": Run(FANOUT),
    "python -m mmsched bench load --strategy zero-copy --transport zmq "
    "--rates 100,200,300,400,500,600,700 --json PATH": Run(LOAD),
    "python -m mmsched bench load --strategy zero-copy --transport zmq --input arena "
    "--rates 100,200,300,400,500,600,700 --json PATH": Run(LOAD),
    "python -m mmsched bench load --strategy zero-copy --transport zmq --input copy "
    "--rates 200,300,400,500,600,700,800 --json PATH": Run(LOAD),
    "python -m mmsched bench load --strategy zero-copy --transport zmq --input worker "
    "--workers 16 --rates 200,300,400,500,600,700,800 --json PATH": Run((*LOAD, "--workers", "2")),
    "python -m mmsched bench load --strategy zero-copy --transport zmq --input worker "
    "--workers 8 --rates 200,300,400,500,600,700,800 --json PATH": Run((*LOAD, "--workers", "2")),
    "python -m mmsched bench load --strategy zero-copy --transport zmq --workload video "
    "--rates 8,16,24,32 --requests 300 --json PATH": Run((*LOAD, "--distinct", "1")),
    "python -m mmsched bench load --strategy zero-copy --transport zmq --workload mixed "
    "--rates 100,200,300 --json PATH": Run((*LOAD, "--distinct", "1")),
    "python -m mmsched bench load --strategy zero-copy --transport zmq "
    "--rates 400,500,600,700 --json PATH": Run(LOAD),
    'python -c "import sys; sys.setswitchinterval(0.0005); from mmsched.cli import main; '
    "main(['bench', 'load', '--strategy', 'zero-copy', '--transport', 'zmq', '--rates', "
    "'400,500,600,700', '--json', "
    "'docs/results/load_image_tp4_lease3_switch05_run1.json'])\"": ParseOnly(
        "the command above it with the GIL's switch interval lowered: the Python compiles and "
        "main's arguments parse"
    ),
    "python -m mmsched bench fanout --tp 4 --sizes 18.8 --strategies tokenizer "
    "--transports torch,zmq --input copy,repeat --consume none --feature-cache-mb 1024 "
    "--json PATH": Run((*FANOUT, "--transports", "zmq", "--feature-cache-mb", "16")),
    "python -m mmsched bench load --tp 4 --workload multiturn --distinct 168 --strategy tokenizer "
    "--transport torch --rates 100 --requests 1000 --feature-cache-mb 1024 --json PATH": Run(
        (*LOAD, "--feature-cache-mb", "16")
    ),
    "python -m mmsched bench report docs/results/fanout_tp4_none.json "
    "docs/results/fanout_tp4_read.json docs/results/zero_copy_tp1_tp8.json "
    "docs/results/load_image_tp4_copy_run1.json docs/results/load_image_tp4_arena.json "
    "--out docs/report": Run(("--out", "{tmp}/report")),
    # docs/cache.md: patterns whose concrete runs are benchmarks.md's cache commands
    "python -m mmsched bench fanout --input repeat --feature-cache-mb N": ParseOnly(
        "a pattern (N: a size); benchmarks.md's cache command runs", {"N": "1024"}
    ),
    "python -m mmsched bench load --workload multiturn --feature-cache-mb N": ParseOnly(
        "a pattern (N: a size); benchmarks.md's multiturn command runs", {"N": "1024"}
    ),
    # docs/design.md
    # README.md, docs/serving.md: checks that need what this machine lacks
    ".venv/bin/python scripts/docs_screenshot.py": ParseOnly(
        "needs Chromium (the apt package); its --help runs"
    ),
    "bash scripts/gpu_checks.sh OUT 4": ParseOnly(CUDA + "; the script's syntax is checked"),
    "mmsched serve --model tiny-qwen2-vl --tp 4": ParseOnly(
        "the GPU run of scripts/gpu_checks.sh; on the CPU the Quickstart's --model line runs"
    ),
    "mmsched bench serve --rates 5,20 --images 1,4 --requests 40 --max-tokens 16": ParseOnly(
        "against the GPU server of scripts/gpu_checks.sh; bench_serve.sh's line runs"
    ),
    "scripts/sglang_golden/make_golden.py --download": ParseOnly(
        "downloads SGLang's wheel from the network"
    ),
    # docs/gpu.md
    "python -m mmsched bench fanout --tp 1 --sizes 100 --strategies tokenizer --transports zmq "
    "--stores shm,pinned,cuda-ipc --input copy,gpu --consume none,cuda --json PATH": ParseOnly(
        CUDA
    ),
    "python -m mmsched bench fanout --tp 4 --sizes 100 --strategies tokenizer --transports zmq "
    "--stores shm,pinned,cuda-ipc --input copy,gpu --consume none,cuda --json PATH": ParseOnly(
        CUDA
    ),
    "python -m pytest -v tests/test_gpu.py tests/test_rank_group.py": ParseOnly(
        "the GPU tests: they need CUDA, and the suite runs both files anyway"
    ),
    # docs/hosts.md
    "mmsched serve --tp 8 --nnodes 2 --dist-init-addr 10.0.0.1:29500": ParseOnly(
        "node 0 of two hosts: waits for node 1 on another host"
    ),
    "mmsched rank --tp 8 --nnodes 2 --node-rank 1 --dist-init-addr 10.0.0.1:29500": ParseOnly(
        HOSTS
    ),
    "mmsched rank --tp 8 --nnodes 2 --node-rank 1 --dist-init-addr 10.0.0.1:29500 "
    "--rendezvous /run/myserver": ParseOnly(HOSTS),
    "sudo .venv/bin/mmsched bench fanout --hosts 2 --tp 8 --sizes 10,100": ParseOnly(ROOT_NS),
    # docs/benchmarks.md: the small-request fixed cost
    "python -m mmsched bench fanout --tp 4 --sizes 0.01,1 --strategies zero-copy --transports "
    "zmq,memory --input copy --consume none --requests 30 --warmup 5": Run(FANOUT),
    "python -m mmsched bench fanout --tp 4 --sizes 100 --strategies zero-copy --transports zmq "
    "--input copy --consume none --requests 20 --warmup 3": Run(FANOUT),
    # docs/serving.md: the preprocessing measurements
    "python3 scripts/preprocess_compare.py --images 64 --workers 12": ParseOnly(
        "the accelerator host's comparison of the backends: its cuda rows need a GPU and its cpu "
        "rows torchvision; its --help runs"
    ),
    "python3 scripts/cuda_batches.py alone": ParseOnly(
        "the cuda backend alone: needs a CUDA GPU and torchvision; its --help runs"
    ),
    "python3 scripts/cuda_batches.py log docs/results/serve_h200_batch_log_server.txt": Run(),
    "python -m mmsched serve --port 8051 --tp 4 --preprocess cuda --api-servers 4": ParseOnly(
        "the H200 limits' cuda server; " + CUDA
    ),
    "python -m mmsched bench serve --base-url http://127.0.0.1:8051/v1 --clients 6 --rates "
    "200,600 --images 1 --requests 2400 --seed 71 --json PATH": ParseOnly(
        "against the cuda server above; bench_serve.sh's line runs"
    ),
    "python -m mmsched bench serve --base-url http://127.0.0.1:8051/v1 --clients 6 --rates "
    "150 --images 4 --requests 600 --seed 81 --json PATH": ParseOnly(
        "against the cuda server above; bench_serve.sh's line runs"
    ),
    "python -m mmsched serve --port 8052 --tp 4 --preprocess cpu --api-servers 4": ParseOnly(
        "the cpu pool needs torchvision, absent here; tests/test_preprocess.py runs the pool"
    ),
    "python -m mmsched bench serve --base-url http://127.0.0.1:8052/v1 --clients 4 --rates "
    "300 --images 1 --requests 1200 --seed 101 --json PATH": ParseOnly(
        "against the cpu server above; bench_serve.sh's line runs"
    ),
    "mmsched serve --tp 2": ParseOnly(
        "the server the repeat measurement ran against; the Quickstart's serve line runs"
    ),
    # docs/serving.md: the HTTP layer's cost, fewer requests and repeats
    ".venv/bin/python scripts/http_cost.py --image-size 1184x888": Run(
        ("--requests", "8", "--warmup", "2", "--repeats", "3")
    ),
    ".venv/bin/python scripts/http_cost.py --image-size 1184x888 --api-servers 2": Run(
        ("--requests", "8", "--warmup", "2", "--repeats", "3")
    ),
    # docs/serving.md: the script itself (it has no setup step), two images per request at most
    'MMSCHED_TRANSPORT=zmq MMSCHED_PAYLOAD_STORE=shm "SERVE_ARGS=--tp 4" bash '
    "scripts/bench_serve.sh --rates 5 --images 1,4 --requests 100 --json PATH": Run(
        ("--images", "1,2", "--requests", "2"), env={"SERVE_ARGS": "--tp 2"}
    ),
    # docs/serving.md: the load from several client processes, with repeats
    '"SERVE_ARGS=--tp 4" bash scripts/bench_serve.sh --rates 250,500,1000 --images 1 '
    "--requests 5000 --clients 8 --repeat 0.2 --json PATH": Run(
        ("--rates", "5", "--requests", "4", "--image-size", "128x96", "--clients", "2"),
        env={"SERVE_ARGS": "--tp 2"},
    ),
}


# --- how a command line becomes what runs ---------------------------------------------------


def exec_line(script: Path) -> list[str] | None:
    """The words of the ``exec ...`` line a script ends with, or None."""
    lines = [x.strip() for x in script.read_text().splitlines() if x.strip()]
    if lines and lines[-1].startswith("exec "):
        return shlex.split(lines[-1])[1:]
    return None


def _local(word: str) -> str:
    if word.startswith(".venv/bin/"):
        return str(BIN / word.removeprefix(".venv/bin/"))
    if word in ("python", "python3"):
        return sys.executable
    if word == "mmsched":
        return str(BIN / "mmsched")
    return word


def resolve(words: list[str]) -> list[str]:
    """The argv that does what ``words`` shows, in the environment the tests run in."""
    if words[:1] == ["sudo"]:
        words = words[1:]
    if words[:1] in (["bash"], ["sh"]) and len(words) > 1:
        script = ROOT / words[1]
        assert script.is_file(), f"{words[1]} does not exist"
        line = exec_line(script)
        if line is None:
            return ["bash", str(script), *words[2:]]
        args = words[2:]
        out: list[str] = []
        for word in line:
            if word == "$@":
                out += args
            elif m := re.fullmatch(r"\$\{@:-(.*)\}", word):
                out += args or shlex.split(m.group(1))
            else:
                assert "$" not in word, f"{words[1]}: cannot follow {word!r} in its exec line"
                out.append(_local(word))
        return out
    if words[0].startswith("scripts/") and words[0].endswith(".sh"):
        return resolve(["bash", *words])
    if words[0].startswith("scripts/"):
        return [sys.executable, str(ROOT / words[0]), *words[1:]]
    return [_local(words[0]), *words[1:]]


def mmsched_args(argv: list[str]) -> list[str] | None:
    """The arguments ``mmsched`` gets from ``argv``, or None if it is not ``mmsched``."""
    if argv[:3] == [sys.executable, "-m", "mmsched"]:
        return argv[3:]
    if argv[:1] == [str(BIN / "mmsched")]:
        return argv[1:]
    return None


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMSCHED_")}
    return {**env, "NO_MKDOCS_2_WARNING": "1", "PYTHON": sys.executable, **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _redirect(argv: list[str], tmp: Path) -> list[str]:
    """``argv`` with ``--json`` and ``--out`` written into ``tmp``, never into the checkout."""
    out = list(argv)
    for i, word in enumerate(out[:-1]):
        if word in ("--json", "--out"):
            out[i + 1] = str(tmp / Path(out[i + 1]).name)
    return out


# --- the checks -----------------------------------------------------------------------------

DOCUMENTED = documented_commands()
SHARDS = 3
PLACEHOLDER = Path("/nonexistent/tmp")  # where a small run's files go, when only compared


def command_id(command: str) -> str:
    return command if len(command) <= 90 else command[:87] + "..."


def of_kind(kind: type) -> list[str]:
    return [c for c, how in COMMANDS.items() if isinstance(how, kind) and c in DOCUMENTED]


def _small_argv(command: str, tmp: Path) -> tuple[dict[str, str], list[str]]:
    how = COMMANDS[command]
    assert isinstance(how, Run)
    env, words = _split_env(_words(command))
    extra = [x.replace("{tmp}", str(tmp)) for x in how.extra]
    return env, _redirect([*resolve(words), *extra], tmp)


def _same_runs() -> dict[str, str]:
    """Each command whose small run is another's (the same arguments once the small flags
    override the rest): the command that runs them. Decided here, not as the runs go, so
    that it holds whichever process runs which shard."""
    first: dict[str, str] = {}
    same: dict[str, str] = {}
    for command in of_kind(Run):
        how = COMMANDS[command]
        assert isinstance(how, Run)
        env, argv = _small_argv(command, PLACEHOLDER)
        args = mmsched_args(argv)
        if args is None or "--help" in args or env or how.env:
            continue
        parsed = vars(build_parser().parse_args(args))
        key = repr(sorted({**parsed, "json": None, "out": None}.items()))
        if key in first:
            same[command] = first[key]
        else:
            first[key] = command
    return same


SAME_RUN = _same_runs()


def shard(index: int) -> tuple[list[str], list[str]]:
    """The runs (``Run``) and servers (``Serve``) of shard ``index``, dealt in table order
    so that the slow kinds spread over the shards."""
    dealt = [*of_kind(Run), *of_kind(Serve)][index::SHARDS]
    return [c for c in dealt if isinstance(COMMANDS[c], Run)], [
        c for c in dealt if isinstance(COMMANDS[c], Serve)
    ]


def check_parse_only(command: str) -> None:
    how = COMMANDS[command]
    assert isinstance(how, ParseOnly) and how.reason
    words = _split_env(_words(command))[1]
    words = [how.values.get(w, w) for w in words if how.values.get(w, w)]
    argv = resolve(words)
    if (args := mmsched_args(argv)) is not None:
        try:
            build_parser().parse_args(args)
        except SystemExit:
            pytest.fail(f"`{command}`: mmsched does not accept {args}")
    elif argv[1:3] == ["-m", "pytest"]:
        markers = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]
        names = {m.split(":")[0] for m in markers["ini_options"]["markers"]}
        for flag, value in itertools.pairwise(argv[3:]):
            if flag == "-m":
                assert set(re.findall(r"\w+", value)) - {"not", "and", "or"} <= names, value
        for word in argv[3:]:
            if word.startswith("tests/"):
                assert (ROOT / word).exists(), word
    elif argv[1:2] == ["-c"]:
        # The Python it runs compiles, and the arguments it hands mmsched's main parse.
        tree = ast.parse(argv[2])
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
        lists = [ast.literal_eval(c.args[0]) for c in calls if getattr(c.func, "id", "") == "main"]
        assert lists, f"`{command}` calls no main([...])"
        for args in lists:
            build_parser().parse_args(args)
    elif argv[0] == sys.executable:
        done = subprocess.run([*argv[:2], "--help"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        for flag in argv[2:]:
            if flag.startswith("--"):
                assert flag in done.stdout, f"{argv[1]} --help does not list {flag}"
    elif argv[0] == "bash":  # a script with no exec line to follow: its syntax
        done = subprocess.run(["bash", "-n", argv[1]], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    elif Path(argv[0]).parent == BIN:
        done = subprocess.run([*argv, "--help"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    else:
        pytest.fail(f"`{command}`: no way to check {argv}")


def check_run_small(command: str, tmp_path: Path) -> None:
    if command in SAME_RUN:  # lines that differ only in what the small flags override
        pytest.skip(f"the same run as `{SAME_RUN[command]}`, once made small")
    how = COMMANDS[command]
    assert isinstance(how, Run)
    env, argv = _small_argv(command, tmp_path)
    done = subprocess.run(
        argv,
        env=clean_env({**env, **how.env, "PORT": str(free_port())}),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    shown = f"`{command}` ran as {argv}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert done.returncode == 0, shown
    if "--json" in argv:
        records = json.loads(Path(argv[argv.index("--json") + 1]).read_text())
        assert isinstance(records, list) and records, shown
    if "--out" in argv:
        assert (Path(argv[argv.index("--out") + 1]) / "report.md").is_file(), shown


def _png() -> str:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def check_server(command: str) -> None:
    psutil = pytest.importorskip("psutil")
    pytest.importorskip("PIL", reason="the serve extra installs Pillow")
    from own_run import segments_of

    how = COMMANDS[command]
    assert isinstance(how, Serve)
    env, words = _split_env(_words(command))
    port = free_port()
    argv = [*resolve(words), *how.extra, "--port", str(port)]
    process = subprocess.Popen(
        argv,
        env=clean_env(env),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            assert process.poll() is None, f"`{command}` exited: {process.communicate()[0]}"
            assert time.monotonic() < deadline, f"`{command}` not healthy in {TIMEOUT_S} s"
            try:
                if _get(url + "/health") == 200:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        with urllib.request.urlopen(url + "/v1/models", timeout=10) as response:
            model = json.loads(response.read())["data"][0]["id"]
        content = [
            {"type": "text", "text": "What is in the image?"},
            {"type": "image_url", "image_url": {"url": _png()}},
        ]
        body = {
            "model": model,
            "max_tokens": 16,
            "messages": [{"role": "user", "content": content}],
        }
        request = urllib.request.Request(
            url + "/v1/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            assert response.status == 200
            reply = json.loads(response.read())["choices"][0]["message"]["content"]
        assert how.reply in reply
        ranks = psutil.Process(process.pid).children(recursive=True)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
        try:
            output = process.communicate(timeout=60)[0]
        except subprocess.TimeoutExpired:
            process.kill()
            output = process.communicate()[0]
    assert process.returncode == 0, f"`{command}` stopped with {process.returncode}:\n{output}"
    alive = psutil.wait_procs(ranks, timeout=10)[1]
    assert [p for p in alive if p.status() != psutil.STATUS_ZOMBIE] == [], "ranks outlived it"
    assert segments_of([process.pid, *(p.pid for p in ranks)]) == set()


def shard_tests(index: int) -> tuple[Callable[..., None], Callable[..., None]]:
    """Shard ``index``'s two tests, for a test file to bind as its own
    ``test_command_runs_small`` and ``test_server_command_serves_one_request_and_stops_clean``."""
    runs, servers = shard(index)

    @pytest.mark.parametrize("command", runs, ids=command_id)
    def runs_small(command: str, tmp_path: Path) -> None:
        check_run_small(command, tmp_path)

    @pytest.mark.parametrize("command", servers, ids=command_id)
    def serves(command: str) -> None:
        check_server(command)

    return runs_small, serves
