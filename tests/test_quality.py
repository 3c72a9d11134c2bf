"""Static checks that CI must keep green: mypy --strict, ruff, rustfmt, the native stub."""

from __future__ import annotations

import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from llmtally import _core

ROOT = Path(__file__).resolve().parent.parent


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.timeout(600)
def test_mypy_strict() -> None:
    pytest.importorskip("mypy")
    result = _run(sys.executable, "-m", "mypy")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.timeout(120)
def test_ruff() -> None:
    pytest.importorskip("ruff")
    result = _run(sys.executable, "-m", "ruff", "check", "python", "tests", "benches")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.timeout(120)
def test_rustfmt() -> None:
    if shutil.which("cargo") is None:
        pytest.skip("cargo is not installed")
    result = _run("cargo", "fmt", "--check")
    if "rustfmt" in result.stderr and "not installed" in result.stderr:
        pytest.skip("rustfmt is not installed")
    assert result.returncode == 0, result.stdout + result.stderr


def test_native_stub_passes_stubtest() -> None:
    """Every signature in ``_core.pyi`` against the compiled module (mypy's stubtest)."""
    pytest.importorskip("mypy.stubtest")
    result = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "llmtally._core"],
        cwd=ROOT / "python",
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_one_module_imports_the_core() -> None:
    """``llmtally._native`` is the one door to the Rust core: no other module of the package
    imports ``llmtally._core``, and it re-exports every public name of the core."""
    import ast

    from llmtally import _native

    package = ROOT / "python" / "llmtally"
    importers = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                names = [module] + [f"{module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            if any(n == "llmtally._core" or n.startswith("llmtally._core.") for n in names):
                importers.append(path.relative_to(package).as_posix())
    assert sorted(set(importers)) == ["_native.py"]
    public = {n for n in _core.__all__ if not n.startswith("_")}
    assert public - set(_native.__all__) == set()


def test_bad_usage_is_an_llmtally_error_raised_by_the_core() -> None:
    from llmtally.errors import BadInput, BadUsage, LlmtallyError

    assert _core.BadUsage is BadUsage
    assert issubclass(BadUsage, BadInput) and issubclass(BadUsage, ValueError)
    with pytest.raises(LlmtallyError, match="outside"):
        _core.extract_usage({"usage": {"prompt_tokens": -1}})


def _policy_action(category: type[Warning], module: str) -> str:
    """What the suite's warnings policy (pyproject's ``filterwarnings``) does with a warning of
    ``category`` attributed to ``module``: ``"error"`` or ``"shown"``."""
    import tomllib

    from _pytest.config import parse_warning_filter

    policy = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"][
        "filterwarnings"
    ]
    with warnings.catch_warnings(record=True) as seen:
        warnings.resetwarnings()
        for entry in policy:  # as pytest applies them: each later entry wins
            warnings.filterwarnings(*parse_warning_filter(entry, escape=False))
        try:
            warnings.warn_explicit("a warning", category, f"{module}.py", 1, module=module)
        except Warning:
            return "error"
    assert len(seen) == 1
    return "shown"


@pytest.mark.parametrize(
    ("category", "module", "action"),
    [
        # ours: errors, whatever the category
        (DeprecationWarning, "llmtally", "error"),
        (DeprecationWarning, "llmtally.storage.sqlite", "error"),
        (PendingDeprecationWarning, "llmtally.dispatch", "error"),
        (UserWarning, "llmtally.pricing", "error"),
        (ResourceWarning, "llmtally.storage", "error"),
        (RuntimeWarning, "asyncio.base_events", "error"),  # a coroutine never awaited
        (DeprecationWarning, "test_storage", "error"),
        (DeprecationWarning, "helpers", "error"),
        (DeprecationWarning, "bench_dispatch", "error"),
        # theirs: reported, never fatal
        (DeprecationWarning, "litellm.litellm_core_utils.streaming_handler", "shown"),
        (PendingDeprecationWarning, "langchain_core.callbacks", "shown"),
        (DeprecationWarning, "llmtally_lookalike", "shown"),
        (UserWarning, "pydantic._internal._generate_schema", "shown"),
        # a third party's other warnings stay errors until a reviewed entry says otherwise
        (UserWarning, "litellm.utils", "error"),
        (UserWarning, "pydantic.main", "error"),
    ],
)
def test_warnings_policy_fails_on_ours_not_on_theirs(
    category: type[Warning], module: str, action: str
) -> None:
    assert _policy_action(category, module) == action
