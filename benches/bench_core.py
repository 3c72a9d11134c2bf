"""The Rust pieces next to their pure-Python equivalents, same run (each must win).

pytest benches/bench_core.py --benchmark-only
"""

from __future__ import annotations

from typing import Any

import pytest

from llmtally import _core
from pure_python import PyHistogram, PyLedger, PyPrices, lua_chunks

from results import record

KEYS = [f"llmtally:{{user-{i}}}:2026-11-01" for i in range(1000)]
OPS = 10_000


@pytest.mark.benchmark(group="core-ledger-add")
@pytest.mark.parametrize("impl", ["rust", "python"])
def test_ledger_add(benchmark: Any, impl: str) -> None:
    ledger: Any = _core.Ledger() if impl == "rust" else PyLedger()
    add = ledger.add

    def run() -> None:
        for i in range(OPS):
            add(KEYS[i % 1000], 21, 14, 7, 0, 0, 0, 105_000_000, 1, 0, 0)

    benchmark.pedantic(run, rounds=20, iterations=1)
    record("core-ledger-add", impl, benchmark.stats.stats.median / OPS)


@pytest.mark.benchmark(group="core-ledger-drain")
@pytest.mark.parametrize("impl", ["rust", "python"])
def test_ledger_drain_to_store_args(benchmark: Any, impl: str) -> None:
    """Drain 10,000 keys and turn them into the flat argument list of one store write."""
    ledger: Any = _core.Ledger() if impl == "rust" else PyLedger()

    def setup() -> None:
        for i in range(10_000):
            ledger.add(f"user-{i}", 21, 14, 7, 0, 0, 0, 1, 1, 0, 0)

    def run() -> Any:
        if impl == "rust":
            return ledger.drain().lua_chunks(512, False)
        return lua_chunks(ledger.drain())

    benchmark.pedantic(run, setup=setup, rounds=20, iterations=1)
    record("core-ledger-drain-10k-keys", impl, benchmark.stats.stats.median)


@pytest.mark.benchmark(group="core-histogram")
@pytest.mark.parametrize("impl", ["rust", "python"])
def test_histogram_record_and_p99(benchmark: Any, impl: str) -> None:
    values = [0.5 + (i * 7919 % 10_000) / 10 for i in range(OPS)]

    def run() -> Any:
        h: Any = _core.Histogram() if impl == "rust" else PyHistogram()
        record_ = h.record
        for v in values:
            record_(v)
        return h.percentile(99)

    benchmark.pedantic(run, rounds=20, iterations=1)
    record("core-histogram-record", impl, benchmark.stats.stats.median / OPS)


@pytest.mark.benchmark(group="core-cost")
@pytest.mark.parametrize("impl", ["rust", "python"])
def test_cost_of_a_usage(benchmark: Any, impl: str) -> None:
    """Cost of one normalized usage record (cached and reasoning tokens included)."""
    usages = [
        _core.Usage(
            prompt_tokens=1200 + i, completion_tokens=300, cached_tokens=1024, reasoning_tokens=256
        )
        for i in range(7)
    ]
    if impl == "rust":
        cost = _core.Prices(2.5, 10.0, 1.25).usage_cost_pusd
    else:
        cost = PyPrices(2.5, 10.0, 1.25).usage_cost_pusd

    def run() -> None:
        for i in range(OPS):
            cost(usages[i % 7])

    benchmark.pedantic(run, rounds=20, iterations=1)
    record("core-cost", impl, benchmark.stats.stats.median / OPS)
