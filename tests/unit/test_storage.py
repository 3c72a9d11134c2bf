"""Stores: URLs, keys, the flusher's batching, retries and idempotence (memory and SQLite)."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import re
from pathlib import Path
from typing import Any

import pytest

import llmtally
from llmtally import ConfigError, StoreUnavailable, open_store
from llmtally._core import Batch
from llmtally.storage import Store, resolve_store
from llmtally.storage.keys import (
    decode_user_id,
    encode_user_id,
    parse_key,
    usage_key,
    validate_cycle,
)
from llmtally.storage.memory import MemoryBackend
from llmtally.storage.sqlite import SQLiteBackend
from llmtally.storage.store import _default_url

# -- URLs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "backend"),
    [
        ("memory://", "memory"),
        ("sqlite:///usage.db", "sqlite"),
        ("sqlite:////tmp/x/usage.db", "sqlite"),
        ("sqlite://", "sqlite"),
        ("redis://localhost:6379/0", "redis"),
        ("rediss://:secret@cache.example:6380/2", "redis"),
        ("unix:///var/run/redis.sock", "redis"),
        ("redis+cluster://10.0.0.1:7000,10.0.0.2:7001", "redis-cluster"),
    ],
)
def test_backend_chosen_by_url(url: str, backend: str) -> None:
    store = open_store(url)
    assert store.backend.name == backend
    assert store.url == url


def test_sqlite_paths_follow_the_sqlalchemy_convention(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    relative = open_store("sqlite:///data/usage.db").backend
    absolute = open_store(f"sqlite:///{tmp_path}/abs.db").backend
    assert isinstance(relative, SQLiteBackend) and isinstance(absolute, SQLiteBackend)
    assert relative.path == Path("data/usage.db")
    assert absolute.path == tmp_path / "abs.db"


@pytest.mark.parametrize(
    "url", ["", "localhost:6379", "postgres://x", "sqlite:relative.db", "redis+cluster://:1"]
)
def test_bad_urls_raise_config_error(url: str) -> None:
    with pytest.raises(ConfigError):
        open_store(url)
    with pytest.raises(ValueError):  # ConfigError is a ValueError too
        open_store(url)


@pytest.mark.parametrize(
    "kwargs", [{"flush_interval_s": 0}, {"flush_interval_s": "1"}, {"max_pending": 0}]
)
def test_bad_store_arguments(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        open_store("memory://", **kwargs)


def test_default_url_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in ("LLMTALLY_STORE", "REDIS_HOST", "REDIS_PORT", "REDIS_PASSWORD", "REDIS_DB"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert _default_url() == f"sqlite:///{tmp_path}/llmtally/usage.db"
    monkeypatch.setenv("REDIS_HOST", "cache")
    monkeypatch.setenv("REDIS_PORT", "6380")
    monkeypatch.setenv("REDIS_PASSWORD", "p@ss")
    monkeypatch.setenv("REDIS_DB", "3")
    assert _default_url() == "redis://:p%40ss@cache:6380/3"
    monkeypatch.setenv("LLMTALLY_STORE", "memory://")
    assert _default_url() == "memory://"  # LLMTALLY_STORE wins over REDIS_HOST


def test_resolve_store_shares_one_store_per_url() -> None:
    a = resolve_store("memory://shared-test")
    assert resolve_store("memory://shared-test") is a
    assert resolve_store(a) is a
    with pytest.raises(ConfigError):
        resolve_store(42)  # type: ignore[arg-type]


# -- keys ----------------------------------------------------------------------------------------

NASTY_IDS = [
    "a}b",
    "{x}",
    "a:b",
    "a*",
    "with space",
    "new\nline",
    "tab\t",
    "ünïcödé",
    "用户",
    "x" * 1024,
    "~YX1i",
    "llmtally:{bob}:2026-11-01",
    "\ud800",
]


def test_user_ids_never_reach_another_users_key() -> None:
    keys = {usage_key(u, "2026-11-01") for u in [*NASTY_IDS, "alice", "bob"]}
    assert len(keys) == len(NASTY_IDS) + 2
    for user in NASTY_IDS:
        key = usage_key(user, "2026-11-01")
        tag = re.fullmatch(r"llmtally:\{([^{}]*)\}:2026-11-01", key)
        assert tag is not None, key
        assert not re.search(r"[{}:*\s]", tag.group(1))
        assert decode_user_id(tag.group(1)) == user
        assert parse_key(key) == (user, "2026-11-01")
    assert encode_user_id("alice.b+c@x-y_z") == "alice.b+c@x-y_z"
    assert encode_user_id("x" * 256) == "x" * 256
    assert encode_user_id("x" * 257).startswith("~")


@pytest.mark.parametrize("bad", ["", "   ", None, 5])
def test_empty_or_non_string_user_id_is_a_value_error(bad: Any) -> None:
    with pytest.raises(ValueError):
        llmtally.RedisTokenCallbackHandler(bad, store="memory://")


@pytest.mark.parametrize("bad", ["2026-13-01", "2026-02-30", "20261101", "2026-1-1", 20261101])
def test_bad_cycle_dates(bad: Any) -> None:
    with pytest.raises(ValueError):
        validate_cycle(bad)


def test_a_cycle_may_start_mid_month() -> None:
    assert validate_cycle("2026-11-15") == "2026-11-15"


# -- flushing ------------------------------------------------------------------------------------


@pytest.fixture(params=["memory", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    url = "memory://" if request.param == "memory" else f"sqlite:///{tmp_path}/s.db"
    s = open_store(url, flush_interval_s=3600)  # flushes only when asked
    yield s
    await s.aclose()


async def test_nothing_reaches_the_backend_between_flushes(store: Store) -> None:
    store.add("llmtally:{u}:2026-11-01", total_tokens=10, calls=1)
    store.add("llmtally:{u}:2026-11-01", total_tokens=5, calls=1)
    assert store.backend.read("llmtally:{u}:2026-11-01") == {}
    assert await store.read("llmtally:{u}:2026-11-01") == {"total_tokens": 15, "calls": 2}
    assert await store.flush() is True
    assert store.backend.read("llmtally:{u}:2026-11-01") == {"total_tokens": 15, "calls": 2}
    assert await store.read("llmtally:{u}:2026-11-01") == {"total_tokens": 15, "calls": 2}
    assert store.ledger.pending == 0


async def test_backend_applies_a_batch_sequence_once(store: Store) -> None:
    store.ledger.add("k", total_tokens=7)
    first = store.ledger.drain()
    store.ledger.add("k", total_tokens=1)
    second = store.ledger.drain()
    assert (first.seq, second.seq) == (1, 2)
    assert store.backend.apply(second, "flusher-a") == []
    assert store.backend.apply(second, "flusher-a") == []  # a retry after a lost reply
    assert store.backend.apply(first, "flusher-a") == []  # an older one: applied before
    assert store.backend.read("k")["total_tokens"] == 1
    store.backend.apply(second, "flusher-b")  # another process's batch is its own
    assert store.backend.read("k")["total_tokens"] == 2


async def test_background_flusher_writes_without_being_asked() -> None:
    store = open_store("memory://", flush_interval_s=0.01)
    store.add("llmtally:{u}:2026-11-01", total_tokens=3)
    for _ in range(100):
        await asyncio.sleep(0.01)
        if store.backend.read("llmtally:{u}:2026-11-01"):
            break
    assert store.backend.read("llmtally:{u}:2026-11-01") == {"total_tokens": 3}
    health = await store.health()
    assert health["last_flush_s_ago"] is not None and health["last_flush_s_ago"] < 5
    await store.aclose()


class Flaky(MemoryBackend):
    """A backend that fails ``fail`` times, optionally after applying (a lost reply)."""

    def __init__(self, fail: int, apply_then_fail: bool = False) -> None:
        super().__init__()
        self.fail = fail
        self.apply_then_fail = apply_then_fail
        self.calls: list[tuple[str, int]] = []

    def apply(self, batch: Batch, flusher_id: str) -> list[str]:
        self.calls.append((flusher_id, batch.seq))
        if self.fail:
            self.fail -= 1
            if self.apply_then_fail:
                super().apply(batch, flusher_id)
            raise StoreUnavailable("connection reset")
        return super().apply(batch, flusher_id)

    def ping(self) -> None:
        if self.fail:
            raise StoreUnavailable("down")


@pytest.mark.parametrize("apply_then_fail", [False, True])
async def test_failed_flush_keeps_deltas_and_retries_the_same_batch(
    apply_then_fail: bool,
) -> None:
    backend = Flaky(fail=3, apply_then_fail=apply_then_fail)
    store = Store(backend, url="memory://flaky", flush_interval_s=3600)
    store.add("k", total_tokens=10, calls=1)
    assert await store.flush() is False
    store.add("k", total_tokens=1, calls=1)  # new deltas keep arriving meanwhile
    assert await store.flush() is False
    health = await store.health()
    assert health["ok"] is False and health["status"] == "unhealthy"
    assert health["flush_failures"] == 2 and health["errors"] == 2
    assert health["pending_deltas"] == 2  # the batch awaiting retry and the new deltas
    # Reads are exact either way: the batch in doubt is added only when the backend has not
    # applied it (read with the stored fields in one step).
    assert await store.read("k") == {"total_tokens": 11, "calls": 2}
    assert await store.flush() is False
    assert await store.flush() is True
    # The failed batch was retried with its own sequence number, then the new deltas followed.
    assert [seq for _, seq in backend.calls] == [1, 1, 1, 1, 2]
    assert backend.data["k"] == {"total_tokens": 11, "calls": 2}
    assert (await store.health())["ok"] is True
    await store.aclose()


async def test_aclose_flushes_and_is_idempotent(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/close.db"
    async with open_store(url, flush_interval_s=3600) as store:
        store.add("llmtally:{u}:2026-11-01", total_tokens=4)
    assert store.closed
    assert await store.aclose() is True
    reopened = open_store(url)
    assert await reopened.read("llmtally:{u}:2026-11-01") == {"total_tokens": 4}
    await reopened.aclose()


async def test_aclose_gives_up_after_its_deadline_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="llmtally")
    store = Store(Flaky(fail=10**6), url="memory://down", flush_interval_s=3600)
    store.add("k", total_tokens=1)
    assert await store.aclose(timeout_s=0.2) is False
    assert "not written" in caplog.text


async def test_counter_overflow_is_refused_not_wrapped(store: Store) -> None:
    store.add("k", cost_pusd=2**63 - 10)
    await store.flush()
    store.ledger.add("k", cost_pusd=100, calls=1)
    await store.flush()
    assert (await store.read("k"))["cost_pusd"] == 2**63 - 10
    assert store.refused_writes == 1


def _sqlite_worker(url: str, user: str, n: int) -> None:
    async def main() -> None:
        store = open_store(url, flush_interval_s=0.005)
        for i in range(n):
            store.add(f"llmtally:{{{user}}}:2026-11-01", total_tokens=3, calls=1)
            if i % 50 == 0:
                await asyncio.sleep(0)
        await store.aclose()

    asyncio.run(main())


async def test_sqlite_from_two_processes_is_exact(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/shared.db"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_sqlite_worker, args=(url, "shared", 2000)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    store = open_store(url)
    assert await store.read("llmtally:{shared}:2026-11-01") == {
        "total_tokens": 12000,
        "calls": 4000,
    }
    await store.aclose()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
async def test_forked_child_does_not_flush_the_parents_deltas(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/fork.db"
    store = open_store(url, flush_interval_s=3600)
    store.add("llmtally:{p}:2026-11-01", total_tokens=5)
    pid = os.fork()
    if pid == 0:  # child: its own delta only
        code = 0
        try:
            store.add("llmtally:{p}:2026-11-01", total_tokens=1)
            asyncio.run(store.aclose())
        except BaseException:
            code = 1
        os._exit(code)
    _, status = await asyncio.to_thread(os.waitpid, pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    await store.flush()
    assert (await store.read("llmtally:{p}:2026-11-01"))["total_tokens"] == 6
    await store.aclose()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
async def test_a_manager_built_before_a_fork_meters_into_the_childs_store(tmp_path: Path) -> None:
    """Pre-fork servers build their handlers once: calls a forked worker meters through them
    reach the store (the child's ledger, not the parent's copy it no longer flushes)."""
    from llmtally import CallbackManager, CostTracker, RedisTokenCallbackHandler, UsageRecorder

    url = f"sqlite:///{tmp_path}/prefork.db"
    store = open_store(url, flush_interval_s=3600)
    manager = CallbackManager(
        [
            RedisTokenCallbackHandler("fork-seed", "2026-11-01", store=store),
            UsageRecorder(store=store),
            CostTracker(),
        ]
    )
    response = {"usage": {"prompt_tokens": 7, "completion_tokens": 3}}
    messages = [{"role": "user", "content": "hi"}]
    async with manager.llm_call(messages, model="gpt-4o", user_id="fork-u") as call:
        call.set_response(response)  # the parent's call: pending, not flushed
    pid = os.fork()
    if pid == 0:  # child: two calls of its own through the same manager
        code = 0
        try:

            async def child() -> None:
                for _ in range(2):
                    async with manager.llm_call(messages, model="gpt-4o", user_id="fork-u") as c:
                        c.set_response(response)
                await store.aclose()

            asyncio.run(child())
        except BaseException:
            code = 1
        os._exit(code)
    _, status = await asyncio.to_thread(os.waitpid, pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    await store.flush()
    seed = await store.read("llmtally:{fork-seed}:2026-11-01")
    assert (seed["total_tokens"], seed["calls"]) == (30, 3)  # 1 call here, 2 in the child
    await store.aclose()


def test_one_store_shared_by_loops_in_several_threads_is_exact(tmp_path: Path) -> None:
    """Each thread runs its own event loop (asyncio.run per request, as sync apps do); flushes
    from all of them reach the backend in sequence, none lost or applied twice."""
    import threading

    store = open_store(f"sqlite:///{tmp_path}/threads.db", flush_interval_s=0.001)

    def worker() -> None:
        async def main() -> None:
            for i in range(500):
                store.add("llmtally:{t}:2026-11-01", total_tokens=2, calls=1)
                if i % 25 == 0:
                    await store.flush()
                    await asyncio.sleep(0)
            await store.flush()

        for _ in range(3):
            asyncio.run(main())

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)

    async def check() -> dict[str, int]:
        assert await store.flush()
        fields = store.backend.read("llmtally:{t}:2026-11-01")
        await store.aclose()
        return fields

    assert asyncio.run(check()) == {"total_tokens": 4 * 3 * 500 * 2, "calls": 4 * 3 * 500}
