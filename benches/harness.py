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

Call = Callable[[], Awaitable[None]]

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
USAGE = {"prompt_tokens": 14, "completion_tokens": 7, "total_tokens": 21}


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
