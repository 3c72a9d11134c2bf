"""What a BudgetLimiter adds to a metered call (issue 14), same run.

    pytest benches/bench_limits.py --benchmark-only

B9-limits-sequential: one metered call (``UsageRecorder``, 1,000 users in turn) on the memory
store, the SQLite store and a real Redis: the recorder alone (``none``), with a
``BudgetLimiter`` (``lease``: quota leases, the default) and with ``BudgetLimiter(
lease_fraction=0)`` (``per-call``: one store operation per call, what leases shrink to near
the limit). The summary prints what each adds per call over ``none``.
B9-limits-concurrent: the same at 1,000 concurrent tasks (the fake LLM is ``await
asyncio.sleep(0)``): calls/s.

``scripts/limits_latency.py`` prints the full table (p50, p99, p99 of entering a call at
1,000 concurrent, calls/s).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llmtally import CallbackManager, UsageRecorder, open_store
from llmtally.limits import BudgetLimiter

from harness import MESSAGES, USAGE
from results import record

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from servers import RedisServer

USERS = [f"user-{i:04d}" for i in range(1000)]
RESPONSE = {"usage": USAGE}
BATCH = 10_000
WORKERS, PER_WORKER = 1000, 10


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with RedisServer(name="bench-limits") as server:
        yield server.url


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def _url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if backend == "memory":
        return "memory://"
    if backend == "sqlite":
        return f"sqlite:///{tmp_path}/b.db"
    url: str = request.getfixturevalue("redis_url")
    return url


def _manager(store: Any, limiter: str) -> CallbackManager:
    handlers: list[Any] = [UsageRecorder(store=store)]
    if limiter != "none":
        fraction = 0.1 if limiter == "lease" else 0.0
        handlers.append(BudgetLimiter(max_tokens=10**11, store=store, lease_fraction=fraction))
    return CallbackManager(handlers)


def _caller(manager: CallbackManager, concurrent: bool) -> Any:
    async def call(user: str) -> None:
        async with manager.llm_call(
            MESSAGES, provider="openai", model="gpt-4o", user_id=user, estimated_tokens=40
        ) as c:
            if concurrent:
                await asyncio.sleep(0)
            c.set_response(RESPONSE)

    return call


BACKENDS = ["memory", "sqlite", "redis"]
LIMITERS = ["none", "lease", "per-call"]


@pytest.mark.benchmark(group="B9-limits-sequential")
@pytest.mark.parametrize("limiter", LIMITERS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_limiter_sequential(
    benchmark: Any,
    loop: asyncio.AbstractEventLoop,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    backend: str,
    limiter: str,
) -> None:
    store = open_store(_url(backend, tmp_path, request))
    call = _caller(_manager(store, limiter), concurrent=False)

    async def batch() -> None:
        for i in range(BATCH):
            await call(USERS[i % len(USERS)])

    loop.run_until_complete(batch())  # warm-up: every user's lease
    benchmark.pedantic(lambda: loop.run_until_complete(batch()), rounds=5, iterations=1)
    record(f"B9-limits-sequential-{backend}", limiter, benchmark.stats.stats.median / BATCH)
    loop.run_until_complete(store.aclose())


@pytest.mark.benchmark(group="B9-limits-concurrent")
@pytest.mark.parametrize("limiter", LIMITERS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_limiter_concurrent(
    benchmark: Any,
    loop: asyncio.AbstractEventLoop,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    backend: str,
    limiter: str,
) -> None:
    store = open_store(_url(backend, tmp_path, request))
    call = _caller(_manager(store, limiter), concurrent=True)

    async def worker(w: int) -> None:
        for i in range(PER_WORKER):
            await call(USERS[(w + i) % len(USERS)])

    async def run() -> float:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(WORKERS)))
        return time.perf_counter() - t0

    loop.run_until_complete(run())  # warm-up
    benchmark.pedantic(lambda: loop.run_until_complete(run()), rounds=3, iterations=1)
    per_call = benchmark.stats.stats.median / (WORKERS * PER_WORKER)
    record(f"B9-limits-concurrent-{backend}", limiter, per_call)
    loop.run_until_complete(store.aclose())
