"""The code's shape, checked: no branching on registry names outside the registries' own
packages, the arena behind the payload-store package, and every documented raise in the
error tree."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import mmsched
from mmsched import errors
from mmsched.stores import store_names
from mmsched.strategies import PRESETS, strategy_names
from mmsched.transports import transport_names

SRC = Path(__file__).resolve().parents[1] / "src" / "mmsched"
# The modules that use strategies, stores and transports without being one of them.
USERS = (
    [
        SRC / name
        for name in (
            "pipeline.py",
            "tokenizer.py",
            "scheduler.py",
            "config.py",
            "cli.py",
            "node.py",
            "rank_group.py",
        )
    ]
    + sorted((SRC / "runtime").glob("*.py"))
    + sorted((SRC / "bench").glob("*.py"))
)
NAMES = {*store_names(), *strategy_names(), *transport_names(), *PRESETS}


def _compared_names(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            for operand in [node.left, *node.comparators]:
                for sub in ast.walk(operand):
                    if isinstance(sub, ast.Constant) and sub.value in NAMES:
                        found.append(f"{path.name}:{node.lineno}: {sub.value!r}")
        elif isinstance(node, ast.match_case):
            for sub in ast.walk(node.pattern):
                if isinstance(sub, ast.Constant) and sub.value in NAMES:
                    found.append(f"{path.name}:{node.pattern.lineno}: {sub.value!r}")
    return found


def test_no_module_branches_on_a_strategy_store_or_transport_name() -> None:
    assert len(USERS) > 8
    assert [hit for path in USERS for hit in _compared_names(path)] == []


def test_the_rank_side_opens_stores_and_transports_only_through_the_runtime() -> None:
    """The store and transport lifecycle (``create``, ``attach``, ``open_transport``) and
    input building are written once, in ``mmsched.runtime``; the rank side calls that."""
    calls = {"create", "attach", "open_transport", "materialize", "from_dict"}
    found = []
    for path in sorted(SRC.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                # inputs.py and config.py define from_dict; the transport contract suite
                # opens the transport under test itself.
                owner = getattr(func.value, "id", "") if isinstance(func, ast.Attribute) else ""
                if name == "from_dict" and owner == "PatchSpec":
                    continue  # another type's constructor (pixels.PatchSpec's), not inputs
                if name in calls and path.name not in ("inputs.py", "config.py", "testing.py"):
                    found.append(f"{path.name}:{node.lineno}: {name}")
    assert found == []


def test_the_name_check_would_catch_a_comparison(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text('if config.transport == "shm" or strategy in ("zero-copy",):\n    pass\n')
    assert _compared_names(sample) == ["sample.py:1: 'shm'", "sample.py:1: 'zero-copy'"]


def _imports_arena(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module is not None:
            if node.module == "mmsched.stores.arena":
                return True
            if node.module == "mmsched.stores" and any(a.name == "arena" for a in node.names):
                return True
        if isinstance(node, ast.Import) and any(
            a.name == "mmsched.stores.arena" for a in node.names
        ):
            return True
    return False


def test_only_the_payload_store_package_imports_the_arena() -> None:
    importers = {p.relative_to(SRC).as_posix() for p in SRC.rglob("*.py") if _imports_arena(p)}
    # The shm store, its lending half (room for producers in other processes), and the
    # cuda-ipc store (the arena's ring of offsets, for slices of a GPU pool).
    assert importers == {"stores/shm.py", "stores/lending.py", "stores/cuda_ipc.py"}


# -- the error tree --------------------------------------------------------------------------


def _public_callables() -> list[tuple[str, object]]:
    found: list[tuple[str, object]] = []
    for name in mmsched.__all__:
        value = getattr(mmsched, name)
        if inspect.isclass(value) and not issubclass(value, BaseException):
            for attr, member in vars(value).items():
                if not attr.startswith("_") or attr in ("__init__", "__aenter__"):
                    found.append((f"{name}.{attr}", member))
        elif callable(value):
            found.append((name, value))
    return found


def _documented_raises(obj: object) -> list[str]:
    target = obj.__func__ if isinstance(obj, classmethod | staticmethod) else obj
    doc = inspect.getdoc(target) or ""
    section = re.search(r"^Raises:\n((?:[ ]{4}.*\n?|\n)+)", doc, flags=re.M)
    if section is None:
        return []
    return re.findall(r"^[ ]{4}(\w+):", section.group(1), flags=re.M)


def test_every_documented_raise_of_the_public_api_is_an_mmsched_error() -> None:
    documented = {
        name: raises for name, obj in _public_callables() if (raises := _documented_raises(obj))
    }
    # Enough of the API documents its raises for the walk to mean something.
    expected = {"Pipeline.start", "Pipeline.generate", "encode", "Decoder.decode", "Config.replace"}
    assert expected <= set(documented)
    outside = {
        name: kind
        for name, raises in documented.items()
        for kind in raises
        if not (
            inspect.isclass(getattr(errors, kind, None))
            and issubclass(getattr(errors, kind), errors.MmschedError)
        )
    }
    assert outside == {}


def test_the_tree_in_the_errors_docstring_is_the_class_tree() -> None:
    drawn = re.findall(r"[├└]── (\w+)", errors.__doc__ or "")
    classes = [
        name
        for name, value in vars(errors).items()
        if inspect.isclass(value) and issubclass(value, errors.MmschedError)
    ]
    assert sorted(drawn) == sorted(c for c in classes if c != "MmschedError")
    assert issubclass(errors.ArenaFull, errors.Overloaded)


def test_production_messages_and_config_carry_no_instrumentation() -> None:
    import dataclasses

    from mmsched import Config, TokenizedGenerateReqInput
    from mmsched.messages import Batch, GenerateOutput

    assert [f.name for f in dataclasses.fields(TokenizedGenerateReqInput)] == [
        "rid",
        "input_ids",
        "sampling_params",
        "mm_inputs",
    ]
    probes_only = {"created_at", "check_ranks", "report_ranks", "model_step_ms", "ready_at"}
    for cls in (TokenizedGenerateReqInput, Batch, GenerateOutput, Config):
        assert probes_only.isdisjoint(f.name for f in dataclasses.fields(cls)), cls
