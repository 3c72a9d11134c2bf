import os
import sys
from pathlib import Path

# The suites measure llmtally as installed without the [prometheus] extra (metrics off), even
# where prometheus_client is installed; bench_dispatch also measures the metering set with
# Prometheus metrics on, as its own line.
os.environ.setdefault("LLMTALLY_METRICS", "0")
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from results import summary


def pytest_collection_modifyitems(items: list[Any]) -> None:
    import pytest

    for item in items:  # whole suites run longer than a unit test's 30 s budget
        item.add_marker(pytest.mark.timeout(900))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    lines = summary()
    if lines:
        terminalreporter.section("llmtally ratios (same run)")
        for line in lines:
            terminalreporter.write_line(line)
