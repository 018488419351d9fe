"""The documentation says what the code does: settings, commands, modules, the worked example.

The site itself is built with ``mkdocs build --strict`` by ``scripts/test.sh``, which fails on
a broken link, a page missing from the nav or an API name that does not resolve. These tests
check what a build cannot: that the prose agrees with the code.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mmsched import Config
from mmsched.cli import build_parser

ROOT = Path(__file__).parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def _table_rows(text: str, first_header: str) -> list[list[str]]:
    """The rows of the Markdown table whose header starts with ``| first_header |``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def _shown(value: Any) -> str:
    """A default as the tables write it, backticks aside."""
    if value is None or isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


@pytest.mark.parametrize("page", ["docs/configuration.md", "README.md"])
def test_configuration_tables_list_every_field_with_its_default(page: str) -> None:
    rows = _table_rows((ROOT / page).read_text(), "field")
    documented = {row[0].strip("`"): row for row in rows}
    defaults = {f.name: f.default for f in dataclasses.fields(Config)}
    assert set(documented) == set(defaults), "every Config field, and only those"
    for name, row in documented.items():
        default = row[3] if page.startswith("docs/") else row[1]
        assert default.replace("`", "").lower() == _shown(defaults[name]), name
        if page.startswith("docs/"):
            assert row[1] == f"`MMSCHED_{name.upper()}`"


def _documented_commands() -> list[tuple[str, list[str]]]:
    """Every ``mmsched ...`` command line in a code block of a page, as argv."""
    commands = []
    for page in PAGES:
        text = page.read_text()
        for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                match = re.search(r"(?:python -m mmsched|\.venv/bin/mmsched)\s+(.*)", line)
                if match:
                    commands.append((page.name, shlex.split(match.group(1), comments=True)))
                for script, command in (
                    ("bench", ["bench", "fanout"]),
                    ("serve", ["serve"]),
                    ("bench_serve", ["bench", "serve"]),
                ):
                    match = re.search(rf"scripts/{script}\.sh\s+(.*)", line)
                    if match:
                        argv = shlex.split(match.group(1), comments=True)
                        commands.append((page.name, [*command, *argv]))
    return commands


def test_every_documented_command_is_accepted_by_the_cli() -> None:
    commands = _documented_commands()
    assert len(commands) >= 15  # the benchmark page's sections, the report, the README
    parser = build_parser()
    for page, argv in commands:
        if argv[-1:] == ["--help"]:
            continue
        try:
            parser.parse_args(argv)
        except SystemExit:  # argparse's way of saying no
            pytest.fail(f"{page}: `mmsched {' '.join(argv)}` is not a valid command")


def test_api_reference_covers_every_module() -> None:
    referenced = set()
    for page in (DOCS / "reference").glob("*.md"):
        referenced |= set(re.findall(r"^::: (mmsched[\w.]*)", page.read_text(), flags=re.M))
    modules = set()
    for path in (ROOT / "src" / "mmsched").rglob("*.py"):
        parts = path.relative_to(ROOT / "src").with_suffix("").parts
        if parts[-1] == "__main__":
            continue
        modules.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    modules.discard("mmsched")  # the package re-exports; its names are documented where defined
    assert modules - referenced == set(), "modules missing from docs/reference"
    assert referenced - modules == set(), "docs/reference names modules that do not exist"


def _shape_of(line: str) -> str:
    """A line with its run-dependent parts (numbers, hex digests) blanked."""
    return re.sub(r"\b[0-9a-f]*\d[0-9a-f]*\b", "#", line)


