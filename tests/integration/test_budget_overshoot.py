"""The limit holds (issue 14): a budget of 1,000 tokens and calls whose usage equals their
estimate of 10 tokens admit exactly 100 calls, whoever counts the usage (a UsageRecorder, a seed
handler, or the limiter alone), sequentially or from many tasks, on every store, and never more
than 100 from two processes sharing the store."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from llmtally import (
    BudgetExceeded,
    CallbackManager,
    RateLimited,
    RedisTokenCallbackHandler,
    UsageRecorder,
    open_store,
)
from llmtally.limits import BudgetLimiter, RateLimiter
from llmtally.storage import Store
from llmtally.storage.keys import usage_key

from servers import RedisServer

CYCLE = "2026-11-01"
#: Store timeout of the limiters of tests about numbers, not outages: a loaded machine may
#: take longer than the default 50 ms, and a timeout there is a (safe) offline decision.
PATIENT_S = 10.0
MESSAGES = [{"role": "user", "content": "hi"}]
TESTS_DIR = str(Path(__file__).resolve().parent.parent)
KEY = usage_key("alice", CYCLE)
#: The fake LLM's latency: 100 calls span several flush intervals (50 ms), so flushes, lease
#: renewals and settles interleave as they do in production.
LLM_S = 0.002


def url_for(kind: str, tmp_path: Path, redis_server: RedisServer | None) -> str:
    if kind == "memory":
        return "memory://"
    if kind == "sqlite":
        return f"sqlite:///{tmp_path}/usage.db"
    assert redis_server is not None
    return redis_server.url


@pytest.fixture(params=["memory", "sqlite", "redis"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    redis_server = request.getfixturevalue("redis_server") if request.param == "redis" else None
    return url_for(request.param, tmp_path, redis_server)


async def one_call(manager: CallbackManager, tokens: int = 10, **context: Any) -> None:
    async with manager.llm_call(
        MESSAGES, user_id="alice", cycle_start_date=CYCLE, estimated_tokens=tokens, **context
    ) as call:
        await asyncio.sleep(LLM_S)  # the fake LLM
        call.set_response({"prompt_tokens": tokens, "completion_tokens": 0})


async def until_refused(manager: CallbackManager, tasks: int, *, patient: Any = None) -> int:
    """``tasks`` tasks each calling until refused; returns the calls admitted. With
    ``patient`` (a limiter), a refused task looks again while the budget shows room (another
    process may hold part of it for a moment: an idle lease is given back after a second), and
    stops once it has shown none for 2 s."""
    admitted = 0

    async def task() -> None:
        nonlocal admitted
        quiet = 0
        while True:
            try:
                await one_call(manager)
            except BudgetExceeded:
                if patient is None:
                    return
                left = await patient.remaining("alice", CYCLE)
                quiet = quiet + 1 if left["remaining"] < 10 else 0
                if quiet >= 20:
                    return
                await asyncio.sleep(0.1)
                continue
            admitted += 1
            quiet = 0

    async with asyncio.timeout(60):
        await asyncio.gather(*(task() for _ in range(tasks)))
    return admitted


async def stored(store: Store) -> dict[str, int]:
    await store.flush()
    return store.backend.read(KEY)


@pytest.mark.parametrize("tasks", [1, 5, 50])
async def test_recorder_and_limiter_admit_exactly_the_limit(store_url: str, tasks: int) -> None:
    async with open_store(store_url) as store:
        limiter = BudgetLimiter(max_tokens=1000, store=store, store_timeout_s=PATIENT_S)
        manager = CallbackManager([UsageRecorder(store=store), limiter])
        assert await until_refused(manager, tasks) == 100
        await limiter.aclose()
        fields = await stored(store)
        assert (fields["total_tokens"], fields["calls"], fields.get("reserved_tokens", 0)) == (
            1000,
            100,
            0,
        )
        assert (limiter.allowed, limiter.refused, limiter.store_errors) == (100, tasks, 0)


@pytest.mark.parametrize("tasks", [1, 50])
async def test_limiter_before_the_recorder_admits_exactly_the_limit(
    store_url: str, tasks: int
) -> None:
    """Handler order does not matter: the limiter settles after the recorder counted."""
    async with open_store(store_url) as store:
        limiter = BudgetLimiter(max_tokens=1000, store=store, store_timeout_s=PATIENT_S)
        manager = CallbackManager([limiter, UsageRecorder(store=store)])
        assert await until_refused(manager, tasks) == 100
        assert (await stored(store))["total_tokens"] == 1000


@pytest.mark.parametrize("tasks", [1, 50])
async def test_limiter_alone_counts_what_it_enforces_on(store_url: str, tasks: int) -> None:
    async with open_store(store_url) as store:
        limiter = BudgetLimiter(max_tokens=1000, store=store, store_timeout_s=PATIENT_S)
        assert await until_refused(CallbackManager([limiter]), tasks) == 100
        await limiter.aclose()
        fields = await stored(store)
        # The limiter records what it enforces on: tokens and cost, not calls.
        assert (fields["total_tokens"], fields.get("calls", 0)) == (1000, 0)
        assert fields.get("reserved_tokens", 0) == 0


async def test_limiter_alone_40_calls_of_30_tokens() -> None:
    """The issue's case: a limiter of 1,000 tokens alone, calls of 30: 33 pass (990)."""
    async with open_store("memory://") as store:
        manager = CallbackManager(
            [BudgetLimiter(max_tokens=1000, store=store, store_timeout_s=PATIENT_S)]
        )
        passed = 0
        for _ in range(40):
            try:
                await one_call(manager, 30)
                passed += 1
            except BudgetExceeded:
                pass
        assert passed == 33
        assert (await stored(store))["total_tokens"] == 990


