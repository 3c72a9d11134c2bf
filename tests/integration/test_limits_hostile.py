"""BudgetLimiter under the inputs and interruptions a red team tried: a call cancelled while
its lease renews, counts given as int subclasses, bad cycles, a full table of budgets, and a
limiter dropped without ``aclose()``. Each keeps the limit exact and the store's reservations at
0 once the calls are over, on every store."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from pathlib import Path
from typing import Any

import pytest

from llmtally import BudgetExceeded, CallbackManager, UsageRecorder, open_store
from llmtally import limits as limits_module
from llmtally.limits import BudgetLimiter
from llmtally.storage import Store
from llmtally.storage.keys import current_cycle, usage_key

CYCLE = "2026-11-01"
PATIENT_S = 10.0  # (see test_budget_overshoot.py)
MESSAGES = [{"role": "user", "content": "hi"}]


def limiter_for(store: Store, **kw: Any) -> tuple[BudgetLimiter, CallbackManager]:
    limiter = BudgetLimiter(max_tokens=1000, store=store, store_timeout_s=PATIENT_S, **kw)
    return limiter, CallbackManager([UsageRecorder(store=store), limiter])


async def calls_until_refused(manager: CallbackManager, user: str, **context: Any) -> int:
    admitted = 0
    while True:
        try:
            async with manager.llm_call(MESSAGES, user_id=user, **context) as call:
                call.set_response({"prompt_tokens": 10, "completion_tokens": 0})
        except BudgetExceeded:
            return admitted
        admitted += 1


async def stored(store: Store, key: str) -> dict[str, int]:
    await store.flush()
    return store.backend.read(key)


async def test_a_call_cancelled_while_its_lease_renews_gives_its_estimate_back(
    store_url: str,
) -> None:
    async with open_store(store_url) as store:
        limiter, manager = limiter_for(store)

        completed = 0

        async def call() -> None:
            nonlocal completed
            async with manager.llm_call(
                MESSAGES, user_id="bob", cycle_start_date=CYCLE, estimated_tokens=10
            ) as c:
                c.set_response({"prompt_tokens": 10, "completion_tokens": 0})
            completed += 1

        for _ in range(5):  # cancelled at once: while the renewal is on the I/O thread
            task = asyncio.create_task(call())
            await asyncio.sleep(0)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task  # (the memory store renews inline: the call may be over)
        await asyncio.sleep(0.2)  # the renewals are done
        left = await limiter.remaining("bob", CYCLE)
        assert (left["used"], left["reserved"]) == (10 * completed, 0)
        admitted = await calls_until_refused(
            manager, "bob", cycle_start_date=CYCLE, estimated_tokens=10
        )
        assert admitted + completed == 100
        await limiter.aclose()
        fields = await stored(store, usage_key("bob", CYCLE))
        assert (fields["total_tokens"], fields.get("reserved_tokens", 0)) == (1000, 0)


class Tokens(int):
    """An int subclass, as a caller's own count type may be."""


@pytest.mark.parametrize("given", ["estimated_tokens", "max_tokens"])
async def test_counts_given_as_int_subclasses_reserve_their_value(
    store_url: str, given: str
) -> None:
    async with open_store(store_url) as store:
        limiter, manager = limiter_for(store)
        context: dict[str, Any] = {given: Tokens(10)}
        messages: list[Any] = MESSAGES if given == "estimated_tokens" else []
        per_call = 10 if given == "estimated_tokens" else 10 + 3  # (an empty prompt: 3)
        held = []
        async with manager.llm_call(messages, user_id="carl", **context):
            async with manager.llm_call(messages, user_id="carl", **context):
                held = [entry[1] for entry in limiter._open.values()]
        assert held == [per_call, per_call]


