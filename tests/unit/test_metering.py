"""The seed's metering handlers, UsageRecorder and TokenUsageRepository (memory and SQLite)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest

import llmtally
from llmtally import (
    BudgetExceeded,
    CallbackManager,
    DetailedRedisTokenCallbackHandler,
    RedisTokenCallbackHandler,
    TokenUsageRepository,
    UsageRecorder,
    create_detailed_token_callback,
    create_token_callback,
    open_store,
)
from llmtally.storage import Store

from helpers import MESSAGES

CYCLE = "2026-11-01"
OPENAI = {
    "model": "gpt-4o",
    "choices": [{"message": {"content": "Paris."}}],
    "usage": {
        "prompt_tokens": 1200,
        "completion_tokens": 300,
        "total_tokens": 1500,
        "prompt_tokens_details": {"cached_tokens": 1024},
        "completion_tokens_details": {"reasoning_tokens": 256},
    },
}


@pytest.fixture(params=["memory", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    url = "memory://" if request.param == "memory" else f"sqlite:///{tmp_path}/m.db"
    s = open_store(url, flush_interval_s=3600)
    yield s
    await s.aclose()


async def stats(store: Store, user: str = "alice", cycle: str = CYCLE) -> dict[str, Any]:
    return await TokenUsageRepository(store).get_usage_stats(user, cycle)


def test_seed_handler_attributes_and_defaults() -> None:
    handler = create_token_callback("alice", store="memory://")
    assert isinstance(handler, RedisTokenCallbackHandler)
    assert isinstance(handler, llmtally.CustomAsyncCallbackHandler)
    assert handler.user_id == "alice"
    today = dt.datetime.now(dt.UTC).date()
    assert handler.cycle_start_date == today.replace(day=1).isoformat()
    detailed = create_detailed_token_callback("bob", "2026-11-15", store="memory://")
    assert isinstance(detailed, DetailedRedisTokenCallbackHandler)
    assert detailed.cycle_start_date == "2026-11-15"
    with pytest.raises(ValueError):
        RedisTokenCallbackHandler("", store="memory://")
    with pytest.raises(ValueError):
        RedisTokenCallbackHandler("alice", "11/01/2026", store="memory://")


@pytest.mark.parametrize(
    "handler_cls", [RedisTokenCallbackHandler, DetailedRedisTokenCallbackHandler]
)
async def test_through_a_manager_the_whole_record_lands_in_the_hash(
    store: Store, handler_cls: type[RedisTokenCallbackHandler]
) -> None:
    manager = CallbackManager([handler_cls("alice", CYCLE, store=store)])
    for _ in range(3):
        async with manager.llm_call(MESSAGES, provider="openai", model="gpt-4o") as call:
            call.set_response(dict(OPENAI, _hidden_params={"response_cost": 0.0125}))
    with pytest.raises(ConnectionError):
        async with manager.llm_call(MESSAGES):
            raise ConnectionError("provider down")
    with pytest.raises(TimeoutError):
        async with manager.llm_call(MESSAGES):
            raise TimeoutError
    assert store.backend.read("llmtally:{alice}:2026-11-01") == {}  # not flushed yet
    expected = {
        "total_tokens": 4500,
        "prompt_tokens": 3600,
        "completion_tokens": 900,
        "cached_tokens": 3072,
        "cache_write_tokens": 0,
        "reasoning_tokens": 768,
        "cost_pusd": 3 * 12_500_000_000,
        "cost_usd": 0.0375,
        "calls": 3,
        "errors": 1,
        "timeouts": 1,
        "limit": None,
        "cycle_start_date": CYCLE,
        "user_id": "alice",
    }
    assert await stats(store) == expected  # reads include unflushed deltas
    await store.flush()
    assert await stats(store) == expected
    assert (store.backend.read("llmtally:{alice}:2026-11-01"))["calls"] == 3


async def test_seed_style_direct_calls(store: Store) -> None:
    handler = RedisTokenCallbackHandler("alice", CYCLE, store=store)
    await handler.on_llm_start(MESSAGES, provider="openai", model="gpt-4")
    await handler.on_llm_end({"content": "Paris.", "tokens_used": 150, "model": "gpt-4"})
    await handler.on_llm_end({"content": "Paris.", "tokens_used": 150})  # no request_id: counted
    await handler.on_llm_error(RuntimeError("503"))
    s = await stats(store)
    assert (s["total_tokens"], s["prompt_tokens"], s["calls"], s["errors"]) == (300, 0, 2, 1)


async def test_same_request_id_is_counted_once_per_handler(store: Store) -> None:
    handler = RedisTokenCallbackHandler("alice", CYCLE, store=store)
    for _ in range(3):
        await handler.on_llm_end({"tokens_used": 10}, request_id="req-7")
    await handler.on_llm_end({"tokens_used": 10}, request_id="req-8")
    s = await stats(store)
    assert (s["total_tokens"], s["calls"]) == (20, 2)
    assert handler.duplicates == 2


async def test_no_usage_is_estimated_never_a_silent_zero(store: Store) -> None:
    handler = RedisTokenCallbackHandler("alice", CYCLE, store=store)
    await handler.on_llm_start(MESSAGES, request_id="r1", model="gpt-4o")
    await handler.on_llm_end({"content": "The capital of France is Paris."}, request_id="r1")
    s = await stats(store)
    prompt = llmtally.estimate_tokens(MESSAGES, "gpt-4o")
    completion = llmtally.estimate_tokens("The capital of France is Paris.")
    assert (s["prompt_tokens"], s["completion_tokens"]) == (prompt, completion)
    assert s["total_tokens"] == prompt + completion > 0
    assert handler.estimated_calls == 1


async def test_detailed_handler_splits_a_bare_total_with_the_estimated_prompt(store: Store) -> None:
    handler = DetailedRedisTokenCallbackHandler("alice", CYCLE, store=store)
    await handler.on_llm_start(MESSAGES, request_id="r1")
    await handler.on_llm_end({"content": "x", "tokens_used": 100}, request_id="r1")
    prompt = llmtally.estimate_tokens(MESSAGES)
    s = await stats(store)
    assert (s["total_tokens"], s["prompt_tokens"], s["completion_tokens"]) == (
        100,
        prompt,
        100 - prompt,
    )
    # The same through a manager: the provider reports only a total.
    manager = CallbackManager([DetailedRedisTokenCallbackHandler("bob", CYCLE, store=store)])
    async with manager.llm_call(MESSAGES) as call:
        call.set_response({"tokens_used": 90})
    b = await stats(store, "bob")
    assert (b["total_tokens"], b["prompt_tokens"], b["completion_tokens"]) == (
        90,
        prompt,
        90 - prompt,
    )


async def test_bad_usage_counts_the_call_but_no_tokens(store: Store) -> None:
    handler = RedisTokenCallbackHandler("alice", CYCLE, store=store)
    manager = CallbackManager([handler])
    async with manager.llm_call(MESSAGES) as call:
        call.set_response({"usage": {"prompt_tokens": -3, "completion_tokens": 1}})
    await handler.on_llm_end({"tokens_used": 10**13})
    s = await stats(store)
    assert (s["total_tokens"], s["calls"]) == (0, 2)
    assert handler.bad_input == 2


async def test_a_refused_call_is_not_an_error(store: Store) -> None:
    class Refuse(llmtally.AsyncCallbackHandler):
        async def on_llm_start(self, messages: Any, **kwargs: Any) -> None:
            raise BudgetExceeded(user_id="alice", limit=1, used=1, requested=1)

    meter = RedisTokenCallbackHandler("alice", CYCLE, store=store)
    with pytest.raises(BudgetExceeded):
        async with CallbackManager([meter, Refuse()]).llm_call(MESSAGES):
            pass
    s = await stats(store)
    assert (s["calls"], s["errors"]) == (0, 0)


async def test_usage_recorder_charges_each_calls_user(store: Store) -> None:
    manager = CallbackManager([UsageRecorder(store=store)])
    for user in ("alice", "bob", "alice", None):
        async with manager.llm_call(MESSAGES, user_id=user) as call:
            call.set_response({"prompt_tokens": 4, "completion_tokens": 1})
    async with manager.llm_call(MESSAGES, user_id="carol", cycle_start_date="2026-10-15") as call:
        call.set_response({"prompt_tokens": 4, "completion_tokens": 1})
    repo = TokenUsageRepository(store)
    cycle = llmtally.storage.keys.current_cycle()
    assert (await repo.get_usage_stats("alice", cycle))["total_tokens"] == 10
    assert (await repo.get_usage_stats("bob", cycle))["total_tokens"] == 5
    assert (await repo.get_usage_stats("anonymous", cycle))["total_tokens"] == 5
    assert (await repo.get_usage_stats("carol", "2026-10-15"))["calls"] == 1
    users = {r["user_id"] for r in await repo.list_usage(cycle)}
    assert users == {"alice", "bob", "anonymous"}


async def test_repository_methods(store: Store) -> None:
    repo = TokenUsageRepository(store)
    await repo.increment_total_usage("alice", 100, CYCLE)
    await repo.increment_detailed_usage("alice", 30, 20, CYCLE)
    s = await repo.get_usage_stats("alice", CYCLE)
    assert (s["total_tokens"], s["prompt_tokens"], s["completion_tokens"]) == (150, 30, 20)
    assert (s["cost_usd"], s["calls"], s["limit"]) == (0.0, 0, None)
    assert (await repo.check_usage_limit("alice", CYCLE))["allowed"] is True
    await repo.set_usage_limit("alice", 200, CYCLE)
    check = await repo.check_usage_limit("alice", CYCLE, requested=60)
    assert check == {
        "user_id": "alice",
        "cycle_start_date": CYCLE,
        "limit": 200,
        "current_usage": 150,
        "used": 150,
        "requested": 60,
        "remaining": 50,
        "exceeded": False,
        "allowed": False,
    }
    await repo.increment_total_usage("alice", 50, CYCLE)
    assert (await repo.check_usage_limit("alice", CYCLE))["exceeded"] is True
    await repo.reset_usage("alice", CYCLE)
    s = await repo.get_usage_stats("alice", CYCLE)
    assert (s["total_tokens"], s["limit"]) == (0, 200)  # the limit survives a reset
    await repo.set_usage_limit("alice", None, CYCLE)
    assert (await repo.get_usage_stats("alice", CYCLE))["limit"] is None
    with pytest.raises(ValueError):
        await repo.increment_total_usage("alice", -1)
    with pytest.raises(ValueError):
        await repo.increment_detailed_usage("", 1, 1)


async def test_manager_health_reports_the_store(store: Store) -> None:
    manager = CallbackManager(
        [
            RedisTokenCallbackHandler("alice", CYCLE, store=store),
            UsageRecorder(store=store),
        ]
    )
    async with manager.llm_call(MESSAGES, user_id="bob") as call:
        call.set_response({"prompt_tokens": 4, "completion_tokens": 1})
    health = await manager.health()
    assert health["status"] == "healthy"
    assert health["store"]["backend"] == store.backend.name
    assert health["store"]["ok"] is True
    assert health["pending_deltas"] == 2  # alice's and bob's keys, one store reported once
