"""What a BudgetLimiter adds to a metered LLM call, on each store: a latency table.

Rows: a ``UsageRecorder`` alone (the reference), with a ``BudgetLimiter`` (quota leases, the
default), and with a ``BudgetLimiter(lease_fraction=0)`` (a store operation on every call: the
per-call path leases shrink to near the limit). Columns: sequential p50 / p99 of one call
(start, a fake LLM that returns at once, end); among 1,000 concurrent tasks (the fake LLM is
``await asyncio.sleep(0)``), p50 / p99 of entering the call (``llm_call``'s start: where a
limiter waits) and calls/s; and what the limiter adds to the sequential p50 and to the p99 of
entering at 1,000 concurrent.
Calls go to 1,000 users in turn, each with a budget far from its limit.

    python scripts/limits_latency.py [--redis redis://127.0.0.1:6379/0] [--calls 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("LLMTALLY_METRICS", "0")  # as in benches/: metrics off

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
RESPONSE = {"usage": {"prompt_tokens": 14, "completion_tokens": 7, "total_tokens": 21}}
USERS = [f"user{i}" for i in range(1000)]
WORKERS = 1000


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(manager: Any, calls: int) -> dict[str, float]:
    clock = time.perf_counter_ns
    sleep = asyncio.sleep

    entering: list[float] = []

    async def one(user: str, concurrent: bool) -> float:
        t0 = clock()
        async with manager.llm_call(
            MESSAGES, provider="openai", model="gpt-4o", user_id=user, estimated_tokens=40
        ) as c:
            if concurrent:
                entering.append((clock() - t0) / 1000)
                await sleep(0)
            c.set_response(RESPONSE)
        return (clock() - t0) / 1000

    for i in range(2000):  # warm-up: every user's first lease
        await one(USERS[i % len(USERS)], False)
    gc.collect()
    sequential = [await one(USERS[i % len(USERS)], False) for i in range(calls)]
    concurrent: list[float] = []

    async def worker(w: int) -> None:
        for i in range(calls // WORKERS):
            took = await one(USERS[(w + i) % len(USERS)], True)
            concurrent.append(took)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(WORKERS)))
    rate = len(concurrent) / (time.perf_counter() - t0)
    return {
        "p50": statistics.median(sequential),
        "p99": _pct(sequential, 0.99),
        "c50": statistics.median(concurrent),
        "c99": _pct(concurrent, 0.99),
        "e50": statistics.median(entering),
        "e99": _pct(entering, 0.99),
        "rate": rate,
    }


async def run_store(name: str, url: str, calls: int) -> list[str]:
    from llmtally import CallbackManager, UsageRecorder, open_store
    from llmtally.limits import BudgetLimiter

    rows = []
    base: dict[str, float] | None = None
    for label, fraction in (
        ("recorder only", None),
        ("+ BudgetLimiter", 0.1),
        ("+ BudgetLimiter, per call", 0.0),
    ):
        async with open_store(url) as store:
            handlers: list[Any] = [UsageRecorder(store=store)]
            if fraction is not None:
                handlers.append(
                    BudgetLimiter(max_tokens=10**11, store=store, lease_fraction=fraction)
                )
            result = await measure(CallbackManager(handlers), calls)
        if base is None:
            base = result
        added = result["p50"] - base["p50"]
        added99 = result["e99"] - base["e99"]
        rows.append(
            f"| {name} | {label} | {result['p50']:.1f} | {result['p99']:.1f} | "
            f"{result['e50']:.1f} | {result['e99']:.1f} | {result['rate']:,.0f} | "
            f"{added:+.1f} | {added99:+.1f} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--redis", default=None)
    parser.add_argument("--calls", type=int, default=20_000)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    stores = {"memory": "memory://", "sqlite": f"sqlite:///{tmp}/usage.db"}
    if args.redis:
        stores["redis"] = args.redis
    print(
        "| store | handlers | p50 us | p99 us | enter p50 us (1k conc.) | "
        "enter p99 us (1k conc.) | calls/s (1k conc.) | added p50 us | added enter p99 us |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, url in stores.items():
        for row in asyncio.run(run_store(name, url, args.calls)):
            print(row, flush=True)


if __name__ == "__main__":
    main()