async def test_a_bad_cycle_is_limited_and_counted_in_the_current_cycle(
    store_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with open_store(store_url) as store:
        limiter, manager = limiter_for(store)
        recorder = manager.handlers[0]
        admitted = 0
        with caplog.at_level(logging.WARNING, "llmtally"):
            for cycle in (["2026-11-01"], {"a": 1}, "garbage", 2026, b"2026-11-01"):
                for _ in range(20):
                    try:
                        async with manager.llm_call(
                            MESSAGES, user_id="dina", cycle_start_date=cycle, estimated_tokens=10
                        ) as call:
                            call.set_response({"prompt_tokens": 10, "completion_tokens": 0})
                    except BudgetExceeded:
                        break
                    admitted += 1
        assert admitted == 100  # one budget: the current month's
        assert not [r for r in caplog.records if "failed" in r.getMessage()]
        assert (limiter.bad_input, recorder.bad_input) == (100, 100)  # each call, once each
        await limiter.aclose()
        fields = await stored(store, usage_key("dina", current_cycle()))
        assert (fields["total_tokens"], fields["calls"], fields.get("reserved_tokens", 0)) == (
            1000,
            100,
            0,
        )


async def test_budgets_pushed_out_of_a_full_table_keep_their_unwritten_usage(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(limits_module, "_MAX_TRACKED", 20)
    async with open_store(store_url, flush_interval_s=3600) as store:  # nothing written
        limiter, manager = limiter_for(store)
        for _ in range(44):
            async with manager.llm_call(
                MESSAGES, user_id="erin", cycle_start_date=CYCLE, estimated_tokens=10
            ) as call:
                call.set_response({"prompt_tokens": 10, "completion_tokens": 0})
        for i in range(25):  # 25 other budgets: the table is full, idle ones are forgotten
            async with manager.llm_call(
                MESSAGES, user_id=f"other{i}", cycle_start_date=CYCLE, estimated_tokens=10
            ) as call:
                call.set_response({"prompt_tokens": 10, "completion_tokens": 0})
        admitted = await calls_until_refused(
            manager, "erin", cycle_start_date=CYCLE, estimated_tokens=10
        )
        assert admitted == 100 - 44
        await limiter.aclose()
        fields = await stored(store, usage_key("erin", CYCLE))
        assert (fields["total_tokens"], fields.get("reserved_tokens", 0)) == (1000, 0)


async def test_a_limiter_dropped_without_aclose_gives_its_leases_back(store_url: str) -> None:
    async with open_store(store_url) as store:
        for _ in range(20):  # a limiter per request, dropped: each took a slice of the budget
            limiter, manager = limiter_for(store)
            async with manager.llm_call(
                MESSAGES, user_id="finn", cycle_start_date=CYCLE, estimated_tokens=10
            ) as call:
                call.set_response({"prompt_tokens": 10, "completion_tokens": 0})
            del limiter, manager
            gc.collect()
        for _ in range(100):  # the slices are given back on the store's I/O threads
            gc.collect()  # (one the store's threads held for a moment goes now)
            fields = await stored(store, usage_key("finn", CYCLE))
            if not fields.get("reserved_tokens"):
                break
            await asyncio.sleep(0.05)
        assert (fields["total_tokens"], fields.get("reserved_tokens", 0)) == (200, 0)
        limiter, manager = limiter_for(store)
        assert (
            await calls_until_refused(manager, "finn", cycle_start_date=CYCLE, estimated_tokens=10)
            == 80
        )
        await limiter.aclose()


async def test_a_call_behind_a_slow_renewal_waits_store_timeout_at_most(tmp_path: Path) -> None:
    """Two calls of one budget at once on a slow store (each lease operation takes 0.4 s, the
    timeout is 0.5 s): the second waits for the first one's renewal and then would renew
    itself; together that stays within its store_timeout_s, then it is decided locally."""
    import time

    async with open_store(f"sqlite:///{tmp_path}/slow.db") as store:
        limiter, manager = limiter_for(store, lease_fraction=0)
        limiter.store_timeout_s = 0.5
        backend: Any = store.backend
        lease = backend.lease

        def slow_lease(*args: Any, **kwargs: Any) -> Any:
            time.sleep(0.4)
            return lease(*args, **kwargs)

        backend.lease = slow_lease
        entered: list[float] = []

        async def call() -> None:
            t0 = time.monotonic()
            async with manager.llm_call(
                MESSAGES, user_id="gus", cycle_start_date=CYCLE, estimated_tokens=10
            ) as c:
                entered.append(time.monotonic() - t0)
                c.set_response({"prompt_tokens": 10, "completion_tokens": 0})

        await asyncio.gather(call(), call())
        assert len(entered) == 2
        assert max(entered) < 0.7  # (0.8 s before: a renewal waited for, then its own)
        backend.lease = lease
        await asyncio.sleep(1.2)  # the renewal left running finishes; the backoff ends
        await limiter.aclose()


_COLLECTED_INSIDE_SUBMIT = """
import asyncio, faulthandler, gc, sys
from llmtally import BudgetLimiter, CallbackManager, open_store
faulthandler.dump_traceback_later(60, exit=True)
store = open_store(sys.argv[1])
async def one_round():
    limiter = BudgetLimiter(max_tokens=10**9, store=store)  # freed by the GC (a cycle)
    manager = CallbackManager([limiter])
    for j in range(3):
        async with manager.llm_call([], model="gpt-4o", user_id=f"bob{j}") as call:
            call.set_response({"usage": {"prompt_tokens": 14, "completion_tokens": 7}})
    await limiter.remaining("bob0")
gc.set_threshold(10)  # a collection at almost any allocation, inside the executor's locks too
for _ in range(400):
    asyncio.run(one_round())
print("done")
"""


def test_a_limiter_collected_inside_the_stores_executor_does_not_hang(tmp_path: Path) -> None:
    """A limiter's finalizer runs wherever the GC runs, also inside ``ThreadPoolExecutor.submit``
    holding its lock: giving its leases back must take no lock there (it used to submit to that
    executor, and the process hung)."""
    import subprocess
    import sys

    url = f"sqlite:///{tmp_path / 'usage.db'}"
    done = subprocess.run(
        [sys.executable, "-c", _COLLECTED_INSIDE_SUBMIT, url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "done"
