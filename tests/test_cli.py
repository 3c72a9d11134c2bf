"""The llmtally command, run as a user would run it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

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
    rows = re.findall(r"^\s+(demo-user-\d{3})\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", out, re.M)
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
        return [line for line in text.splitlines() if line.strip().startswith(("demo-", "all"))]

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


def test_demo_writes_to_the_default_store_and_usage_reads_it_back(tmp_path: Path) -> None:
    result = run("demo", "--calls", "400", "--users", "5", "--seed", "11")
    assert result.returncode == 0, result.stderr
    assert "store check: the 5 users' totals in the store grew by exactly" in result.stdout
    assert (tmp_path.parent / "xdg0" / "llmtally" / "usage.db").exists() or any(
        p.name == "usage.db" for p in Path(os.environ["XDG_DATA_HOME"]).rglob("usage.db")
    )
    totals = re.search(r"^\s+all\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", result.stdout, re.M)
    assert totals is not None
    calls, errors, _, _, total = map(int, totals.groups())
    listed = run("usage", "--json")
    assert listed.returncode == 0, listed.stderr
    records = json.loads(listed.stdout)
    assert {r["user_id"] for r in records} == {f"demo-user-{i:03d}" for i in range(5)}
    assert sum(r["total_tokens"] for r in records) == total
    assert sum(r["calls"] for r in records) == calls
    assert sum(r["errors"] for r in records) == errors
    for record in records:
        assert {"total_tokens", "prompt_tokens", "cost_usd", "calls", "errors", "limit"} <= set(
            record
        )
    # A second run adds to the same store.
    assert run("demo", "--calls", "400", "--users", "5", "--seed", "11").returncode == 0
    again = json.loads(run("usage", "--json").stdout)
    assert sum(r["total_tokens"] for r in again) == 2 * total


def test_usage_limit_and_export_commands(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path}/cli.db"
    assert run("demo", "--calls", "200", "--users", "3", "--store", store).returncode == 0
    table = run("usage", "--store", store)
    assert table.returncode == 0 and "demo-user-000" in table.stdout
    one = json.loads(run("usage", "demo-user-001", "--json", "--store", store).stdout)
    assert len(one) == 1 and one[0]["user_id"] == "demo-user-001"
    set_ = run("limit", "set", "demo-user-001", "5000", "--json", "--store", store)
    assert set_.returncode == 0, set_.stderr
    check = json.loads(set_.stdout)
    assert check["limit"] == 5000 and check["used"] == one[0]["total_tokens"]
    got = json.loads(run("limit", "get", "demo-user-001", "--json", "--store", store).stdout)
    assert got["limit"] == 5000
    assert (
        json.loads(run("limit", "set", "demo-user-001", "none", "--json", "--store", store).stdout)[
            "limit"
        ]
        is None
    )
    csv_out = run("export", "--format", "csv", "--store", store)
    lines = csv_out.stdout.strip().splitlines()
    assert lines[0].startswith("user_id,cycle_start_date,total_tokens")
    assert len(lines) == 4
    exported = json.loads(run("export", "--format", "json", "--store", store).stdout)
    assert len(exported) == 3


@pytest.mark.parametrize(
    "args",
    [
        ["usage", "--store", "bogus"],
        ["usage", "--cycle", "2026-02-30"],
        ["limit", "set", "alice", "-5"],
        ["limit", "frob", "alice"],
        ["export", "--format", "xml"],
    ],
)
def test_store_commands_reject_bad_arguments_in_one_line(args: list[str]) -> None:
    result = run(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmtally: error:")


def test_bench_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--quick"]) == 0
    out = capsys.readouterr().out
    row = re.search(r"^\s+llmtally\s+([\d.]+)\s+([\d,]+)$", out, re.M)
    assert row is not None
    assert float(row.group(1)) > 0 and int(row.group(2).replace(",", "")) > 0
    assert re.search(r"^\s+empty\s+[\d,]+$", out, re.M)


HOSTILE = [
    "lone-\ud800-surrogate",
    "red-\x1b[31m-alert",
    "forged\n  mallory  2026-12-01",
    "back\\slash",
]


def test_stored_ids_are_printed_safely_and_exported_faithfully(tmp_path: Path) -> None:
    """Ids with a lone surrogate, terminal escapes or newlines: no traceback, no raw control
    character on the operator's terminal, no forged row; JSON keeps them exactly."""
    import asyncio

    import llmtally

    url = f"sqlite:///{tmp_path}/hostile.db"

    async def seed() -> None:
        repo = llmtally.TokenUsageRepository(store=url)
        for user in [*HOSTILE, "plain"]:
            await repo.increment_detailed_usage(user, 3, 2, "2026-12-01")
        await repo.store.aclose()

    asyncio.run(seed())
    table = run("usage", "--cycle", "2026-12-01", "--store", url)
    assert table.returncode == 0, table.stderr
    assert "\x1b" not in table.stdout and "\ud800" not in table.stdout
    rows = [line for line in table.stdout.splitlines() if "2026-12-01" in line]
    assert len(rows) == 5  # one per user: the newline forged none
    assert any("red-\\x1b[31m-alert" in row for row in rows)
    assert any("lone-\\ud800-surrogate" in row for row in rows)
    csv_out = run("export", "--format", "csv", "--cycle", "2026-12-01", "--store", url)
    assert csv_out.returncode == 0, csv_out.stderr
    assert len(csv_out.stdout.strip().splitlines()) == 6
    assert "back\\\\slash" in csv_out.stdout
    exported = json.loads(
        run("export", "--format", "json", "--cycle", "2026-12-01", "--store", url).stdout
    )
    assert sorted(r["user_id"] for r in exported) == sorted([*HOSTILE, "plain"])


