"""Fixtures with real servers (see tests/servers.py). Shared servers start once per session and
are flushed before each test; `fresh_redis_server` gives a test a server of its own to stop,
kill and restart. Every test that uses one of them is marked `redis`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from servers import FaultProxy, RedisCluster, RedisServer, ReplyDroppingProxy

_REDIS_FIXTURES = {
    "redis_server",
    "redis_url",
    "fresh_redis_server",
    "redis_cluster",
    "reply_dropping_proxy",
    "fault_proxy",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _REDIS_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.redis)


@pytest.fixture(scope="session")
def _shared_redis_server() -> Iterator[RedisServer]:
    with RedisServer(name="shared") as server:
        yield server


@pytest.fixture
def redis_server(_shared_redis_server: RedisServer) -> RedisServer:
    """The session's server, emptied (FLUSHALL) for this test; started again first if an
    earlier test stopped it. Do not stop it: use `fresh_redis_server` for that."""
    server = _shared_redis_server
    if not server.is_running():
        server.start(server.port)
    server.flushall()
    return server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """`redis://127.0.0.1:PORT/0` of the emptied shared server."""
    return redis_server.url


@pytest.fixture
def fresh_redis_server() -> Iterator[RedisServer]:
    """A server of this test's own, to stop, kill and restart (same port)."""
    with RedisServer(name="fresh") as server:
        yield server


@pytest.fixture(scope="session")
def _shared_redis_cluster() -> Iterator[RedisCluster]:
    with RedisCluster() as cluster:
        yield cluster


@pytest.fixture
def redis_cluster(_shared_redis_cluster: RedisCluster) -> RedisCluster:
    """The session's 3-master cluster, emptied on every master for this test."""
    cluster = _shared_redis_cluster
    cluster.flushall()
    return cluster


@pytest.fixture
def reply_dropping_proxy(redis_server: RedisServer) -> Iterator[ReplyDroppingProxy]:
    """A proxy in front of the (emptied) shared server; `redis_server.url` reaches the server
    directly."""
    with ReplyDroppingProxy(redis_server.address) as proxy:
        yield proxy


@pytest.fixture
def fault_proxy(redis_server: RedisServer) -> Iterator[FaultProxy]:
    """A proxy in front of the (emptied) shared server that fails or answers chosen commands."""
    with FaultProxy(redis_server.address) as proxy:
        yield proxy


@pytest.fixture(params=["memory", "sqlite", "redis"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of each store kind in turn: memory, a SQLite file, the shared Redis."""
    if request.param == "memory":
        return "memory://"
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/usage.db"
    server: RedisServer = request.getfixturevalue("redis_server")
    return server.url
