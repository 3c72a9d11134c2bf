"""Redis faults against a real server: a unit of a batch failing alone, an unexpected reply, a
poisoned counter, OOM, READONLY. Every test checks the stored numbers exactly."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import Any

import pytest
import redis

from llmtally import open_store
from llmtally._core import key_slot
from llmtally.storage.keys import MARKER_TTL_S, marker_key, usage_key

import servers
from helpers import METER, report, run_python, totals
from servers import FaultProxy, RedisServer, ReplyDroppingProxy

CYCLE = "2026-12-01"
I64_MAX = 2**63 - 1


def key(user: str) -> str:
    return usage_key(user, CYCLE)


def direct(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, decode_responses=True)


def stored(client: redis.Redis, users: list[str]) -> dict[str, dict[str, str]]:
    pipe = client.pipeline(transaction=False)
    for user in users:
        pipe.hgetall(key(user))
    return dict(zip(users, pipe.execute(), strict=True))


@pytest.mark.parametrize("failing_unit", [0, 1, 2])
async def test_a_failed_unit_is_retried_alone_and_none_is_skipped(
    fault_proxy: FaultProxy, redis_url: str, failing_unit: int
) -> None:
    """1,200 users make three units (512 keys each) in one pipeline; the proxy fails one of
    them before the server sees it while the others apply. The retry applies exactly that one."""
    store = open_store(fault_proxy.url, flush_interval_s=3600)
    store.add(key("warm-up"), calls=1)
    assert store.flush_sync()  # the server has the script (no NOSCRIPT reload below)
    users = [f"user-{i:04d}" for i in range(1200)]
    for user in users:
        store.add(key(user), total_tokens=7, cost_pusd=11, calls=1)
    fault_proxy.fail("EVALSHA", skip=failing_unit)
    assert store.flush_sync() is False
    health = await store.health()
    assert (health["status"], health["ok"]) == ("unhealthy", False)
    assert "1 of 3 units failed" in health["last_error"]
    assert health["pending_deltas"] == 1200 and health["oldest_pending_s"] is not None
    # The other units are in Redis already; reads through the store count every user once.
    client = direct(redis_url)
    written = stored(client, users)
    unit_sizes = [512, 512, 176]
    assert sum(1 for fields in written.values() if fields) == 1200 - unit_sizes[failing_unit]
    assert await store.read(key(users[0])) == {"total_tokens": 7, "cost_pusd": 11, "calls": 1}
    assert await store.read(key(users[-1])) == {"total_tokens": 7, "cost_pusd": 11, "calls": 1}
    assert store.flush_sync() is True
    expected = {"total_tokens": "7", "cost_pusd": "11", "calls": "1"}
    after = stored(client, users)
    report(
        "one unit of a batch fails (1,200 users)",
        "redis",
        1200,
        sum(int(f.get("calls", 0)) for f in after.values()),
    )
    assert after == dict.fromkeys(users, expected)
    assert (await store.health())["status"] == "healthy"
    await store.aclose()


async def test_an_unexpected_reply_is_a_failed_write_never_a_success(
    fault_proxy: FaultProxy, redis_url: str
) -> None:
    """The server applied the unit but the client got ``+OK``: the flush fails, the batch is
    kept, and its retry is recognised as applied (counted once)."""
    store = open_store(fault_proxy.url, flush_interval_s=3600)
    store.add(key("alice"), total_tokens=5, calls=1)
    fault_proxy.replace("EVALSHA", b"+OK\r\n")
    assert await store.flush() is False
    health = await store.health()
    assert health["status"] == "unhealthy" and "unexpected reply 'OK'" in health["last_error"]
    assert health["pending_deltas"] == 1
    assert await store.read(key("alice")) == {"total_tokens": 5, "calls": 1}
    assert await store.flush() is True
    got = direct(redis_url).hgetall(key("alice"))
    report("unexpected reply (+OK) to a unit it applied", "redis", 1, int(got.get("calls", 0)))
    assert got == {"total_tokens": "5", "calls": "1"}
    await store.aclose()


async def test_a_poisoned_counter_is_refused_alone_and_bystanders_are_written_once(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="llmtally")
    client = direct(redis_url)
    client.hset(key("rich"), "cost_pusd", I64_MAX - 100)
    client.hset(key("edge"), "cost_pusd", I64_MAX - 100)
    client.hset(key("weird"), "total_tokens", "not a number")
    client.hset(key("low"), "cost_pusd", -I64_MAX)
    store = open_store(redis_url, flush_interval_s=3600)
    bystanders = [f"b{i}" for i in range(50)]
    for user in bystanders:
        store.add(key(user), total_tokens=3, cost_pusd=5, calls=1)
    store.add(key("rich"), cost_pusd=101, calls=1)  # one past the 64-bit range
    store.add(key("edge"), cost_pusd=100, calls=1)  # exactly the largest value: allowed
    store.add(key("weird"), total_tokens=1, calls=1)  # HINCRBY would fail on this field
    store.add(key("low"), cost_pusd=-2)  # one below the range (an undo path)
    assert await store.flush() is True  # refusing is not failing: nothing is retried
    assert store.refused_writes == 3
    assert client.hgetall(key("rich")) == {"cost_pusd": str(I64_MAX - 100)}
    assert client.hgetall(key("edge")) == {"cost_pusd": str(I64_MAX), "calls": "1"}
    assert client.hgetall(key("weird")) == {"total_tokens": "not a number"}
    assert client.hgetall(key("low")) == {"cost_pusd": str(-I64_MAX)}
    expected = {"total_tokens": "3", "cost_pusd": "5", "calls": "1"}
    written = stored(client, bystanders)
    report(
        "one user's counter past 2**63-1 (50 bystanders)",
        "redis",
        50,
        sum(int(f.get("calls", 0)) for f in written.values()),
    )
    assert written == dict.fromkeys(bystanders, expected)
    assert "'rich'" in caplog.text and "'weird'" in caplog.text
    for user in bystanders:  # later flushes are not poisoned
        store.add(key(user), total_tokens=1)
    assert await store.flush() is True
    assert client.hget(key("b0"), "total_tokens") == "4"
    await store.aclose()


async def test_markers_are_one_hash_per_flusher_with_a_ttl(redis_url: str) -> None:
    store = open_store(redis_url, flush_interval_s=3600)
    store.add(key("alice"), total_tokens=1)
    assert await store.flush()
    client = direct(redis_url)
    marker = marker_key(store.flusher_id)
    assert client.hgetall(marker) == {"0": "1"}  # unit 0 applied batch 1
    assert 0 < client.ttl(marker) <= MARKER_TTL_S
    assert client.keys("llmtally:flushed") == []  # no shared hash growing per store
    await store.aclose()


@pytest.mark.parametrize("fault", ["oom", "readonly"])
async def test_health_is_unhealthy_while_writes_fail_and_recovers_exactly(
    fresh_redis_server: RedisServer, fault: str
) -> None:
    client = direct(fresh_redis_server.url)
    store = open_store(fresh_redis_server.url, flush_interval_s=3600)
    store.add(key("alice"), total_tokens=2, calls=1)
    assert await store.flush()
    if fault == "oom":
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", 1)
    else:
        dead = fresh_redis_server.port + 1 if fresh_redis_server.port < 65535 else 1
        client.replicaof("127.0.0.1", dead)
    store.add(key("alice"), total_tokens=3, calls=1)
    assert await store.flush() is False
    health = await store.health()
    assert health["status"] == "unhealthy" and health["ok"] is False
    error = "OutOfMemoryError" if fault == "oom" else "ReadOnlyError"
    assert error in health["last_error"]
    assert await store.read(key("alice")) == {"total_tokens": 5, "calls": 2}
    if fault == "oom":
        client.config_set("maxmemory", 0)
    else:
        client.replicaof("NO", "ONE")
    assert await store.flush() is True
    assert (await store.health())["status"] == "healthy"
    got = client.hgetall(key("alice"))
    report(f"{fault.upper()} while writing, then recovered", "redis", 2, int(got.get("calls", 0)))
    assert got == {"total_tokens": "5", "calls": "2"}
    await store.aclose()


async def test_cluster_units_carry_their_marker_in_their_slot(redis_cluster: Any) -> None:
    """On a cluster each unit's marker lives in its own slot, on the node its keys live on; a
    batch spread over every master is written once per key."""
    store = open_store(redis_cluster.url, flush_interval_s=3600)
    users = [f"c{i}" for i in range(600)]
    for user in users:
        store.add(key(user), total_tokens=2, calls=1)
    assert await store.flush() is True
    for user in users:
        store.add(key(user), total_tokens=1)
    assert await store.flush() is True
    assert await store.read(key("c7")) == {"total_tokens": 3, "calls": 1}
    client = redis.RedisCluster.from_url(
        redis_cluster.url.replace("redis+cluster://", "redis://").split(",")[0],
        decode_responses=True,
    )
    assert all(client.hget(key(u), "total_tokens") == "3" for u in users)
    markers = [k for k in client.keys("llmtally:*flushed*")]
    assert markers and all(k.endswith(":flushed:" + store.flusher_id) for k in markers)
    await store.aclose()


# -- exit, signals, a hung server, a backlog, resharding -----------------------------------------


async def test_exit_without_closing_writes_everything_to_redis(redis_url: str) -> None:
    proc = run_python(METER, redis_url, "5000", "exit")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and err == ""
    got = await totals(redis_url)
    report("exit without closing the store", "redis", 5000, got[0])
    assert got == (5000, 25000)


async def test_sigterm_with_the_helper_writes_everything_to_redis(redis_url: str) -> None:
    proc = run_python(METER, redis_url, "3000", "signal")
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGTERM and err == ""
    got = await totals(redis_url)
    report("SIGTERM, flush_on_exit_signals()", "redis", 3000, got[0])
    assert got == (3000, 15000)


async def test_a_hung_server_never_holds_a_call_and_loses_nothing(
    reply_dropping_proxy: ReplyDroppingProxy, redis_url: str
) -> None:
    """Redis stops answering (the proxy holds every request): calls go on at full speed, the
    flush gives up at its socket timeout, health says so; when Redis answers again every
    delta is written once."""
    store = open_store(reply_dropping_proxy.url + "?socket_timeout=0.3", flush_interval_s=0.05)
    key_a = key("alice")
    store.add(key_a, total_tokens=1, calls=1)
    assert await store.flush()
    reply_dropping_proxy.pause()
    started = time.perf_counter()
    for _ in range(20_000):
        store.add(key_a, total_tokens=1, calls=1)
        store._kick()
    adding = time.perf_counter() - started
    assert await store.flush() is False
    assert (await store.health())["status"] == "unhealthy"
    reply_dropping_proxy.resume()
    assert await store.flush() is True
    got = direct(redis_url).hgetall(key_a)
    report("server hung (no replies), then back", "redis", 20_001, int(got.get("calls", 0)))
    assert got == {"total_tokens": "20001", "calls": "20001"}
    assert adding < 5  # the calls touched the ledger only, never the hung server
    await store.aclose()


async def test_writing_a_large_backlog_never_blocks_the_event_loop(
    fresh_redis_server: RedisServer,
) -> None:
    """50,000 users pending after an outage are written by the flusher's thread: the event loop
    keeps turning (it used to stop for 372 ms)."""
    store = open_store(fresh_redis_server.url, flush_interval_s=0.02)
    fresh_redis_server.stop()
    for i in range(50_000):
        store.add(key(f"user-{i}"), total_tokens=1, calls=1)
    assert await store.flush() is False
    fresh_redis_server.restart()
    lags: list[float] = []

    async def watch() -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append(time.perf_counter() - before)

    watcher = asyncio.create_task(watch())
    deadline = time.monotonic() + 30
    # the flusher's thread writes; this loop only watches
    while (await store.health())["pending_deltas"] and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    watcher.cancel()
    assert (await store.health())["pending_deltas"] == 0
    client = direct(fresh_redis_server.url)
    assert client.hgetall(key("user-49999")) == {"total_tokens": "1", "calls": "1"}
    assert len(lags) > 10 and max(lags) < 0.2, max(lags)
    pipe = client.pipeline(transaction=False)
    for i in range(50_000):
        pipe.hget(key(f"user-{i}"), "calls")
    written = sum(int(v or 0) for v in pipe.execute())
    report(
        "backlog of 50,000 users after an outage",
        "redis",
        50_000,
        written,
        note=f"event loop's longest stall while writing it: {max(lags) * 1e3:.0f} ms",
    )
    assert written == 50_000
    await store.aclose()


def _migrate_slot(cluster: Any, slot: int) -> None:
    """Move ``slot`` (and its keys) to another master, the way redis-cli --cluster reshard
    does."""
    clients = [servers.admin(p) for p in cluster.ports]
    ids = [c.execute_command("CLUSTER", "MYID") for c in clients]
    ids = [i.decode() if isinstance(i, bytes) else i for i in ids]
    owner = next(
        n for n, c in enumerate(clients) if c.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot)
    )
    target = (owner + 1) % len(clients)
    src, dst = clients[owner], clients[target]
    dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[owner])
    src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[target])
    while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
        src.execute_command(
            "MIGRATE", "127.0.0.1", cluster.ports[target], "", 0, 5000, "KEYS", *keys
        )
    for c in clients:
        c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[target])
    for c in clients:
        c.close()


async def test_resharding_mid_run_moves_a_unit_without_losing_or_doubling_it(
    redis_cluster: Any,
) -> None:
    store = open_store(redis_cluster.url, flush_interval_s=3600)
    store.add(key("moving"), total_tokens=2, calls=1)
    assert await store.flush()  # the client's slot map knows the old owner now
    _migrate_slot(redis_cluster, key_slot(key("moving")))
    store.add(key("moving"), total_tokens=3, calls=1)
    ok = await store.flush()  # MOVED: the unit fails, the slot map is refreshed
    ok = ok or await store.flush()  # written to the new owner
    assert ok
    got = await store.read(key("moving"))
    report("slot resharded between two flushes", "redis-cluster", 2, got.get("calls", 0))
    assert got == {"total_tokens": 5, "calls": 2}
    await store.aclose()


@pytest.mark.parametrize(
    ("found", "delta"),
    [("-0", 1), ("007", 1), (" 7", 1), ("7.0", 1), ("9999999999999999999", -(10**18))],
)
async def test_a_field_hincrby_would_reject_is_refused_before_anything_is_written(
    redis_url: str, found: str, delta: int
) -> None:
    """Stored text that looks like a number but that HINCRBY rejects would abort the script
    after the unit's earlier keys were incremented, and every retry would increment them again.
    The script checks each field the way HINCRBY parses it, before writing anything."""
    client = direct(redis_url)
    client.hset(key("z-poisoned"), "cost_pusd", found)
    store = open_store(redis_url, flush_interval_s=3600)
    store.add(key("a-bystander"), calls=1)  # sorts first: written before the poisoned key
    store.add(key("z-poisoned"), cost_pusd=delta)
    for _ in range(3):
        assert await store.flush() is True
    assert store.refused_writes == 1
    assert client.hgetall(key("a-bystander")) == {"calls": "1"}
    assert client.hgetall(key("z-poisoned")) == {"cost_pusd": found}
    await store.aclose()


async def test_reads_include_the_deltas_waiting_in_the_spool(
    fault_proxy: FaultProxy, redis_url: str, tmp_path: Any
) -> None:
    """A write fails, the deltas move past max_pending into the spool: a read (what a budget
    sees) still counts them, and once written they are counted once."""
    store = open_store(
        fault_proxy.url, flush_interval_s=3600, max_pending=1, spool=tmp_path / "spool"
    )
    store.add(key("alice"), calls=5)
    assert await store.flush() is True
    fault_proxy.fail("EVALSHA")  # the next unit write
    store.add(key("alice"), calls=3)
    store.add(key("bob"), calls=1)
    assert await store.flush() is False
    assert len(store._flusher.spilled) == 1
    assert (await store.read(key("alice")))["calls"] == 8
    assert direct(redis_url).hget(key("alice"), "calls") == "5"
    assert await store.flush() is True
    assert (await store.read(key("alice")))["calls"] == 8
    assert direct(redis_url).hget(key("alice"), "calls") == "8"
    await store.aclose()
