"""Usage in real Redis and a real Redis Cluster: exact under load, outages and lost replies."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

from llmtally import (
    CallbackManager,
    RedisTokenCallbackHandler,
    TokenUsageRepository,
    UsageRecorder,
    open_store,
)
from llmtally.storage import Store
from llmtally.storage.keys import usage_key

from servers import RedisCluster, RedisServer, ReplyDroppingProxy

pytestmark = pytest.mark.redis

CYCLE = "2026-11-01"
MESSAGES = [{"role": "user", "content": "hi"}]


async def run_calls(
    store: Store, users: list[str], calls: int, concurrency: int = 1000, seed: int = 1
) -> dict[str, list[int]]:
    """``calls`` metered LLM calls from ``users``, ``concurrency`` at once; returns the expected
    per-user [total, prompt, completion, cached, calls, errors]."""
    rng = random.Random(seed)
    plan = [(rng.choice(users), rng.randint(1, 500), rng.randint(1, 200)) for _ in range(calls)]
    expected: dict[str, list[int]] = {u: [0, 0, 0, 0, 0, 0] for u in users}
    manager = CallbackManager([UsageRecorder(store=store)])
    queue = iter(enumerate(plan))

    async def worker() -> None:
        for i, (user, prompt, completion) in queue:
            e = expected[user]
            if i % 50 == 49:
                with pytest.raises(ConnectionError):
                    async with manager.llm_call(MESSAGES, user_id=user, cycle_start_date=CYCLE):
                        await asyncio.sleep(0)
                        raise ConnectionError("provider down")
                e[5] += 1
                continue
            cached = prompt // 2
            async with manager.llm_call(MESSAGES, user_id=user, cycle_start_date=CYCLE) as call:
                await asyncio.sleep(0)
                call.set_response(
                    {
                        "usage": {
                            "prompt_tokens": prompt,
                            "completion_tokens": completion,
                            "prompt_tokens_details": {"cached_tokens": cached},
                        }
                    }
                )
            e[0] += prompt + completion
            e[1] += prompt
            e[2] += completion
            e[3] += cached
            e[4] += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return expected


async def hashes(client: Any, users: list[str]) -> dict[str, list[int]]:
    out = {}
    for user in users:
        raw = await client.hgetall(usage_key(user, CYCLE))
        out[user] = [
            int(raw.get(f, 0))
            for f in (
                "total_tokens",
                "prompt_tokens",
                "completion_tokens",
                "cached_tokens",
                "calls",
                "errors",
            )
        ]
    return out


def merge(*parts: dict[str, list[int]]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for part in parts:
        for user, counts in part.items():
            acc = out.setdefault(user, [0] * len(counts))
            for i, v in enumerate(counts):
                acc[i] += v
    return out


USERS = [f"user-{i:03d}" for i in range(300)] + ["a}b", "ünï cödé", "x" * 1024, "new\nline"]


async def test_thousands_of_concurrent_calls_from_hundreds_of_users(redis_url: str) -> None:
    admin = aioredis.from_url(redis_url)
    await admin.config_resetstat()  # count this test's script calls only
    await admin.aclose()
    store = open_store(redis_url)
    expected = await run_calls(store, USERS, 20_000)
    assert await store.aclose() is True
    client = aioredis.from_url(redis_url, decode_responses=True)
    try:
        assert await hashes(client, USERS) == expected
        raw = await client.hgetall(usage_key("user-000", CYCLE))
        assert set(raw) <= {
            "total_tokens",
            "prompt_tokens",
            "completion_tokens",
            "cached_tokens",
            "calls",
            "errors",
        }
        # Batched: one script call per flush and chunk, not one round trip per LLM call.
        stats = await client.info("commandstats")
        evalsha = stats.get("cmdstat_evalsha", {}).get("calls", 0)
        assert 0 < evalsha < 20_000 / 100
    finally:
        await client.aclose()


async def test_server_stopped_mid_run_and_restarted(fresh_redis_server: RedisServer) -> None:
    url = fresh_redis_server.url
    store = open_store(url, flush_interval_s=0.01)
    users = USERS[:50]
    first = await run_calls(store, users, 3000, seed=2)
    await store.flush()
    fresh_redis_server.stop()
    during = await run_calls(store, users, 3000, seed=3)  # no call raises while Redis is down
    assert await store.flush() is False
    health = await store.health()
    assert health["ok"] is False and health["pending_deltas"] > 0
    fresh_redis_server.restart()
    fresh_redis_server_data_lost = True  # the test server keeps no data across restarts
    after = await run_calls(store, users, 3000, seed=4)
    assert await store.aclose() is True
    client = aioredis.from_url(url, decode_responses=True)
    try:
        got = await hashes(client, users)
    finally:
        await client.aclose()
    if fresh_redis_server_data_lost:
        # What was written before the stop went with the server's memory; everything kept in
        # process during the outage and after it arrived exactly once.
        assert got == merge(during, after)
    assert sum(v[4] for v in first.values()) > 0


async def test_persistent_server_restart_keeps_every_count(tmp_path: Any) -> None:
    with RedisServer(persist=True) as server:
        store = open_store(server.url, flush_interval_s=0.01)
        users = USERS[:40]
        first = await run_calls(store, users, 2000, seed=5)
        server.stop()
        during = await run_calls(store, users, 2000, seed=6)
        server.restart()
        after = await run_calls(store, users, 2000, seed=7)
        assert await store.aclose() is True
        client = aioredis.from_url(server.url, decode_responses=True)
        try:
            assert await hashes(client, users) == merge(first, during, after)
        finally:
            await client.aclose()


async def test_lost_replies_never_double_count(
    reply_dropping_proxy: ReplyDroppingProxy, redis_server: RedisServer
) -> None:
    store = open_store(reply_dropping_proxy.url, flush_interval_s=3600)
    users = USERS[:20]
    expected = await run_calls(store, users, 1000, seed=8)
    reply_dropping_proxy.drop_replies = True
    assert await store.flush() is False  # the server applied the batch; its reply was lost
    reply_dropping_proxy.drop_replies = False
    assert reply_dropping_proxy.replies_dropped >= 1
    more = await run_calls(store, users, 1000, seed=9)
    assert await store.aclose() is True
    client = aioredis.from_url(redis_server.url, decode_responses=True)
    try:
        assert await hashes(client, users) == merge(expected, more)
    finally:
        await client.aclose()


async def test_two_stores_share_one_redis(redis_url: str) -> None:
    a, b = open_store(redis_url), open_store(redis_url)
    users = USERS[:100]
    ea, eb = await asyncio.gather(
        run_calls(a, users, 5000, seed=10), run_calls(b, users, 5000, seed=11)
    )
    assert await a.aclose() and await b.aclose()
    client = aioredis.from_url(redis_url, decode_responses=True)
    try:
        assert await hashes(client, users) == merge(ea, eb)
    finally:
        await client.aclose()


async def test_seed_handler_and_repository_on_redis(redis_url: str) -> None:
    store = open_store(redis_url, flush_interval_s=3600)
    handler = RedisTokenCallbackHandler("alice", CYCLE, store=store)
    manager = CallbackManager([handler])
    async with manager.llm_call(MESSAGES) as call:
        call.set_response({"prompt_tokens": 7, "completion_tokens": 3, "cost_estimate": 0.5})
    repo = TokenUsageRepository(store)
    await repo.set_usage_limit("alice", 1000, CYCLE)
    s = await repo.get_usage_stats("alice", CYCLE)
    assert (s["total_tokens"], s["cost_usd"], s["limit"], s["calls"]) == (10, 0.5, 1000, 1)
    await store.flush()
    client = aioredis.from_url(redis_url, decode_responses=True)
    try:
        assert await client.hgetall("llmtally:{alice}:2026-11-01") == {
            "total_tokens": "10",
            "prompt_tokens": "7",
            "completion_tokens": "3",
            "cost_pusd": "500000000000",
            "calls": "1",
            "limit": "1000",
        }
        await repo.reset_usage("alice", CYCLE)
        assert await client.hgetall("llmtally:{alice}:2026-11-01") == {"limit": "1000"}
    finally:
        await client.aclose()
    assert [r["user_id"] for r in await repo.list_usage(CYCLE)] == ["alice"]
    await store.aclose()


async def test_cluster_exact_under_load_with_two_stores(redis_cluster: RedisCluster) -> None:
    a, b = open_store(redis_cluster.url), open_store(redis_cluster.url)
    assert a.backend.name == "redis-cluster"
    users = USERS
    ea, eb = await asyncio.gather(
        run_calls(a, users, 8000, seed=12), run_calls(b, users, 8000, seed=13)
    )
    assert await a.aclose() and await b.aclose()
    host, port = redis_cluster.startup_nodes[0]
    client = AsyncRedisCluster(startup_nodes=[ClusterNode(host, port)], decode_responses=True)
    try:
        assert await hashes(client, users) == merge(ea, eb)
    finally:
        await client.aclose()
    repo = TokenUsageRepository(open_store(redis_cluster.url))
    listed = {r["user_id"] for r in await repo.list_usage(CYCLE)}
    assert listed == set(users)
    await repo.store.aclose()
