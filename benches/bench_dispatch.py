"""B1, first form: one LLM call (start + end) with one async counting handler.

Same run, same harness: the empty harness (the floor), llmtally's ``CallbackManager.llm_call``,
and LangChain's ``AsyncCallbackManager`` with an equivalent handler. The terminal summary prints
the added cost per call and the ratio.

    pytest benches/bench_dispatch.py --benchmark-only
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from harness import BATCH, PER_WORKER, WORKERS, bench_concurrent, bench_sequential
from peers import (
    empty_harness,
    langchain_metering_set,
    langchain_one_handler,
    llmtally_metering_set,
    llmtally_one_handler,
)
from results import record


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(params=["asyncio", "uvloop"])
def any_loop(request: pytest.FixtureRequest) -> Iterator[asyncio.AbstractEventLoop]:
    """The default loop and uvloop (skipped when uvloop is not installed)."""
    if request.param == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    yield loop
    loop.close()


SYSTEMS: dict[str, Callable[[bool], Any]] = {
    "empty": lambda concurrent: (empty_harness(concurrent), None),
    "llmtally": llmtally_one_handler,
    "langchain": langchain_one_handler,
}
# B1 proper: the metering set (seed handler on the memory store, cost, performance).
METERING: dict[str, Callable[[bool], Any]] = {
    "empty": lambda concurrent: (empty_harness(concurrent), None),
    "llmtally": llmtally_metering_set,
    "langchain": langchain_metering_set,
}


@pytest.mark.benchmark(group="B1-dispatch-sequential")
@pytest.mark.parametrize("system", list(SYSTEMS))
def test_sequential(benchmark: Any, loop: asyncio.AbstractEventLoop, system: str) -> None:
    if system == "langchain":
        pytest.importorskip("langchain_core")
    call, counter = SYSTEMS[system](False)
    bench_sequential(benchmark, loop, call)
    record("B1-sequential", system, benchmark.stats.stats.median / BATCH)
    if counter is not None:
        assert counter.tokens == 21 * counter.calls  # every call counted, exactly


@pytest.mark.benchmark(group="B1-dispatch-concurrent")
@pytest.mark.parametrize("system", list(SYSTEMS))
def test_concurrent(benchmark: Any, loop: asyncio.AbstractEventLoop, system: str) -> None:
    if system == "langchain":
        pytest.importorskip("langchain_core")
    call, counter = SYSTEMS[system](True)
    bench_concurrent(benchmark, loop, call)
    record("B1-concurrent", system, benchmark.stats.stats.median / (WORKERS * PER_WORKER))
    if counter is not None:
        assert counter.calls == 5 * WORKERS * PER_WORKER


@pytest.mark.benchmark(group="B1-metering-sequential")
@pytest.mark.parametrize("system", list(METERING))
def test_metering_set_sequential(
    benchmark: Any, loop: asyncio.AbstractEventLoop, system: str
) -> None:
    if system == "langchain":
        pytest.importorskip("langchain_core")
    call, counter = METERING[system](False)
    bench_sequential(benchmark, loop, call)
    record("B1-metering-sequential", system, benchmark.stats.stats.median / BATCH)
    if counter is not None:
        assert counter.tokens == 21 * counter.calls


@pytest.mark.benchmark(group="B1-metering-concurrent")
@pytest.mark.parametrize("system", list(METERING))
def test_metering_set_concurrent(
    benchmark: Any, any_loop: asyncio.AbstractEventLoop, system: str
) -> None:
    if system == "langchain":
        pytest.importorskip("langchain_core")
    call, counter = METERING[system](True)
    bench_concurrent(benchmark, any_loop, call)
    loop_name = "uvloop" if type(any_loop).__module__.startswith("uvloop") else "asyncio"
    record(
        f"B1-metering-concurrent-{loop_name}",
        system,
        benchmark.stats.stats.median / (WORKERS * PER_WORKER),
    )
    if counter is not None:
        assert counter.calls == 5 * WORKERS * PER_WORKER


@pytest.mark.benchmark(group="B1-metering-sequential")
def test_metering_set_sequential_with_prometheus(
    benchmark: Any, loop: asyncio.AbstractEventLoop
) -> None:
    """The metering set with Prometheus metrics on (every handler execution timed and counted,
    usage per provider, model and user), recorded as its own system next to the others."""
    prometheus_client = pytest.importorskip("prometheus_client")
    from llmtally.metrics import disable_metrics, enable_metrics

    registry = prometheus_client.CollectorRegistry()
    enable_metrics(registry)
    try:
        call, counter = llmtally_metering_set(False)
        bench_sequential(benchmark, loop, call)
        executions = registry.get_sample_value(
            "llmtally_callback_executions_total",
            {"callback_type": "CostTracker", "status": "success"},
        )
    finally:
        disable_metrics(registry)
    record("B1-metering-sequential", "llmtally+prometheus", benchmark.stats.stats.median / BATCH)
    assert counter.tokens == 21 * counter.calls
    assert executions is not None and executions >= counter.calls
