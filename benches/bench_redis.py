"""B2 (the Redis path) and B5 (flush throughput), against a real server started here.

    pytest benches/bench_redis.py --benchmark-only

B2: metered LLM calls at 1,000 concurrent into one Redis, next to the same calls into the memory
store and a seed-style handler doing one awaited HINCRBY per call (the naive design), same run;
Redis round trips per call from the server's own command counters.
B5: 1,000,000 deltas from 10,000 users drained and written in one flush, next to a bare loop
sending the same EVALSHA batches without llmtally in between.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from results import record

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import redis.asyncio as aioredis

from llmtally import CallbackManager, UsageRecorder, open_store
from llmtally.storage.keys import marker_key
from llmtally.storage.redis import APPLY_LUA, CHUNK_KEYS, MARKER_TTL_S

from servers import RedisServer, find_server_binary

WORKERS, PER_WORKER = 1000, 20
USERS = [f"user-{i:05d}" for i in range(1000)]
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
RESPONSE = {"usage": {"prompt_tokens": 14, "completion_tokens": 7, "total_tokens": 21}}


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    try:
        find_server_binary()
    except Exception as exc:  # no server binary: nothing to measure
        pytest.skip(f"no Redis-protocol server: {exc}")
    with RedisServer() as s:
        yield s


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def _concurrent(loop: asyncio.AbstractEventLoop, call: Any) -> float:
    async def worker(w: int) -> None:
        user = USERS[w % len(USERS)]
        for _ in range(PER_WORKER):
            await call(user)

    async def run() -> float:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(WORKERS)))
        return time.perf_counter() - t0

    return loop.run_until_complete(run())


@pytest.mark.benchmark(group="B2-redis-concurrent")
@pytest.mark.parametrize("system", ["llmtally-memory", "llmtally-redis", "naive-hincrby"])
def test_b2_calls_per_second(
    benchmark: Any, loop: asyncio.AbstractEventLoop, server: RedisServer, system: str
) -> None:
    server.flushall()
    calls = WORKERS * PER_WORKER
    if system == "naive-hincrby":
        # The seed's design done right: one awaited HINCRBY per call on a bounded pool that waits
        # for a free connection (a pool that fails fast loses most counts under this load).
        pool = aioredis.BlockingConnectionPool.from_url(server.url, max_connections=50)
        client = aioredis.Redis(connection_pool=pool)

        async def call(user: str) -> None:
            await asyncio.sleep(0)  # the fake LLM
            await client.hincrby(f"usage:{{{user}}}", "total_tokens", 21)

        async def closer() -> None:
            await client.aclose()
            await pool.disconnect()

        store = None
    else:
        store = open_store("memory://" if system == "llmtally-memory" else server.url)
        manager = CallbackManager([UsageRecorder(store=store)])

        async def call(user: str) -> None:
            async with manager.llm_call(MESSAGES, model="gpt-4o", user_id=user) as c:
                await asyncio.sleep(0)  # the fake LLM
                c.set_response(RESPONSE)

        closer = store.aclose  # type: ignore[assignment]
    before = loop.run_until_complete(_script_calls(server.url))
    benchmark.pedantic(lambda: _concurrent(loop, call), rounds=3, iterations=1)
    loop.run_until_complete(closer())
    after = loop.run_until_complete(_script_calls(server.url))
    total = loop.run_until_complete(_total_tokens(server.url, system))
    if system != "llmtally-memory":
        assert total == 21 * 3 * calls  # exact totals, or the figure means nothing
    if system == "llmtally-redis":
        assert store is not None
        round_trips = store.batches_written / (3 * calls)  # one pipeline per flush
        benchmark.extra_info["script_calls_per_call"] = (after - before) / (3 * calls)
    elif system == "naive-hincrby":
        round_trips = 1.0
    else:
        round_trips = 0.0
    benchmark.extra_info["round_trips_per_call"] = round_trips
    record("B2-concurrent", system, benchmark.stats.stats.median / calls)
    record("B2-round-trips-per-call", system, round_trips / 1e6)


async def _script_calls(url: str) -> int:
    client = aioredis.from_url(url, decode_responses=True)
    try:
        stats = await client.info("commandstats")
        return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))
    finally:
        await client.aclose()


async def _total_tokens(url: str, system: str) -> int:
    client = aioredis.from_url(url, decode_responses=True)
    try:
        total = 0
        async for key in client.scan_iter(match="*user-*", count=1000):
            field = "total_tokens"
            total += int(await client.hget(key, field) or 0)
        return total
    finally:
        await client.aclose()


@pytest.mark.benchmark(group="B5-flush")
@pytest.mark.parametrize("system", ["llmtally-flush", "bare-evalsha"])
def test_b5_flush_10k_users(
    benchmark: Any, loop: asyncio.AbstractEventLoop, server: RedisServer, system: str
) -> None:
    server.flushall()
    store = open_store(server.url, flush_interval_s=3600)
    users = [f"llmtally:{{user-{i:05d}}}:2026-11-01" for i in range(10_000)]
    seq = [0]

    def fill() -> None:
        # 1,000,000 deltas from 10,000 users (100 calls each), merged per key as they arrive.
        add = store.ledger.add
        for _ in range(100):
            for key in users:
                add(key, 21, 14, 7, 3, 0, 1, 105_000_000, 1, 0, 0)

    if system == "llmtally-flush":

        def run() -> None:
            assert loop.run_until_complete(store.flush())

        benchmark.pedantic(run, setup=fill, rounds=10, iterations=1)
    else:
        client = aioredis.from_url(server.url, decode_responses=True)
        sha = loop.run_until_complete(client.script_load(APPLY_LUA))
        fill()
        calls = store.ledger.drain().lua_chunks(CHUNK_KEYS, False)

        async def bare() -> None:
            seq[0] += 1
            pipe = client.pipeline(transaction=False)
            for tag, unit, keys, args in calls:
                pipe.evalsha(
                    sha, len(keys) + 1, marker_key("bare", tag), *keys, unit, seq[0],
                    MARKER_TTL_S, *args,
                )  # fmt: skip
            await pipe.execute()

        benchmark.pedantic(lambda: loop.run_until_complete(bare()), rounds=10, iterations=1)
        loop.run_until_complete(client.aclose())
    loop.run_until_complete(store.aclose())
    fields = 10_000 * 7  # non-zero fields per user
    seconds = benchmark.stats.stats.median
    benchmark.extra_info["fields_per_s"] = fields / seconds
    record("B5-flush-10k-users", system, seconds)
