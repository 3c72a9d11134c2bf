"""The llmtally command, run as a user would run it."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from llmtally.cli import main


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llmtally.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_demo_runs_and_prints_the_per_user_table() -> None:
    result = run("demo", "--calls", "600", "--users", "12", "--concurrency", "100")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "600 simulated LLM calls from 12 users" in out
    rows = re.findall(r"^\s+(user-\d{3})\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", out, re.M)
    assert len(rows) == 10  # the top 10 of 12 users
    totals = re.search(r"^\s+all\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", out, re.M)
    assert totals is not None
    calls, errors, prompt, completion, total, _ = map(int, totals.groups())
    assert calls + errors == 600  # every simulated call ended exactly once
    assert prompt + completion == total > 0
    assert "handler failures isolated" in out
    assert re.search(r"overhead [\d.]+ us per call", out)


def test_demo_is_deterministic_for_a_seed(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["demo", "--calls", "300", "--users", "5", "--seed", "3", "--all-users"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    second = capsys.readouterr().out

    def table(text: str) -> list[str]:
        return [line for line in text.splitlines() if line.strip().startswith(("user-", "all"))]

    assert table(first) == table(second)
    assert len(table(first)) == 6


@pytest.mark.parametrize(
    "args",
    [["frobnicate"], ["demo", "--calls", "zero"], ["demo", "--calls", "0"], ["demo", "--bogus"]],
)
def test_bad_usage_prints_one_line_and_exits_2(args: list[str]) -> None:
    result = run(*args)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmtally: error:")


def test_no_command_prints_help_and_exits_2() -> None:
    result = run()
    assert result.returncode == 2
    assert "demo" in result.stdout
