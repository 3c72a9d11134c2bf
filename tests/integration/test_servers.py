"""The server fixtures work: real servers, reached with redis-py's asyncio clients."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
import redis
import redis.asyncio
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.backoff import NoBackoff

from servers import (
    RedisCluster,
    RedisServer,
    ReplyDroppingProxy,
    admin,
    find_server_binary,
    ping,
)

pytestmark = pytest.mark.redis


def no_retry_client(url: str, **kwargs: object) -> redis.asyncio.Redis:
    """One try per command, so a lost reply surfaces instead of being retried."""
    return redis.asyncio.Redis.from_url(
        url, retry=redis.asyncio.retry.Retry(NoBackoff(), 0), **kwargs
    )


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_binary_is_found_and_recent() -> None:
    binary = find_server_binary()
    assert binary.endswith(("redis-server", "valkey-server"))


async def test_set_get(redis_server: RedisServer) -> None:
    assert redis_server.url.startswith("redis://127.0.0.1:")
    client = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        await client.set("k", "v")
        assert await client.get("k") == b"v"
        assert await client.dbsize() == 1
    finally:
        await client.aclose()


async def test_each_test_starts_empty(redis_server: RedisServer, redis_url: str) -> None:
    assert redis_url == redis_server.url
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        assert await client.dbsize() == 0
        await client.set("left-behind", 1)
    finally:
        await client.aclose()


async def test_each_test_starts_empty_again(redis_url: str) -> None:
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        assert await client.dbsize() == 0
    finally:
        await client.aclose()


async def test_stop_and_restart_keep_the_port(fresh_redis_server: RedisServer) -> None:
    server = fresh_redis_server
    port = server.port
    client = no_retry_client(server.url, socket_timeout=2, socket_connect_timeout=2)
    try:
        await client.set("k", "1")
        server.stop()
        assert not server.is_running()
        with pytest.raises(redis.exceptions.ConnectionError):
            await client.get("k")
        server.restart()
        assert server.port == port and server.is_running()
        # Nothing was saved: the server came back empty, and answers on the same URL.
        assert await client.get("k") is None
        await client.set("k", "2")
        assert await client.get("k") == b"2"
    finally:
        await client.aclose()


async def test_kill_then_start_on_the_same_port(fresh_redis_server: RedisServer) -> None:
    server = fresh_redis_server
    port = server.port
    server.kill()
    assert not server.is_running()
    server.start(port)
    client = redis.asyncio.Redis.from_url(server.url)
    try:
        assert await client.ping()
    finally:
        await client.aclose()


async def test_persistent_server_keeps_data_across_restart() -> None:
    with RedisServer(persist=True, name="persist") as server:
        client = redis.asyncio.Redis.from_url(server.url)
        try:
            await client.hincrby("h", "f", 5)
        finally:
            await client.aclose()
        server.restart()
        client = redis.asyncio.Redis.from_url(server.url)
        try:
            assert await client.hget("h", "f") == b"5"
        finally:
            await client.aclose()


def test_servers_are_stopped_on_close() -> None:
    server = RedisServer(name="closing").start()
    port, directory = server.port, server.dir
    assert port is not None
    server.close()
    assert not server.is_running() and not directory.exists()
    assert not ping(port)


async def test_cluster_spreads_keys_over_all_masters(redis_cluster: RedisCluster) -> None:
    assert redis_cluster.url.startswith("redis+cluster://127.0.0.1:")
    assert len(redis_cluster.startup_nodes) == 3
    host, port = redis_cluster.startup_nodes[0]
    client = AsyncRedisCluster(startup_nodes=[ClusterNode(host, port)])
    try:
        users = [f"user{i}" for i in range(30)]
        keys = [f"llmtally:{{{u}}}:2025-01-01" for u in users]
        for key in keys:
            await client.hincrby(key, "total_tokens", 7)
            await client.hincrby(key, "calls", 1)
        for key in keys:
            assert await client.hgetall(key) == {b"total_tokens": b"7", b"calls": b"1"}
        owners = {client.get_node_from_key(key).port for key in keys}
        assert owners == set(redis_cluster.ports)
    finally:
        await client.aclose()
    # Each master holds a share, checked node by node.
    counts = []
    for node_port in redis_cluster.ports:
        with admin(node_port) as r:
            counts.append(r.dbsize())
    assert sum(counts) == len(keys) and all(counts)


async def test_cluster_is_flushed_between_tests(redis_cluster: RedisCluster) -> None:
    for node_port in redis_cluster.ports:
        with admin(node_port) as r:
            assert r.dbsize() == 0
            info = r.execute_command("CLUSTER", "INFO")
            assert "cluster_state:ok" in info


def test_cluster_starts_within_seconds(redis_cluster: RedisCluster) -> None:
    # Masters wait 2 s after start before they call the cluster ok (a reboot guard built in
    # the server), so about 2 s is the floor.
    assert redis_cluster.startup_s is not None
    assert redis_cluster.startup_s < 10, f"cluster took {redis_cluster.startup_s:.1f}s"


async def test_proxy_forwards(reply_dropping_proxy: ReplyDroppingProxy) -> None:
    client = redis.asyncio.Redis.from_url(reply_dropping_proxy.url)
    try:
        await client.set("k", "v")
        assert await client.get("k") == b"v"
        assert await client.get("x" * 200_000) is None
        await client.set("big", b"y" * 1_000_000)
        assert await client.strlen("big") == 1_000_000
    finally:
        await client.aclose()


async def test_proxy_drops_a_reply_the_server_applied(
    redis_server: RedisServer, reply_dropping_proxy: ReplyDroppingProxy
) -> None:
    proxy = reply_dropping_proxy
    client = no_retry_client(proxy.url, socket_timeout=2)
    try:
        assert await client.ping()  # connected through the proxy
        proxy.drop_replies = True
        with pytest.raises((redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)):
            await client.incr("counter")
        assert proxy.wait_dropped(1)
        proxy.drop_replies = False
        # The server did apply it.
        with admin(redis_server.port) as r:
            assert r.get("counter") == "1"
        # And the proxy carries on with new connections.
        assert await client.incr("counter") == 2
    finally:
        await client.aclose()


async def test_proxy_pause_holds_requests(
    redis_server: RedisServer, reply_dropping_proxy: ReplyDroppingProxy
) -> None:
    proxy = reply_dropping_proxy
    client = no_retry_client(proxy.url, socket_timeout=0.3)
    try:
        assert await client.ping()
        proxy.pause()
        with pytest.raises(redis.exceptions.TimeoutError):
            await client.set("paused", 1)
        with admin(redis_server.port) as r:
            assert r.get("paused") is None
        # The client gave up and closed its connection: the held SET is discarded, not sent.
        assert await asyncio.to_thread(wait_until, lambda: proxy.open_connections == 0)
        proxy.resume()
        assert await client.set("after", 1)
        with admin(redis_server.port) as r:
            assert r.get("paused") is None
    finally:
        await client.aclose()


async def test_proxy_cuts_connections(reply_dropping_proxy: ReplyDroppingProxy) -> None:
    client = no_retry_client(reply_dropping_proxy.url)
    try:
        assert await client.ping()
        assert reply_dropping_proxy.open_connections == 1
        reply_dropping_proxy.close_connections()
        with pytest.raises(redis.exceptions.ConnectionError):
            await client.ping()
        assert await client.ping()
    finally:
        await client.aclose()


def test_proxy_only_forwards_to_loopback() -> None:
    with pytest.raises(ValueError):
        ReplyDroppingProxy(("10.0.0.1", 6379))
