"""SGLang 0.5.23's own multimodal hashing and padding code, loaded unchanged from its wheel.

Nothing of SGLang is copied into mmsched. This module opens the PyPI wheel (pinned by name
and SHA-256), parses the sources of the few SGLang modules that hash a feature, derive its
pad values and pad the input ids, and compiles exactly the top-level definitions listed in
``PICKS`` -- their syntax trees as parsed, under the wheel's own file names and line numbers,
so a traceback points into SGLang's file. What those definitions import from the rest of
SGLang is not loaded; it is stubbed here, and only what the host (CPU) path never reaches:

- ``gpu_tensor_hash`` (SGLang's Triton hash of a CUDA tensor) raises: the GPU path is not
  reproduced, and nothing here puts a tensor on a GPU.
- ``CudaIpcTensorTransportProxy`` and ``ShmPointerMMData`` are empty marker classes: no
  feature here is one, so SGLang's ``isinstance`` checks are false, as on a CPU transport.
- ``envs`` answers SGLang's defaults (``sglang/srt/environ.py``: ``SGLANG_MM_BUFFER_SIZE_MB``
  0, ``SGLANG_MM_SKIP_COMPUTE_HASH`` false), so features are hashed, on the host.

The loaded definitions are registered under their SGLang module names (``sglang.srt...``) in
``sys.modules``, because SGLang's own functions import each other by those names at call
time and msgspec resolves the struct's annotations through its module. Loading refuses to
run where a real ``sglang`` package is importable, so that it never shadows one.

Used by ``make_golden.py`` (which writes the golden vectors) and by the parity test that
checks mmsched against the live functions when the wheel is cached in ``.whl/``.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import logging
import subprocess
import sys
import types
import zipfile
from pathlib import Path
from typing import Any

VERSION = "0.5.23"
WHEEL_NAME = f"sglang-{VERSION}-cp311-cp311-manylinux_2_34_x86_64.whl"
WHEEL_SHA256 = "00b3cd5b265ac76c64185fbb6b95424f324ddd9f428d0306b77bc9db9d859937"
REPO_ROOT = Path(__file__).resolve().parents[2]
WHEEL_DIR = REPO_ROOT / ".whl"  # ignored by git

# Module path in the wheel -> the top-level names taken from it (None: the whole module).
PICKS: dict[str, list[str] | None] = {
    "sglang/srt/multimodal/modality.py": None,
    "sglang/srt/utils/common.py": ["flatten_nested_list", "assert_int64_array"],
    "sglang/srt/multimodal/cache/identity.py": [
        "CONTENT_HASH_PREFIX",
        "_SHA256_HEX_LENGTH",
        "parse_content_hash",
        "_hash_parts",
        "resolve_multimodal_item_hash",
    ],
    "sglang/srt/managers/schedule_batch.py": [
        "MM_PAD_SHIFT_VALUE",
        "_MM_HASH_MASK",
        "_MM_IDENTITY_BYTES",
        "_MM_WIDE_PAD_TAG",
        "_MM_WIDE_PAD_MASK",
        "logger",
        "MultimodalDataValue",
        "_compute_pad_values",
        "MultimodalDataItem",
        "MultimodalProcessorOutput",
        "MultimodalInputs",
    ],
    "sglang/srt/managers/mm_utils.py": [
        "data_hash",
        "tensor_hash",
        "hash_feature",
        "pad_mm_tokens",
        "pad_mm_token_pairs",
    ],
}
# Imports of these top-level packages are run as the module wrote them; every other import
# (the rest of SGLang, transformers, PIL) is left out and its names come from the stubs.
_RUN_IMPORTS_OF = set(sys.stdlib_module_names) | {"numpy", "torch", "msgspec"}


class WheelMissing(RuntimeError):
    """The pinned wheel is not in ``.whl/`` (run ``make_golden.py --download``)."""


def wheel_path() -> Path:
    return WHEEL_DIR / WHEEL_NAME


def download() -> Path:
    """Fetch the pinned wheel, without its dependencies, into ``.whl/``; check its digest."""
    WHEEL_DIR.mkdir(exist_ok=True)
    if not wheel_path().exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                f"sglang=={VERSION}",
                "--only-binary=:all:",
                "--python-version",
                "3.11",
                "-d",
                str(WHEEL_DIR),
            ],
            check=True,
        )
    check_digest()
    return wheel_path()


def check_digest() -> None:
    path = wheel_path()
    if not path.exists():
        raise WheelMissing(f"{path} not found; run scripts/sglang_golden/make_golden.py --download")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise RuntimeError(f"{path} has SHA-256 {digest}, expected {WHEEL_SHA256}")


class _Flag:
    def __init__(self, value: Any) -> None:
        self._value = value

    def get(self) -> Any:
        return self._value


def _gpu_tensor_hash(tensor: Any) -> int:
    raise NotImplementedError("SGLang's GPU (Triton) tensor hash is not reproduced here")


def _print_warning_once(msg: str) -> None:
    logging.getLogger("sglang").warning(msg)


def _stubs() -> dict[str, Any]:
    return {
        "envs": types.SimpleNamespace(
            SGLANG_MM_BUFFER_SIZE_MB=_Flag(0), SGLANG_MM_SKIP_COMPUTE_HASH=_Flag(False)
        ),
        "gpu_tensor_hash": _gpu_tensor_hash,
        "CudaIpcTensorTransportProxy": type("CudaIpcTensorTransportProxy", (), {}),
        "ShmPointerMMData": type("ShmPointerMMData", (), {}),
        "print_warning_once": _print_warning_once,
        "logger": logging.getLogger("sglang"),
    }


def _defined_names(node: ast.stmt) -> set[str]:
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return {node.name}
    if isinstance(node, ast.Assign):
        return {t.id for t in node.targets if isinstance(t, ast.Name)}
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return {node.target.id}
    return set()


def _runs_import(node: ast.stmt) -> bool:
    if isinstance(node, ast.Import):
        return all(alias.name.split(".")[0] in _RUN_IMPORTS_OF for alias in node.names)
    if isinstance(node, ast.ImportFrom):
        return node.level == 0 and (node.module or "").split(".")[0] in _RUN_IMPORTS_OF
    return False


def _module(name: str, *, package: bool = False) -> types.ModuleType:
    module = sys.modules.get(name)
    if module is None:
        module = types.ModuleType(name)
        if package:
            module.__path__ = []
        sys.modules[name] = module
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(_module(parent, package=True), child, module)
    return module


def _load(
    wheel: zipfile.ZipFile, path: str, names: list[str] | None, extra: dict[str, Any]
) -> types.ModuleType:
    source = wheel.read(path).decode()
    filename = f"{WHEEL_NAME}/{path}"
    tree = ast.parse(source, filename=filename)
    if names is None:
        body = tree.body
    else:
        body = [n for n in tree.body if _runs_import(n) or _defined_names(n) & set(names)]
        found = set().union(*(_defined_names(n) for n in body))
        missing = set(names) - found
        if missing:
            raise RuntimeError(f"{path} no longer defines {sorted(missing)}")
    module = _module(path.removesuffix(".py").replace("/", "."))
    module.__file__ = filename
    module.__dict__.update(extra)
    code = compile(ast.Module(body=body, type_ignores=[]), filename, "exec", dont_inherit=True)
    exec(code, module.__dict__)
    return module


def load() -> types.SimpleNamespace:
    """SGLang's loaded definitions, by name (``MultimodalDataItem``, ``hash_feature``, ...).

    Raises:
        WheelMissing: the wheel is not in ``.whl/``.
        RuntimeError: a real ``sglang`` is installed, or the wheel is not the pinned one.
    """
    loaded = sys.modules.get("sglang.srt.managers.mm_utils")
    if loaded is not None and getattr(loaded, "__file__", "").startswith(WHEEL_NAME):
        return _namespace()
    if "sglang" in sys.modules or importlib.util.find_spec("sglang") is not None:
        raise RuntimeError("a real sglang package is importable; not shadowing it")
    check_digest()
    with zipfile.ZipFile(wheel_path()) as wheel:
        modality = _load(wheel, "sglang/srt/multimodal/modality.py", None, {})
        common = _load(wheel, "sglang/srt/utils/common.py", PICKS["sglang/srt/utils/common.py"], {})
        _module("sglang.srt.environ").envs = _stubs()["envs"]
        identity = _load(
            wheel,
            "sglang/srt/multimodal/cache/identity.py",
            PICKS["sglang/srt/multimodal/cache/identity.py"],
            {},
        )
        _module(
            "sglang.srt.multimodal.cache", package=True
        ).resolve_multimodal_item_hash = identity.resolve_multimodal_item_hash
        shared = {
            **_stubs(),
            "Modality": modality.Modality,
            "MultimodalInputFormat": modality.MultimodalInputFormat,
            "flatten_nested_list": common.flatten_nested_list,
            "assert_int64_array": common.assert_int64_array,
        }
        batch = _load(
            wheel,
            "sglang/srt/managers/schedule_batch.py",
            PICKS["sglang/srt/managers/schedule_batch.py"],
            shared,
        )
        _load(
            wheel,
            "sglang/srt/managers/mm_utils.py",
            PICKS["sglang/srt/managers/mm_utils.py"],
            {
                **shared,
                "MultimodalInputs": batch.MultimodalInputs,
                "MultimodalProcessorOutput": batch.MultimodalProcessorOutput,
            },
        )
    return _namespace()


def _namespace() -> types.SimpleNamespace:
    ns: dict[str, Any] = {}
    for path, names in PICKS.items():
        module = sys.modules[path.removesuffix(".py").replace("/", ".")]
        for name in names or [n for n in vars(module) if not n.startswith("__")]:
            ns[name] = getattr(module, name)
    return types.SimpleNamespace(**ns)
