"""Limiters and a store that hangs or goes away (issue 14): no call waits on the store past
``store_timeout_s``; after a failure the limiter leaves the store alone for a backoff period and
enforces on this process's view (or refuses with ``fail_closed``); with the store back it
resumes. Closing a store (or a limiter) gives its leases back at once.

The Redis server is really paused (SIGSTOP) and the store's socket timeout is an hour, so a call
that waited on the store would never return while it is paused: the calls returning at all is
the proof that none waited (no timed assertion)."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from llmtally import BudgetExceeded, CallbackManager, RateLimited, UsageRecorder, open_store
from llmtally.limits import BudgetLimiter, RateLimiter
from llmtally.storage import Store
from llmtally.storage.redis import RedisBackend

from servers import RedisServer

CYCLE = "2026-11-01"
MESSAGES = [{"role": "user", "content": "hi"}]
BACKOFF_S = 0.2

#: The limiters of tests about leases, not outages: a loaded machine may take longer than the
#: default 50 ms store timeout, and a timeout there is a (safe) offline decision.
PATIENT_S = 10.0


@pytest.fixture
def paused(fresh_redis_server: RedisServer) -> Iterator[Any]:
    """``pause()`` / ``resume()`` the server (SIGSTOP / SIGCONT); resumed at the end."""
    pid = fresh_redis_server.pid
    assert pid is not None
    state = {"paused": False}

    class Pauser:
        @staticmethod
        def pause() -> None:
            os.kill(pid, signal.SIGSTOP)
            state["paused"] = True

        @staticmethod
        def resume() -> None:
            os.kill(pid, signal.SIGCONT)
            state["paused"] = False

    yield Pauser
    if state["paused"]:
        os.kill(pid, signal.SIGCONT)


@pytest.fixture
async def hanging_store(fresh_redis_server: RedisServer) -> AsyncIterator[Store]:
    """A store on the fresh server whose socket timeout is an hour."""
    url = fresh_redis_server.url
    store = Store(RedisBackend(url, socket_timeout_s=3600.0), url=url)
    yield store
    await store.aclose()


async def call(manager: CallbackManager, user: str = "alice", tokens: int = 10) -> None:
    async with manager.llm_call(
        MESSAGES, user_id=user, cycle_start_date=CYCLE, estimated_tokens=tokens
    ) as c:
        c.set_response({"prompt_tokens": tokens, "completion_tokens": 0})


async def test_a_paused_store_stalls_no_call_and_the_limiters_resume(
    hanging_store: Store, paused: Any
) -> None:
    store = hanging_store
    # No slices: every call needs the store (the worst case for an outage).
    budget = BudgetLimiter(
        max_tokens=1000, store=store, lease_fraction=0, store_backoff_s=BACKOFF_S
    )
    rate = RateLimiter(requests_per_minute=1000, store=store, store_backoff_s=BACKOFF_S)
    manager = CallbackManager([UsageRecorder(store=store), budget, rate])
    for _ in range(3):
        await call(manager)
    await store.flush()
    assert (budget.store_errors, rate.store_errors) == (0, 0)

    paused.pause()
    for _ in range(20):
        await call(manager)  # returns: nothing waited on the paused server
    # One operation each found the store hung (after store_timeout_s); the others did not
    # touch it (backoff), and were decided on this process's view.
    assert (budget.store_errors, rate.store_errors) == (1, 1)
    assert (budget.allowed, rate.allowed) == (23, 23)
    left = await budget.remaining("alice", CYCLE)
    assert (left["used"], left["stale"]) == (230, True)

    # The budget's offline view is exact for this process: 23 calls of 10 so far.
    offline = BudgetLimiter(max_tokens=240, store=store, store_backoff_s=BACKOFF_S)
    await offline.on_llm_start(MESSAGES, user_id="alice", cycle_start_date=CYCLE,
                               estimated_tokens=10, run_id="x")  # fmt: skip
    assert offline.store_errors == 1

    paused.resume()
    await asyncio.sleep(2 * BACKOFF_S)  # the backoff period ends
    renewals = budget.renewals
    await call(manager)
    assert budget.renewals == renewals + 1  # back on the store
    assert (budget.store_errors, rate.store_errors) == (1, 1)
    await store.flush()
    left = await budget.remaining("alice", CYCLE)
    assert (left["used"], left["stale"]) == (240, False)


async def test_fail_closed_refuses_while_the_store_is_paused(
    hanging_store: Store, paused: Any
) -> None:
    store = hanging_store
    budget = BudgetLimiter(
        max_tokens=1000,
        store=store,
        fail_closed=True,
        lease_fraction=0,
        store_backoff_s=BACKOFF_S,
    )
    rate = RateLimiter(
        requests_per_minute=1000, store=store, fail_closed=True, store_backoff_s=BACKOFF_S
    )
    await call(CallbackManager([UsageRecorder(store=store), budget, rate]))
    paused.pause()
    for _ in range(5):
        with pytest.raises(BudgetExceeded, match="unreachable"):
            await call(CallbackManager([budget]), tokens=100)  # more than its lease
        with pytest.raises(RateLimited, match="unreachable") as caught:
            await call(CallbackManager([rate]))
        assert caught.value.retry_after_s is not None
        assert 0 <= caught.value.retry_after_s <= 30
    assert (budget.store_errors, rate.store_errors) == (1, 1)
    paused.resume()
    await asyncio.sleep(2 * BACKOFF_S)
    await call(CallbackManager([UsageRecorder(store=store), budget, rate]))
    assert (budget.allowed, rate.allowed) == (2, 2)


async def test_calls_inside_a_granted_lease_need_no_store(
    hanging_store: Store, paused: Any
) -> None:
    """A lease already granted is spent with the store paused, even with fail_closed."""
    store = hanging_store
    budget = BudgetLimiter(max_tokens=1000, store=store, fail_closed=True, lease_fraction=0.5)
    manager = CallbackManager([UsageRecorder(store=store), budget])
    await call(manager)  # takes a lease: this call and half of what is left after it
    paused.pause()
    for _ in range(40):
        await call(manager)
    assert (budget.allowed, budget.store_errors) == (41, 0)
    paused.resume()


@pytest.fixture(params=["sqlite", "redis"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/usage.db"
    server: RedisServer = request.getfixturevalue("redis_server")
    return server.url


@pytest.mark.parametrize("close", ["store", "limiter"])
async def test_closing_gives_the_leases_back_at_once(url: str, close: str) -> None:
    async with open_store(url) as theirs:
        mine = open_store(url)
        limiter = BudgetLimiter(
            max_tokens=1000, store=mine, lease_fraction=0.5, store_timeout_s=PATIENT_S
        )
        await call(CallbackManager([UsageRecorder(store=mine), limiter]))
        other = BudgetLimiter(max_tokens=1000, store=theirs, store_timeout_s=PATIENT_S)
        left = await other.remaining("alice", CYCLE)
        # The lease: this call (10, not flushed yet) and half of the rest: 10 + 490.
        assert (left["used"], left["reserved"], left["remaining"]) == (0, 500, 500)
        if close == "store":
            await mine.aclose()
        else:
            await limiter.aclose()
        left = await other.remaining("alice", CYCLE)
        assert (left["used"], left["reserved"], left["remaining"]) == (10, 0, 990)
        await mine.aclose()
