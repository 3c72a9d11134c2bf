"""BudgetLimiter and RateLimiter on the memory and SQLite stores: exact numbers."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import llmtally
from llmtally import (
    AsyncCallbackHandler,
    BudgetExceeded,
    CallbackAbort,
    CallbackManager,
    ConfigError,
    RateLimited,
    UsageRecorder,
    open_store,
)
from llmtally.errors import StoreUnavailable
from llmtally.limits import BudgetLimiter, RateLimiter
from llmtally.storage import Store
from llmtally.storage.keys import usage_key

CYCLE = "2026-11-01"
#: Store timeout of the limiters of tests about numbers, not outages: a loaded machine may
#: take longer than the default 50 ms, and a timeout there is a (safe) offline decision.
PATIENT_S = 10.0
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(params=["memory", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    url = "memory://" if request.param == "memory" else f"sqlite:///{tmp_path}/usage.db"
    s = open_store(url)
    yield s
    await s.aclose()


def manager_for(store: Store, *handlers: Any) -> CallbackManager:
    return CallbackManager([*handlers, UsageRecorder(store=store)])


async def one_call(
    manager: CallbackManager, estimated: int, actual: int, user: str = "alice", **kw: Any
) -> None:
    async with manager.llm_call(
        MESSAGES, user_id=user, cycle_start_date=CYCLE, estimated_tokens=estimated, **kw
    ) as call:
        call.set_response({"prompt_tokens": actual, "completion_tokens": 0})


# -- BudgetLimiter ---------------------------------------------------------------------------


async def test_1000_concurrent_calls_against_a_limit_of_100(store: Store) -> None:
    limiter = BudgetLimiter(max_tokens=1000, store=store, store_timeout_s=PATIENT_S)
    manager = manager_for(store, limiter)
    gate = asyncio.Event()
    passed = refused = 0

    async def call() -> None:
        nonlocal passed, refused
        try:
            async with manager.llm_call(
                MESSAGES, user_id="alice", cycle_start_date=CYCLE, estimated_tokens=10
            ) as c:
                passed += 1
                if passed + refused == 1000:
                    gate.set()
                await gate.wait()
                c.set_response({"prompt_tokens": 10, "completion_tokens": 0})
        except BudgetExceeded as exc:
            refused += 1
            assert (exc.limit, exc.used, exc.requested, exc.unit) == (1000, 1000, 10, "tokens")
            if passed + refused == 1000:
                gate.set()

    await asyncio.gather(*(call() for _ in range(1000)))
    assert (passed, refused) == (100, 900)
    assert await limiter.remaining("alice", CYCLE) == {
        "user_id": "alice",
        "cycle_start_date": CYCLE,
        "limit": 1000,
        "used": 1000,
        "reserved": 0,
        "remaining": 0,
        "unit": "tokens",
        "stale": False,
    }
    await limiter.aclose()
    fields = await store.read(usage_key("alice", CYCLE))
    assert (fields["total_tokens"], fields["reserved_tokens"], fields["calls"]) == (1000, 0, 100)


async def test_settles_to_actual_usage_and_refuses_with_the_numbers(store: Store) -> None:
    limiter = BudgetLimiter(max_tokens=100, store=store, store_timeout_s=PATIENT_S)
    manager = manager_for(store, limiter)
    for _ in range(2):
        await one_call(manager, estimated=30, actual=20)
    await limiter.flush()  # usage now in the backend, reservations dropped
    for _ in range(2):
        await one_call(manager, estimated=30, actual=20)  # usage still in local deltas
    with pytest.raises(BudgetExceeded) as caught:
        await one_call(manager, estimated=30, actual=20)
    exc = caught.value
    assert (exc.user_id, exc.limit, exc.used, exc.requested, exc.unit) == (
        "alice",
        100,
        80,
        30,
        "tokens",
    )
    await one_call(manager, estimated=20, actual=20)  # exactly fits: 80 + 20 = 100
    remaining = await limiter.remaining("alice", CYCLE)
    assert (remaining["used"], remaining["reserved"], remaining["remaining"]) == (100, 0, 0)
    await limiter.aclose()
    assert (limiter.allowed, limiter.refused, limiter.store_errors) == (5, 1, 0)


async def test_remaining_counts_calls_in_flight(store: Store) -> None:
    limiter = BudgetLimiter(max_tokens=100, store=store, store_timeout_s=PATIENT_S)
    manager = manager_for(store, limiter)
    await one_call(manager, estimated=20, actual=20)
    async with manager.llm_call(
        MESSAGES, user_id="alice", cycle_start_date=CYCLE, estimated_tokens=30
    ) as call:
        left = await limiter.remaining("alice", CYCLE)
        assert (left["limit"], left["used"], left["reserved"], left["remaining"]) == (
            100,
            20,
            30,
            50,
        )
        call.set_response({"prompt_tokens": 25, "completion_tokens": 0})
    left = await limiter.remaining("alice", CYCLE)
    assert (left["used"], left["reserved"], left["remaining"]) == (45, 0, 55)
    assert (await limiter.remaining("bob", CYCLE))["remaining"] == 100
    await limiter.aclose()


async def test_released_when_the_call_fails_or_is_aborted(store: Store) -> None:
    limiter = BudgetLimiter(max_tokens=100, store=store, store_timeout_s=PATIENT_S)
    manager = manager_for(store, limiter)
    with pytest.raises(ConnectionError):
        async with manager.llm_call(
            MESSAGES, user_id="alice", cycle_start_date=CYCLE, estimated_tokens=60
        ):
            raise ConnectionError("provider down")

    class Refuse(AsyncCallbackHandler):
        async def on_llm_start(self, messages: Any, **kwargs: Any) -> None:
            raise CallbackAbort("no")

    manager.add_handler(Refuse(), priority=-1)  # after the limiter reserved
    with pytest.raises(CallbackAbort):
        await one_call(manager, estimated=70, actual=70)
    left = await limiter.remaining("alice", CYCLE)
    assert (left["used"], left["reserved"], left["remaining"]) == (0, 0, 100)
    await limiter.aclose()  # the lease goes back to the store
    fields = await store.read(usage_key("alice", CYCLE))
    assert fields.get("reserved_tokens", 0) == 0
    assert fields.get("errors", 0) == 1


async def test_reservations_expire(store: Store) -> None:
    dead = BudgetLimiter(max_tokens=100, store=store, reservation_ttl_s=0.05)
    other = BudgetLimiter(max_tokens=100, store=store, store_timeout_s=PATIENT_S)  # another process
    await dead.on_llm_start(
        MESSAGES, user_id="alice", cycle_start_date=CYCLE, estimated_tokens=90, run_id="r1"
    )  # never ended: a process that died mid-call ...
    assert (await other.remaining("alice", CYCLE))["reserved"] == 90  # its lease
    gone = weakref.ref(dead)
    del dead  # ... and took its limiter with it (a live one keeps its calls' leases alive)
    for _ in range(50):  # (the store's threads may hold it for a moment: a tick)
        gc.collect()
        if gone() is None:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    assert (await other.remaining("alice", CYCLE))["reserved"] == 0
    assert (await store.read(usage_key("alice", CYCLE)))["reserved_tokens"] == 0


async def test_thresholds_fire_once_per_user_and_cycle(store: Store) -> None:
    alerts: list[dict[str, Any]] = []

    async def on_alert(alert: dict[str, Any]) -> None:
        alerts.append(alert)

    limiter = BudgetLimiter(max_tokens=100, store=store, on_alert=on_alert)
    manager = manager_for(store, limiter)
    for _ in range(4):
        await one_call(manager, estimated=25, actual=25)
    await limiter.flush()
    with pytest.raises(BudgetExceeded):
        await one_call(manager, estimated=25, actual=25)
    assert [(a["threshold"], a["used"], a["limit"], a["unit"]) for a in alerts] == [
        (0.5, 50, 100, "tokens"),
        (0.8, 100, 100, "tokens"),
        (1.0, 100, 100, "tokens"),
    ]
    assert {a["user_id"] for a in alerts} == {"alice"}
    # Another limiter (another process) on the same store does not fire them again.
    seen: list[dict[str, Any]] = []
    other = BudgetLimiter(max_tokens=100, store=store, on_alert=seen.append)
    with pytest.raises(BudgetExceeded):
        await one_call(manager_for(store, other), estimated=1, actual=1)
    assert seen == []
    await limiter.aclose()


async def test_cost_budget(store: Store) -> None:
    limiter = BudgetLimiter(max_cost_usd=1.0, store=store)
    manager = manager_for(store, limiter)
    gate = asyncio.Event()
    results: list[str] = []

    async def call() -> None:
        try:
            async with manager.llm_call(
                MESSAGES, user_id="carol", cycle_start_date=CYCLE, estimated_cost_usd=0.3
            ):
                results.append("ok")
                if len(results) == 10:
                    gate.set()
                await gate.wait()
        except BudgetExceeded as exc:
            assert (exc.unit, exc.limit, exc.requested) == ("usd", 1.0, 0.3)
            assert exc.used == pytest.approx(0.9)
            results.append("refused")
            if len(results) == 10:
                gate.set()

    await asyncio.gather(*(call() for _ in range(10)))
    assert (results.count("ok"), results.count("refused")) == (3, 7)
    left = await limiter.remaining("carol", CYCLE)
    assert (left["unit"], left["limit"], left["reserved"]) == ("usd", 1.0, 0.0)


async def test_store_down_enforces_locally_or_fails_closed(store: Store) -> None:
    opened = BudgetLimiter(max_tokens=100, store=store, lease_fraction=0)
    closed = BudgetLimiter(max_tokens=100, store=store, fail_closed=True, lease_fraction=0)
    await one_call(manager_for(store, opened), estimated=40, actual=40)
    await opened.flush()
    assert (await opened.remaining("alice", CYCLE))["used"] == 40  # last usage seen

    def down(*args: Any, **kwargs: Any) -> Any:
        raise StoreUnavailable("down")

    backend: Any = store.backend
    real = backend.lease
    backend.lease = down
    try:
        with pytest.raises(BudgetExceeded) as caught:
            await one_call(manager_for(store, closed), estimated=1, actual=1)
        assert "unreachable" in str(caught.value)
        assert caught.value.used is None
        manager = manager_for(store, opened)
        await one_call(manager, estimated=30, actual=30)  # 40 + 30 <= 100
        with pytest.raises(BudgetExceeded) as caught:
            await one_call(manager, estimated=31, actual=31)  # 70 + 31 > 100
        assert (caught.value.used, caught.value.requested) == (70, 31)
        left = await opened.remaining("alice", CYCLE)
        assert (left["used"], left["reserved"], left["stale"]) == (70, 0, True)
    finally:
        backend.lease = real
    # One failure each: then the store is left alone for the backoff period.
    assert opened.store_errors == 1
    assert closed.store_errors == 1


def test_budget_limiter_arguments() -> None:
    store = open_store("memory://")
    with pytest.raises(ConfigError):
        BudgetLimiter(store=store)
    with pytest.raises(ConfigError):
        BudgetLimiter(max_tokens=-1, store=store)
    with pytest.raises(ConfigError):
        BudgetLimiter(max_tokens=10, store=store, thresholds=(0.5, 1.5))
    with pytest.raises(ConfigError):
        BudgetLimiter(max_cost_usd=float("nan"), store=store)
    with pytest.raises(ConfigError):
        RateLimiter(store=store)
    with pytest.raises(ConfigError):
        RateLimiter(requests_per_minute=0)
    with pytest.raises(ConfigError):
        RateLimiter(requests_per_minute=1, per="team")


# -- RateLimiter -----------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("shared", [False, True])
async def test_requests_per_minute_sliding_window(store: Store, shared: bool) -> None:
    clock = Clock()
    limiter = RateLimiter(requests_per_minute=3, store=store if shared else None, clock=clock)
    manager = CallbackManager([limiter])
    for t in (0.0, 10.0, 20.0):
        clock.now = 1000.0 + t
        await one_call(manager, 1, 1)
    clock.now = 1030.0
    with pytest.raises(RateLimited) as caught:
        await one_call(manager, 1, 1)
    assert (caught.value.user_id, caught.value.limit, caught.value.retry_after_s) == (
        "alice",
        3,
        30.0,
    )
    await one_call(manager, 1, 1, user="bob")  # per user
    clock.now = 1060.0  # the call at 1000 left the window
    await one_call(manager, 1, 1)
    with pytest.raises(RateLimited) as caught:
        await one_call(manager, 1, 1)
    assert caught.value.retry_after_s == 10.0
    assert (limiter.allowed, limiter.refused) == (5, 2)


async def test_tokens_per_minute_global_settles_and_shares(store: Store) -> None:
    clock = Clock()
    a = RateLimiter(tokens_per_minute=100, store=store, per="global", clock=clock)
    b = RateLimiter(tokens_per_minute=100, store=store, per="global", clock=clock)
    await one_call(CallbackManager([a]), estimated=60, actual=10, user="u1")  # 60 -> 10
    clock.now += 1
    await one_call(CallbackManager([b]), estimated=90, actual=90, user="u2")  # 10 + 90
    clock.now += 1
    with pytest.raises(RateLimited) as caught:
        await one_call(CallbackManager([a]), estimated=1, actual=1, user="u3")
    assert (caught.value.user_id, caught.value.limit, caught.value.retry_after_s) == (
        "u3",
        100,
        58.0,
    )


async def test_rate_entry_removed_when_another_handler_aborts(store: Store) -> None:
    clock = Clock()
    limiter = RateLimiter(requests_per_minute=1, store=store, clock=clock)

    class Refuse(AsyncCallbackHandler):
        async def on_llm_start(self, messages: Any, **kwargs: Any) -> None:
            raise CallbackAbort("no")

    manager = CallbackManager([limiter, Refuse()])
    with pytest.raises(CallbackAbort):
        await one_call(manager, 1, 1)
    manager.remove_handler(manager.handlers[1])
    await one_call(manager, 1, 1)  # the aborted call did not use the one request
    with pytest.raises(RateLimited):
        await one_call(manager, 1, 1)


async def test_cost_budget_reserves_the_priced_estimate() -> None:
    store = llmtally.open_store("memory://")
    limiter = llmtally.BudgetLimiter(max_cost_usd=0.001, store=store)
    manager = llmtally.CallbackManager([llmtally.UsageRecorder(store=store), limiter])
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = llmtally.estimate_tokens(messages, "gpt-4o")
    # gpt-4o: 2.50 per 1M input, 10.00 per 1M output; 100 max output tokens.
    expected_pusd = prompt * 2_500_000 + 100 * 10_000_000
    with pytest.raises(llmtally.BudgetExceeded) as info:
        async with manager.llm_call(
            messages, provider="openai", model="gpt-4o", user_id="u", max_tokens=100
        ):
            pass
    assert info.value.unit == "usd"
    assert info.value.requested == pytest.approx(expected_pusd / 1e12, abs=1e-12)
    async with manager.llm_call(
        messages, provider="openai", model="gpt-4o", user_id="u", max_tokens=10
    ) as call:
        call.set_response({"prompt_tokens": 20, "completion_tokens": 10})
    left = await limiter.remaining("u")
    assert left["unit"] == "usd"
    assert left["used"] == pytest.approx((20 * 2_500_000 + 10 * 10_000_000) / 1e12, abs=1e-12)
    await store.aclose()


async def test_a_call_longer_than_the_lease_ttl_stays_covered(tmp_path: Path) -> None:
    """A call in flight keeps its part of the budget however long it runs: its lease is kept
    alive in the store, so another process cannot take that room (here the lease's TTL is
    1 s and the call runs 2.5 s)."""
    url = f"sqlite:///{tmp_path}/shared.db"
    async with open_store(url) as first, open_store(url) as second:
        long_lived = BudgetLimiter(
            max_tokens=1000,
            store=first,
            reservation_ttl_s=1.0,
            lease_fraction=0,
            store_timeout_s=PATIENT_S,
        )
        other = BudgetLimiter(max_tokens=1000, store=second, store_timeout_s=PATIENT_S)
        slow = manager_for(first, long_lived)
        quick = manager_for(second, other)
        async with slow.llm_call(
            MESSAGES, user_id="erin", cycle_start_date=CYCLE, estimated_tokens=600
        ) as call:
            await asyncio.sleep(2.5)
            with pytest.raises(BudgetExceeded) as refused:
                await one_call(quick, 600, 600, user="erin")
            assert (refused.value.used, refused.value.requested) == (600, 600)
            await one_call(quick, 400, 400, user="erin")  # what is left still fits
            call.set_response({"prompt_tokens": 600, "completion_tokens": 0})
        await long_lived.aclose()
        await other.aclose()
        await first.flush()
        await second.flush()
        fields = first.backend.read(usage_key("erin", CYCLE))
        assert (fields["total_tokens"], fields.get("reserved_tokens", 0)) == (1000, 0)


async def test_one_limiter_for_sync_and_async_clients_admits_exactly_the_limit(
    store: Store,
) -> None:
    """Sync clients' events run on llmtally's own event loop, async ones on the caller's: one
    limiter serves both (renewals waited for across loops, alerts delivered and flushed)."""
    import threading

    from llmtally._runtime import runner

    alerts: list[dict[str, Any]] = []
    limiter = BudgetLimiter(
        max_tokens=2000,
        store=store,
        lease_fraction=0,  # a renewal per call: both loops wait on each other's
        store_timeout_s=PATIENT_S,
        on_alert=alerts.append,
    )
    manager = manager_for(store, limiter)
    admitted = 0

    async def call() -> bool:
        nonlocal admitted
        try:
            await one_call(manager, 10, 10, user="frank")
        except BudgetExceeded:
            return False
        admitted += 1
        return True

    def sync_client() -> None:
        while runner.run(call()):
            pass

    thread = threading.Thread(target=sync_client)
    thread.start()

    async def task() -> None:
        while await call():
            pass

    await asyncio.gather(*(task() for _ in range(5)))
    await asyncio.to_thread(thread.join)
    assert await limiter.flush()
    assert (admitted, limiter.allowed, limiter.store_errors) == (200, 200, 0)
    # Each threshold once, in order; the usage seen then is past it by at most the calls of
    # the six callers that ended meanwhile.
    assert [a["threshold"] for a in alerts] == [0.5, 0.8, 1.0]
    assert all(0 <= a["used"] - a["threshold"] * 2000 <= 60 for a in alerts)


async def test_a_limiter_no_one_holds_is_collected(store: Store) -> None:
    """The core's lease book and the limiter refer to each other: the garbage collector sees
    the cycle (a limiter per request, as some gateways build them, must not leak)."""
    limiter = BudgetLimiter(max_tokens=1000, store=store, store_timeout_s=PATIENT_S)
    manager = manager_for(store, limiter)
    for _ in range(3):
        await one_call(manager, 10, 10, user="gina")
    gone = weakref.ref(limiter)
    del limiter, manager
    for _ in range(50):  # (the store's threads may hold it for a moment: a tick, a renewal)
        gc.collect()
        if gone() is None:
            break
        await asyncio.sleep(0.02)
    assert gone() is None
