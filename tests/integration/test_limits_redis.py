"""BudgetLimiter and RateLimiter on a real Redis and Redis Cluster: exact under concurrency, in
one process, across stores and across processes."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import sys
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from llmtally import BudgetExceeded, CallbackManager, RateLimited, UsageRecorder, open_store
from llmtally.limits import BudgetLimiter, RateLimiter
from llmtally.storage import Store
from llmtally.storage.keys import usage_key

from servers import RedisCluster, RedisServer

pytestmark = pytest.mark.redis

CYCLE = "2026-11-01"
#: Store timeout of the limiters of tests about numbers, not outages: a loaded machine may
#: take longer than the default 50 ms, and a timeout there is a (safe) offline decision.
PATIENT_S = 10.0
MESSAGES = [{"role": "user", "content": "hi"}]
DECIDED = "test:decided"
TESTS_DIR = str(Path(__file__).resolve().parent.parent)


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """The shared server's URL; its command statistics are reset afterwards, since other
    modules count round trips on the same server."""
    yield redis_server.url
    if redis_server.is_running():
        client = redis.Redis(host=redis_server.address[0], port=redis_server.address[1])
        client.config_resetstat()
        client.close()


# Runs `calls` calls against the budget in another process; passers hold until all 1000 calls
# of both processes are decided (counted in Redis), so every reservation is open at once.
CHILD = """
import asyncio, json, sys
from llmtally import open_store
from integration.test_limits_redis import race

async def main(url, calls, total):
    async with open_store(url) as store:
        passed, refused, _ = await race([store], calls, total, signal_url=url)
    print(json.dumps({"passed": passed, "refused": refused}))

asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
"""


async def race(
    stores: list[Store], calls_each: int, total: int, signal_url: str | None = None
) -> tuple[int, int, list[BudgetLimiter]]:
    """``calls_each`` calls per store, all at once; passers hold until ``total`` calls are
    decided (counted here, and in Redis at ``signal_url`` when other processes take part)."""
    limiters = [BudgetLimiter(max_tokens=1000, store=s, store_timeout_s=PATIENT_S) for s in stores]
    managers = [
        CallbackManager([lim, UsageRecorder(store=s)])
        for lim, s in zip(limiters, stores, strict=True)
    ]
    r = None
    if signal_url is not None:
        pool = aioredis.BlockingConnectionPool.from_url(signal_url, max_connections=4)
        r = aioredis.Redis(connection_pool=pool)
    counts = {"passed": 0, "refused": 0}
    all_decided = asyncio.Event()

    async def decide() -> None:
        if r is not None:
            if await r.incr(DECIDED) >= total:
                all_decided.set()
        elif counts["passed"] + counts["refused"] >= total:
            all_decided.set()

    async def watch() -> None:
        assert r is not None
        while int(await r.get(DECIDED) or 0) < total:  # noqa: ASYNC110 (other processes)
            await asyncio.sleep(0.01)
        all_decided.set()

    async def call(manager: CallbackManager) -> None:
        try:
            async with manager.llm_call(
                MESSAGES, user_id="alice", cycle_start_date=CYCLE, estimated_tokens=10
            ) as c:
                counts["passed"] += 1
                await decide()
                await all_decided.wait()
                c.set_response({"prompt_tokens": 10, "completion_tokens": 0})
        except BudgetExceeded as exc:
            counts["refused"] += 1
            assert (exc.limit, exc.used, exc.requested) == (1000, 1000, 10)
            await decide()

    watcher = None if r is None else asyncio.create_task(watch())
    async with asyncio.timeout(20):
        await asyncio.gather(*(call(m) for m in managers for _ in range(calls_each)))
    if watcher is not None:
        await watcher
    for limiter in limiters:
        await limiter.flush()
    if r is not None:
        await r.aclose()
        await pool.aclose()
    return counts["passed"], counts["refused"], limiters


async def check_stored(store: Store, limiter: BudgetLimiter) -> None:
    await store.flush()
    fields = store.backend.read(usage_key("alice", CYCLE))
    assert (fields["total_tokens"], fields["calls"], fields["reserved_tokens"]) == (1000, 100, 0)
    left = await limiter.remaining("alice", CYCLE)
    assert (left["used"], left["reserved"], left["remaining"]) == (1000, 0, 0)


async def test_1000_concurrent_calls_one_store(redis_url: str) -> None:
    async with open_store(redis_url) as store:
        passed, refused, limiters = await race([store], 1000, 1000)
        assert (passed, refused) == (100, 900)
        await check_stored(store, limiters[0])


async def test_1000_concurrent_calls_two_stores(redis_url: str) -> None:
    async with open_store(redis_url) as a, open_store(redis_url) as b:
        passed, refused, limiters = await race([a, b], 500, 1000)
        assert (passed, refused) == (100, 900)
        await check_stored(a, limiters[0])


@pytest.mark.timeout(60)
async def test_1000_concurrent_calls_two_processes(redis_url: str) -> None:
    env = {**os.environ, "PYTHONPATH": TESTS_DIR}
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CHILD,
        redis_url,
        "500",
        "1000",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    async with open_store(redis_url) as store:
        passed, refused, limiters = await race([store], 500, 1000, signal_url=redis_url)
        out, err = await asyncio.wait_for(child.communicate(), 30)
        assert child.returncode == 0, err.decode()
        theirs = json.loads(out)
        assert passed + refused == 500
        assert theirs["passed"] + theirs["refused"] == 500
        assert (passed + theirs["passed"], refused + theirs["refused"]) == (100, 900)
        await check_stored(store, limiters[0])


async def test_1000_concurrent_calls_cluster(redis_cluster: RedisCluster) -> None:
    async with open_store(redis_cluster.url) as a, open_store(redis_cluster.url) as b:
        passed, refused, limiters = await race([a, b], 500, 1000)
        assert (passed, refused) == (100, 900)
        await check_stored(a, limiters[0])


async def test_alerts_once_across_stores(redis_url: str) -> None:
    alerts: list[tuple[str, float, Any]] = []
    async with open_store(redis_url) as a, open_store(redis_url) as b:
        limiters = [
            BudgetLimiter(
                max_tokens=100,
                store=s,
                store_timeout_s=PATIENT_S,
                on_alert=lambda x, n=n: alerts.append((n, x["threshold"], x["used"])),
            )
            for n, s in (("a", a), ("b", b))
        ]
        managers = [
            CallbackManager([lim, UsageRecorder(store=s)])
            for lim, s in zip(limiters, (a, b), strict=True)
        ]
        for i in range(4):
            async with managers[i % 2].llm_call(
                MESSAGES, user_id="alice", cycle_start_date=CYCLE, estimated_tokens=25
            ) as c:
                c.set_response({"prompt_tokens": 25, "completion_tokens": 0})
            await limiters[i % 2].flush()
        for m in managers:
            with pytest.raises(BudgetExceeded):
                async with m.llm_call(
                    MESSAGES, user_id="alice", cycle_start_date=CYCLE, estimated_tokens=1
                ):
                    pass
        assert sorted(t for _, t, _ in alerts) == [0.5, 0.8, 1.0]
        fields = a.backend.read(usage_key("alice", CYCLE))
        assert (fields["alerted_tokens_500"], fields["alerted_tokens_800"]) == (1, 1)
        assert fields["alerted_tokens_1000"] == 1


async def test_reservation_of_a_dead_process_expires(redis_url: str) -> None:
    async with open_store(redis_url) as store:
        dead = BudgetLimiter(max_tokens=100, store=store, reservation_ttl_s=0.2)
        await dead.on_llm_start(
            MESSAGES, user_id="alice", cycle_start_date=CYCLE, estimated_tokens=100, run_id="x"
        )
        live = BudgetLimiter(max_tokens=100, store=store, store_timeout_s=PATIENT_S)
        with pytest.raises(BudgetExceeded):
            await live.on_llm_start(
                MESSAGES, user_id="alice", cycle_start_date=CYCLE, estimated_tokens=1, run_id="y"
            )
        gone = weakref.ref(dead)
        del dead  # the process died, its limiter with it (a live one keeps its calls covered)
        for _ in range(50):  # (the store's threads may hold it for a moment: a tick)
            gc.collect()
            if gone() is None:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)
        await live.on_llm_start(
            MESSAGES, user_id="alice", cycle_start_date=CYCLE, estimated_tokens=1, run_id="z"
        )
        left = await live.remaining("alice", CYCLE)
        assert (left["used"], left["reserved"], left["remaining"]) == (0, 1, 99)


async def test_shared_rate_limit_across_stores(redis_url: str) -> None:
    async with open_store(redis_url) as a, open_store(redis_url) as b:
        limiters = [
            RateLimiter(requests_per_minute=50, store=s, store_timeout_s=PATIENT_S) for s in (a, b)
        ]
        managers = [CallbackManager([lim]) for lim in limiters]
        results: list[str] = []

        async def call(m: CallbackManager) -> None:
            try:
                async with m.llm_call(MESSAGES, user_id="alice"):
                    results.append("ok")
            except RateLimited as exc:
                assert exc.limit == 50
                assert exc.retry_after_s is not None and 0 < exc.retry_after_s <= 60
                results.append("limited")

        await asyncio.gather(*(call(m) for m in managers for _ in range(100)))
        assert (results.count("ok"), results.count("limited")) == (50, 150)