@pytest.mark.parametrize("tasks", [1, 50])
async def test_seed_handler_and_limiter_count_each_call_once(store_url: str, tasks: int) -> None:
    async with open_store(store_url) as store:
        limiter = BudgetLimiter(max_tokens=1000, store=store, store_timeout_s=PATIENT_S)
        seed = RedisTokenCallbackHandler("alice", CYCLE, store=store)
        assert await until_refused(CallbackManager([seed, limiter]), tasks) == 100
        fields = await stored(store)
        assert (fields["total_tokens"], fields["calls"]) == (1000, 100)


async def test_seed_handler_of_another_user_does_not_count_for_the_limiter() -> None:
    """A seed handler charging bob does not count alice's calls: the limiter does."""
    async with open_store("memory://") as store:
        limiter = BudgetLimiter(max_tokens=1000, store=store, store_timeout_s=PATIENT_S)
        seed = RedisTokenCallbackHandler("bob", CYCLE, store=store)
        assert await until_refused(CallbackManager([seed, limiter]), 5) == 100
        assert (await stored(store))["total_tokens"] == 1000
        assert store.backend.read(usage_key("bob", CYCLE))["total_tokens"] == 1000


async def test_reused_request_id_does_not_skip_the_limiters() -> None:
    """50 calls with one request id against 100 tokens and 5 requests a minute: the limiters
    see every one (the first 5 pass), the usage is counted once (a duplicate)."""
    async with open_store("memory://") as store:
        budget = BudgetLimiter(max_tokens=100, store=store, store_timeout_s=PATIENT_S)
        rate = RateLimiter(requests_per_minute=5)
        manager = CallbackManager([UsageRecorder(store=store), budget, rate])
        outcomes = []
        for _ in range(50):
            try:
                await one_call(manager, 10, request_id="same-id")
                outcomes.append("ok")
            except RateLimited:
                outcomes.append("rate")
            except BudgetExceeded:
                outcomes.append("budget")
        assert (outcomes.count("ok"), outcomes.count("rate"), outcomes.count("budget")) == (
            5,
            45,
            0,
        )
        assert (await stored(store))["total_tokens"] == 10  # counted once
        assert rate.allowed == 5


async def test_reused_request_id_in_flight_is_limited() -> None:
    """50 calls at once with one request id, each holding 30 tokens while it runs, against a
    budget of 100: 3 run, the others are refused."""
    async with open_store("memory://") as store:
        budget = BudgetLimiter(max_tokens=100, store=store, store_timeout_s=PATIENT_S)
        manager = CallbackManager([UsageRecorder(store=store), budget])
        gate = asyncio.Event()
        outcomes: list[str] = []

        async def call() -> None:
            try:
                async with manager.llm_call(
                    MESSAGES,
                    user_id="alice",
                    cycle_start_date=CYCLE,
                    estimated_tokens=30,
                    request_id="same-id",
                ) as c:
                    outcomes.append("ok")
                    await gate.wait()
                    c.set_response({"prompt_tokens": 30, "completion_tokens": 0})
            except BudgetExceeded:
                outcomes.append("refused")
            if len(outcomes) == 50:
                gate.set()

        await asyncio.gather(*(call() for _ in range(50)))
        assert (outcomes.count("ok"), outcomes.count("refused")) == (3, 47)
        assert (await stored(store))["total_tokens"] == 30  # one request, counted once
        left = await budget.remaining("alice", CYCLE)
        assert (left["used"], left["reserved"]) == (30, 0)


CHILD = """
import asyncio, json, sys
from llmtally import CallbackManager, UsageRecorder, open_store
from llmtally.limits import BudgetLimiter
from integration.test_budget_overshoot import PATIENT_S, until_refused

async def main(url, tasks):
    async with open_store(url) as store:
        limiter = BudgetLimiter(max_tokens=1000, store=store, store_timeout_s=PATIENT_S)
        manager = CallbackManager([UsageRecorder(store=store), limiter])
        admitted = await until_refused(manager, tasks, patient=limiter)
        await limiter.aclose()
    print(json.dumps({"admitted": admitted}))

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["sqlite", "redis"])
async def test_two_processes_never_pass_the_limit(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    redis_server = request.getfixturevalue("redis_server") if kind == "redis" else None
    url = url_for(kind, tmp_path, redis_server)
    env = {**os.environ, "PYTHONPATH": TESTS_DIR}
    children = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            CHILD,
            url,
            "50",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        for _ in range(2)
    ]
    admitted = []
    for child in children:
        out, err = await asyncio.wait_for(child.communicate(), 100)
        assert child.returncode == 0, err.decode()
        admitted.append(json.loads(out)["admitted"])
    assert sum(admitted) == 100, admitted
    async with open_store(url) as store:
        fields = store.backend.read(KEY)
        assert (fields["total_tokens"], fields["calls"], fields.get("reserved_tokens", 0)) == (
            1000,
            100,
            0,
        )