def _unescape(text: str) -> str:
    """The inverse of the CLI's escaping of stored ids."""
    return re.sub(
        r"\\(\\|x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8})",
        lambda m: "\\" if m.group(1) == "\\" else chr(int(m.group(1)[1:], 16)),
        text,
    )


def test_stored_ids_are_escaped_reversibly_whole_and_in_valid_utf8(tmp_path: Path) -> None:
    import asyncio
    import csv
    import io

    import llmtally

    url = f"sqlite:///{tmp_path}/hostile.db"
    long_a, long_b = "a" * 30 + "-one", "a" * 30 + "-two"  # the same first 24 characters
    users = [*HOSTILE, long_a, long_b, "tab\there", r"looks\u0041escaped\x1b", "\u202e-bidi"]

    async def seed() -> None:
        repo = llmtally.TokenUsageRepository(store=url)
        for user in users:
            await repo.increment_detailed_usage(user, 3, 2, "2026-12-01")
        await repo.store.aclose()

    asyncio.run(seed())
    table = run("usage", "--cycle", "2026-12-01", "--store", url)
    shown = {line.split()[0] for line in table.stdout.splitlines() if "2026-12-01" in line}
    assert long_a in shown and long_b in shown  # whole, not cut to the column
    csv_bytes = subprocess.run(
        [sys.executable, "-m", "llmtally.cli", "export", "--format", "csv", "--cycle",
         "2026-12-01", "--store", url],
        capture_output=True,
        timeout=120,
        check=True,
    ).stdout  # fmt: skip
    text = csv_bytes.decode("utf-8")  # strict: valid UTF-8
    assert "\x1b" not in text
    rows = list(csv.DictReader(io.StringIO(text)))
    assert sorted(_unescape(r["user_id"]) for r in rows) == sorted(users)
    # A terminal that cannot encode a character: an escape, no traceback.
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    ascii_run = subprocess.run(
        [sys.executable, "-m", "llmtally.cli", "usage", "--cycle", "2026-12-01", "--store", url],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert ascii_run.returncode == 0, ascii_run.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["usage", "--store", "redis+cluster://127.0.0.1:1"],
        ["usage", "--store", "redis://127.0.0.1:1"],
        ["export", "--format", "csv", "--store", "redis+cluster://127.0.0.1:1"],
        ["limit", "get", "bob", "--store", "redis+cluster://127.0.0.1:1"],
        ["limit", "set", "bob", "5", "--store", "redis://127.0.0.1:1/0"],
        ["usage", "--store", "unix:///nonexistent/llmtally.sock"],
    ],
)
def test_an_unreachable_store_is_one_line_and_exit_1(args: list[str]) -> None:
    """Nothing listens on loopback port 1: one line on stderr, exit 1, at once."""
    result = subprocess.run(
        [sys.executable, "-m", "llmtally.cli", *args],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmtally: error:")
    assert "Traceback" not in result.stderr and result.stdout == ""


@pytest.mark.parametrize("calls", [str(10**20), "1000001", "0", "-5", "1e9", "x" * 10_000])
def test_demo_refuses_an_absurd_number_of_calls(calls: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "llmtally.cli", "demo", "--calls", calls],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmtally: error:")
    if calls in (str(10**20), "1000001"):
        assert "more than 1,000,000" in lines[0]