@pytest.mark.faults  # starts a real pipeline: spawned ranks, shared memory
def test_worked_example_runs_as_the_embedding_page_says() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMSCHED_")}
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "serve.py")],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()

    # Every request but the malformed one reached both ranks, with one hash per request.
    seen: dict[str, set[tuple[int, str]]] = {}
    for line in lines:
        match = re.match(
            r"rank (\d) iteration (\d+): (req-\d) image \(4000, 1176\) hash (\w+)",
            line,
        )
        if match:
            rank, iteration, rid, digest = match.groups()
            seen.setdefault(rid, set()).add((int(rank), f"{iteration}/{digest}"))
    assert sorted(seen) == ["req-0", "req-1", "req-3"]
    for rid, sightings in seen.items():
        assert {rank for rank, _ in sightings} == {0, 1}, rid
        assert len({what for _, what in sightings}) == 1, f"{rid}: ranks disagree"
    assert "req-2: rejected: mm_items[0].offsets: span (3, 1016) past input of length 1006" in lines
    served = [x for x in lines if re.fullmatch(r"req-[013]: 1006 tokens, pad values \[\d+\]", x)]
    assert len(served) == 3

    # The output quoted on the page has the shape of what the program prints.
    page = (DOCS / "embedding.md").read_text()
    quoted = re.search(r"```text\n(.*?)```", page, flags=re.S)
    assert quoted is not None
    assert {_shape_of(x) for x in quoted.group(1).splitlines()} == {_shape_of(x) for x in lines}


def test_every_test_the_docs_name_exists() -> None:
    tests = ROOT / "tests"
    defined = {p.stem for p in tests.glob("test_*.py")}
    for path in tests.glob("test_*.py"):
        defined |= set(re.findall(r"^\s*(?:async )?def (test_\w+)", path.read_text(), flags=re.M))
    for page in PAGES:
        named = set(re.findall(r"\btest_\w+", page.read_text()))
        assert named <= defined, f"{page.name} names tests that do not exist: {named - defined}"


# A diagram drawn in characters: box-drawing or arrow glyphs, or arrows like ``--->``.
_DRAWN = re.compile(r"[\u2500-\u257f\u25b2-\u25c4]|-{3,}>|<-{3,}")


def test_diagrams_are_mermaid_drawn_by_the_sites_own_copy() -> None:
    # A diagram in characters is cut off on the right of a narrow page; a Mermaid one is
    # drawn to the column's width. The theme fetches Mermaid from a CDN unless the page
    # already has it: the site carries its own, so it draws them offline.
    diagrams = 0
    for page in [*PAGES, *sorted((DOCS / "reference").glob("*.md"))]:
        for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", page.read_text(), flags=re.S | re.M):
            if lang == "mermaid":
                diagrams += 1
            else:
                assert not _DRAWN.search(body), f"{page.name}: a diagram drawn in text"
    assert diagrams >= 6  # design.md's five, hosts.md's topology
    config = (ROOT / "mkdocs.yml").read_text()
    assert "font: false" in config
    assert re.search(r"^extra_javascript:\n  - javascripts/mermaid\.min\.js", config, flags=re.M)
    assert (DOCS / "javascripts" / "mermaid.min.js").stat().st_size > 1_000_000
    assert "MIT License" in (DOCS / "javascripts" / "mermaid.LICENSE.txt").read_text()
    assert "https://" not in config.split("extra_javascript:")[1].split("\n\n")[0]


def test_mermaid_blocks_become_what_the_theme_draws() -> None:
    markdown = pytest.importorskip("markdown")
    config = pytest.importorskip("mkdocs.config").load_config(str(ROOT / "mkdocs.yml"))
    md = markdown.Markdown(
        extensions=config.markdown_extensions, extension_configs=config.mdx_configs
    )
    for name, count in (("design.md", 5), ("hosts.md", 1)):
        html = md.reset().convert((DOCS / name).read_text())
        assert html.count('<pre class="mermaid"><code>') == count, name


def _quickstart_commands(page: Path) -> list[str]:
    """The commands in the code blocks of a page's Quickstart section, comments left out."""
    section = page.read_text().split("## Quickstart\n", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for line in block.splitlines():
            command = " ".join(shlex.split(line, comments=True))
            if command:
                commands.append(command)
    return commands


def test_the_home_pages_quickstart_is_the_readmes() -> None:
    readme = _quickstart_commands(ROOT / "README.md")
    assert readme[:2] == ["bash scripts/serve.sh --tp 2", "bash scripts/test.sh"]
    assert _quickstart_commands(DOCS / "index.md") == readme
