"""Static checks that CI must keep green: mypy --strict, ruff, rustfmt, the native stub."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
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


def test_native_stub_matches_the_module() -> None:
    stub = ast.parse((ROOT / "python/llmtally/_core.pyi").read_text())
    declared: set[str] = set()
    for node in stub.body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            declared.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            declared.add(node.target.id)
    public = {name for name in dir(_core) if not name.startswith("_")} | {"__version__"}
    assert {n for n in declared if not n.startswith("_")} | {"__version__"} == public
    assert all(hasattr(_core, name) for name in declared)
