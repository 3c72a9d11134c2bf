"""The embedded store keeps up, and what the spool costs.

    pytest benches/bench_store.py --benchmark-only

B1-store: metered calls (a ``UsageRecorder``, 1,000 users) at 1,000 concurrent tasks into the
memory store, the SQLite store, and both with a spool, same run: calls/s each. The flusher
writes SQLite on its own thread meanwhile; totals are checked exact after each run.
B1-spool: the same call sequentially, memory store without and with the spool: the spool's
cost per call (one journal record written before the delta is accepted).
B5-sqlite: 1,000,000 deltas from 10,000 users drained and written to SQLite in one flush.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llmtally import CallbackManager, UsageRecorder, open_store

from harness import MESSAGES, USAGE, bench_sequential
from results import record

WORKERS, PER_WORKER = 1000, 20
USERS = [f"user-{i:05d}" for i in range(1000)]
RESPONSE = {"usage": USAGE}
CYCLE = "2026-12-01"


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def _store(tmp_path: Path, system: str) -> Any:
    url = "memory://" if system.startswith("memory") else f"sqlite:///{tmp_path}/b.db"
    spool = tmp_path / "spool" if system.endswith("+spool") else None
    return open_store(url, spool=spool)


async def _stored_calls(store: Any) -> int:
    assert await store.flush()
    total = 0
    for key in await store.usage_keys(CYCLE):
        total += (await store.read(key)).get("calls", 0)
    return total


@pytest.mark.benchmark(group="B1-store-concurrent")
@pytest.mark.parametrize("system", ["memory", "sqlite", "memory+spool", "sqlite+spool"])
def test_store_concurrent(
    benchmark: Any, loop: asyncio.AbstractEventLoop, tmp_path: Path, system: str
) -> None:
    store = _store(tmp_path, system)
    manager = CallbackManager([UsageRecorder(store=store)])

    async def call(user: str) -> None:
        async with manager.llm_call(
            MESSAGES, model="gpt-4o", user_id=user, cycle_start_date=CYCLE
        ) as c:
            await asyncio.sleep(0)  # the fake LLM
            c.set_response(RESPONSE)

    async def worker(w: int) -> None:
        user = USERS[w % len(USERS)]
        for _ in range(PER_WORKER):
            await call(user)

    async def run() -> float:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(WORKERS)))
        return time.perf_counter() - t0

    benchmark.pedantic(lambda: loop.run_until_complete(run()), rounds=5, iterations=1)
    calls = 5 * WORKERS * PER_WORKER
    assert loop.run_until_complete(_stored_calls(store)) == calls  # exact, or it means nothing
    loop.run_until_complete(store.aclose())
    per_call = benchmark.stats.stats.median / (WORKERS * PER_WORKER)
    benchmark.extra_info["calls_per_s"] = 1 / per_call
    record("B1-store-concurrent", system, per_call)


@pytest.mark.benchmark(group="B1-spool-sequential")
@pytest.mark.parametrize("system", ["memory", "memory+spool"])
def test_spool_cost_sequential(
    benchmark: Any, loop: asyncio.AbstractEventLoop, tmp_path: Path, system: str
) -> None:
    store = _store(tmp_path, system)
    manager = CallbackManager([UsageRecorder(store=store)])

    async def call() -> None:
        async with manager.llm_call(
            MESSAGES, model="gpt-4o", user_id="alice", cycle_start_date=CYCLE
        ) as c:
            c.set_response(RESPONSE)

    bench_sequential(benchmark, loop, call)
    loop.run_until_complete(store.aclose())
    record("B1-spool-sequential", system, benchmark.stats.stats.median / 1000)


@pytest.mark.benchmark(group="B5-flush-sqlite")
def test_b5_sqlite_flush_10k_users(
    benchmark: Any, loop: asyncio.AbstractEventLoop, tmp_path: Path
) -> None:
    store = open_store(f"sqlite:///{tmp_path}/flush.db", flush_interval_s=3600)
    users = [f"llmtally:{{user-{i:05d}}}:{CYCLE}" for i in range(10_000)]

    def fill() -> None:
        add = store.ledger.add
        for _ in range(100):
            for key in users:
                add(key, 21, 14, 7, 3, 0, 1, 105_000_000, 1, 0, 0)

    def run() -> None:
        assert loop.run_until_complete(store.flush())

    benchmark.pedantic(run, setup=fill, rounds=10, iterations=1)
    loop.run_until_complete(store.aclose())
    seconds = benchmark.stats.stats.median
    benchmark.extra_info["fields_per_s"] = 70_000 / seconds
    record("B5-flush-sqlite-10k-users", "llmtally-flush", seconds)
