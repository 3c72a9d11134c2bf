"""Nested budgets (issue 14): one call checked against the budgets of its user, team, org, API
key or model at once; the first reached refuses and says which; `llmtally limit set --scope`."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from llmtally import BudgetExceeded, CallbackManager, ConfigError, UsageRecorder, open_store
from llmtally.cli import main as cli
from llmtally.limits import BudgetLimiter
from llmtally.storage import Store
from llmtally.storage.keys import scope_key, usage_key

CYCLE = "2026-11-01"
MESSAGES = [{"role": "user", "content": "hi"}]


#: These tests are about which budget refuses, not outages: a loaded machine may take longer
#: than the default 50 ms store timeout, and a timeout there is a (safe) offline decision.
PATIENT_S = 10.0


@pytest.fixture(params=["memory", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    url = "memory://" if request.param == "memory" else f"sqlite:///{tmp_path}/usage.db"
    s = open_store(url)
    yield s
    await s.aclose()


async def one_call(manager: CallbackManager, tokens: int = 10, **context: Any) -> None:
    context.setdefault("user_id", "alice")
    async with manager.llm_call(
        MESSAGES, cycle_start_date=CYCLE, estimated_tokens=tokens, **context
    ) as call:
        await asyncio.sleep(0)
        call.set_response({"prompt_tokens": tokens, "completion_tokens": 0})


async def until_refused(manager: CallbackManager, tasks: int, **context: Any) -> BudgetExceeded:
    refusals: list[BudgetExceeded] = []

    async def task() -> None:
        while True:
            try:
                await one_call(manager, **context)
            except BudgetExceeded as exc:
                refusals.append(exc)
                return

    await asyncio.gather(*(task() for _ in range(tasks)))
    return refusals[0]


async def test_the_first_budget_reached_refuses_and_says_which(store: Store) -> None:
    user = BudgetLimiter(max_tokens=1000, store=store, store_timeout_s=PATIENT_S)
    team = BudgetLimiter(max_tokens=300, store=store, store_timeout_s=PATIENT_S, scope="team")
    org = BudgetLimiter(max_tokens=10_000, store=store, store_timeout_s=PATIENT_S, scope="org")
    manager = CallbackManager([UsageRecorder(store=store), user, team, org])
    refused = await until_refused(manager, 5, team="acme", org="initech")
    assert (refused.scope, refused.scope_id, refused.user_id) == ("team", "acme", None)
    assert (refused.limit, refused.used, refused.requested, refused.unit) == (
        300,
        300,
        10,
        "tokens",
    )
    assert "team 'acme'" in str(refused)
    for limiter in (user, team, org):
        await limiter.aclose()
    await store.flush()
    # The user's usage is counted by the recorder, the team's and the org's by their limiters:
    # each once; the refused calls hold nothing anywhere.
    read = store.backend.read
    assert read(usage_key("alice", CYCLE))["total_tokens"] == 300
    assert read(scope_key("team", "acme", CYCLE))["total_tokens"] == 300
    assert read(scope_key("org", "initech", CYCLE))["total_tokens"] == 300
    left = await user.remaining("alice", CYCLE)
    assert (left["used"], left["reserved"], left["remaining"]) == (300, 0, 700)
    left = await org.remaining("initech", CYCLE)
    assert (left["used"], left["reserved"], left["remaining"], left["scope"]) == (
        300,
        0,
        9700,
        "org",
    )


async def test_the_user_budget_refuses_before_a_larger_team_budget(store: Store) -> None:
    user = BudgetLimiter(max_tokens=100, store=store, store_timeout_s=PATIENT_S)
    team = BudgetLimiter(max_tokens=1000, store=store, store_timeout_s=PATIENT_S, scope="team")
    manager = CallbackManager([UsageRecorder(store=store), team, user])
    refused = await until_refused(manager, 3, team="acme")
    assert (refused.scope, refused.scope_id, refused.user_id) == ("user", "alice", "alice")
    # Another user of the same team goes on, against the team's budget.
    await one_call(manager, user_id="bob", team="acme")
    await team.aclose()
    left = await team.remaining("acme", CYCLE)
    assert (left["used"], left["remaining"]) == (110, 890)


async def test_a_call_without_the_scope_kwarg_is_not_limited_by_it(store: Store) -> None:
    team = BudgetLimiter(max_tokens=10, store=store, store_timeout_s=PATIENT_S, scope="team")
    manager = CallbackManager([team])
    for _ in range(5):
        await one_call(manager)  # no team
    with pytest.raises(BudgetExceeded):
        await one_call(manager, team="acme")
        await one_call(manager, team="acme")


async def test_per_model_and_per_api_key_budgets(store: Store) -> None:
    model = BudgetLimiter(max_tokens=30, store=store, store_timeout_s=PATIENT_S, scope="model")
    key = BudgetLimiter(max_tokens=50, store=store, store_timeout_s=PATIENT_S, scope="api_key")
    manager = CallbackManager([UsageRecorder(store=store), model, key])
    for _ in range(3):
        await one_call(manager, model="gpt-4o", api_key="k1")
    with pytest.raises(BudgetExceeded) as caught:
        await one_call(manager, model="gpt-4o", api_key="k1")
    assert (caught.value.scope, caught.value.scope_id) == ("model", "gpt-4o")
    for _ in range(2):
        await one_call(manager, model="gpt-4o-mini", api_key="k1")
    with pytest.raises(BudgetExceeded) as caught:
        await one_call(manager, model="gpt-4o-mini", api_key="k1")
    assert (caught.value.scope, caught.value.scope_id) == ("api_key", "k1")


async def test_limits_set_with_the_cli_for_each_scope(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/usage.db"
    team_args = ["limit", "set", "acme", "50", "--scope", "team", "--cycle", CYCLE, "--store", url]
    assert await asyncio.to_thread(cli, team_args) == 0
    user_args = ["limit", "set", "alice", "30", "--cycle", CYCLE, "--store", url]
    assert await asyncio.to_thread(cli, user_args) == 0
    async with open_store(url) as store:
        team = BudgetLimiter(
            store=store, store_timeout_s=PATIENT_S, scope="team", limit_from_store=True
        )
        user = BudgetLimiter(store=store, store_timeout_s=PATIENT_S, limit_from_store=True)
        manager = CallbackManager([UsageRecorder(store=store), user, team])
        refused = await until_refused(manager, 2, team="acme")
        assert (refused.scope, refused.limit) == ("user", 30)
        refused = await until_refused(manager, 2, user_id="bob", team="acme")
        assert (refused.scope, refused.limit, refused.used) == ("team", 50, 50)
        # A team with no limit stored is not limited.
        for _ in range(20):
            await one_call(manager, user_id="carol", team="globex")
        left = await team.remaining("globex", CYCLE)
        assert (left["limit"], left["remaining"]) == (None, None)
        left = await team.remaining("acme", CYCLE)
        assert (left["limit"], left["used"], left["remaining"]) == (50, 50, 0)


def test_scope_arguments() -> None:
    for bad in ("", "user_id", 5):
        with pytest.raises(ConfigError):
            BudgetLimiter(max_tokens=5, store="memory://", scope=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        BudgetLimiter(store="memory://")  # no limit at all
    assert BudgetLimiter(store="memory://", limit_from_store=True).limit_from_store
