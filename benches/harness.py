"""The shared harness of BENCHMARKS.md: the same loop for every system, so ratios mean something.

Sequential: one task makes N calls (start, a fake LLM that returns at once, end); the added cost of
a system is its per-call time minus the empty harness's, measured in the same process.
Concurrent: 1,000 worker tasks loop over calls whose fake LLM is ``await asyncio.sleep(0)``.
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

Call = Callable[[], Awaitable[None]]

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
USAGE = {"prompt_tokens": 14, "completion_tokens": 7, "total_tokens": 21}
BATCH = 1000  # sequential calls per measured round
WORKERS, PER_WORKER = 1000, 20  # the concurrent form


def llm_call(manager: Any, concurrent: bool) -> Call:
    """One ``manager.llm_call`` with the fake LLM (``await asyncio.sleep(0)`` when concurrent)."""
    response = {"usage": USAGE}
    sleep = asyncio.sleep

    async def call() -> None:
        async with manager.llm_call(MESSAGES, provider="openai", model="gpt-4o") as c:
            if concurrent:
                await sleep(0)
            c.set_response(response)

    return call


def bench_sequential(
    benchmark: Any, loop: asyncio.AbstractEventLoop, call: Call, rounds: int = 30
) -> None:
    """pytest-benchmark over rounds of ``BATCH`` sequential calls, after one warm-up round."""

    async def batch() -> None:
        for _ in range(BATCH):
            await call()

    loop.run_until_complete(batch())  # warm-up
    benchmark.pedantic(lambda: loop.run_until_complete(batch()), rounds=rounds, iterations=1)


def bench_concurrent(benchmark: Any, loop: asyncio.AbstractEventLoop, call: Call) -> None:
    """pytest-benchmark over rounds of ``WORKERS`` tasks making ``PER_WORKER`` calls each."""

    async def worker() -> None:
        for _ in range(PER_WORKER):
            await call()

    async def run() -> None:
        await asyncio.gather(*(worker() for _ in range(WORKERS)))

    benchmark.pedantic(lambda: loop.run_until_complete(run()), rounds=5, iterations=1)


def per_call_ns(loop: asyncio.AbstractEventLoop, call: Call, n: int, rounds: int) -> list[float]:
    """Per-call times (ns) of ``rounds`` batches of ``n`` sequential calls (one sample each)."""

    async def batch() -> float:
        t0 = time.perf_counter_ns()
        for _ in range(n):
            await call()
        return (time.perf_counter_ns() - t0) / n

    gc.collect()
    return [loop.run_until_complete(batch()) for _ in range(rounds)]


def calls_per_s(
    loop: asyncio.AbstractEventLoop, call: Call, workers: int = 1000, per_worker: int = 20
) -> float:
    """Calls per second with ``workers`` concurrent tasks each making ``per_worker`` calls."""

    async def worker() -> None:
        for _ in range(per_worker):
            await call()

    async def run() -> float:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(workers)))
        return workers * per_worker / (time.perf_counter() - t0)

    gc.collect()
    return loop.run_until_complete(run())


def p50(samples: list[float]) -> float:
    return statistics.median(samples)
