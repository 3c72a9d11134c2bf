"""B6: memory. RSS over 1,000,000 metered calls from 10,000 users (flat once the users are
known), and bytes per active user in the ledger.

    pytest benches/bench_memory.py --benchmark-only -s
"""

from __future__ import annotations

import asyncio
import gc
import resource
from typing import Any

import pytest

from llmtally import CallbackManager, UsageRecorder, open_store
from llmtally._core import Ledger

from results import record

MESSAGES = [{"role": "user", "content": "hi"}]
RESPONSE = {"usage": {"prompt_tokens": 14, "completion_tokens": 7}}


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


@pytest.mark.benchmark(group="B6-memory")
def test_rss_is_flat_over_a_million_calls(benchmark: Any) -> None:
    users = [f"user-{i:05d}" for i in range(10_000)]
    loop = asyncio.new_event_loop()
    store = open_store("memory://", flush_interval_s=0.05)
    manager = CallbackManager([UsageRecorder(store=store)])

    async def calls(n: int) -> None:
        for i in range(n):
            async with manager.llm_call(MESSAGES, user_id=users[i % 10_000]) as c:
                c.set_response(RESPONSE)
            if i % 1000 == 999:
                await asyncio.sleep(0)  # let the flusher run

    loop.run_until_complete(calls(200_000))  # warm-up: every user known
    gc.collect()
    before = _rss_kib()
    benchmark.pedantic(lambda: loop.run_until_complete(calls(1_000_000)), rounds=1, iterations=1)
    gc.collect()
    after = _rss_kib()
    loop.run_until_complete(store.aclose())
    loop.close()
    growth = after - before
    benchmark.extra_info["rss_growth_kib"] = growth
    print(f"\nB6: RSS {before} KiB -> {after} KiB over 1,000,000 calls ({growth:+d} KiB)")
    record("B6-rss-growth-kib", "llmtally", growth / 1e6)


@pytest.mark.benchmark(group="B6-memory")
def test_bytes_per_active_user_in_the_ledger(benchmark: Any) -> None:
    gc.collect()
    ledger = Ledger()
    keys = [f"llmtally:{{user-{i:06d}}}:2026-11-01" for i in range(200_000)]
    before = _rss_kib()

    def fill() -> None:
        for key in keys:
            ledger.add(key, 21, 14, 7, 0, 0, 0, 1, 1, 0, 0)

    benchmark.pedantic(fill, rounds=1, iterations=1)
    after = _rss_kib()
    per_user = (after - before) * 1024 / len(keys)
    benchmark.extra_info["bytes_per_user"] = per_user
    print(f"\nB6: {per_user:.0f} bytes per active user in the ledger (200,000 keys)")
    record("B6-bytes-per-user", "llmtally", per_user / 1e6)
