"""One identity rule everywhere (DESIGN "Identity"), and tracker keys no name can forge."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import llmtally
from llmtally import BudgetExceeded, BudgetLimiter, CallbackManager, CostTracker, TokenCounter
from llmtally.identity import MAX_USER_ID_BYTES, charged_user, join_key, split_key

from helpers import Recorder

MESSAGES = [{"role": "user", "content": "hi"}]
USAGE = {"usage": {"prompt_tokens": 3, "completion_tokens": 2}}

ids = st.one_of(
    st.text(max_size=20),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=False),
    st.lists(st.integers(), max_size=3),
    st.just("x" * (MAX_USER_ID_BYTES + 1)),
)


def expected(value: Any) -> tuple[str, bool]:
    if isinstance(value, bool):
        return "anonymous", True
    if isinstance(value, int):
        return str(value), False
    if value is None or value == "":
        return "anonymous", False
    if isinstance(value, str):
        too_long = len(value.encode("utf-8", "surrogatepass")) > MAX_USER_ID_BYTES
        return ("anonymous", True) if too_long else (value, False)
    return "anonymous", True


@settings(max_examples=300, deadline=None)
@given(ids)
def test_the_rule_is_the_design_text(value: Any) -> None:
    assert charged_user(value) == expected(value)


@settings(max_examples=60, deadline=None)
@given(ids)
async def test_every_handler_charges_the_same_user(value: Any) -> None:
    rec, cost, store = Recorder(), CostTracker(), llmtally.open_store("memory://")
    recorder = llmtally.UsageRecorder(store=store)
    manager = CallbackManager([rec, cost, recorder])
    async with manager.llm_call(MESSAGES, model="gpt-4o", user_id=value) as call:
        call.set_response(USAGE)
    user, bad = expected(value)
    _, kwargs = rec.of("on_llm_end")[0]
    assert kwargs.get("user_id", "anonymous") == user
    assert list(cost.by_user()) == [user]
    cycle = llmtally.storage.keys.current_cycle()
    assert (await store.read(llmtally.storage.keys.usage_key(user, cycle)))["calls"] == 1
    assert (await manager.health())["bad_input"] == int(bad)
    await store.aclose()


async def test_an_int_user_is_limited_as_it_is_charged() -> None:
    """user_id=0 was charged to "anonymous" while the limiter checked "0": 20 calls passed a
    budget of 5."""
    store = llmtally.open_store("memory://")
    limiter = BudgetLimiter(max_tokens=25, store=store)
    manager = CallbackManager([llmtally.UsageRecorder(store=store), limiter])
    passed = 0
    for _ in range(20):
        try:
            async with manager.llm_call(
                MESSAGES, model="gpt-4o", user_id=0, estimated_tokens=5
            ) as call:
                call.set_response(USAGE)
            passed += 1
        except BudgetExceeded as refused:
            assert refused.user_id == "0"
    assert passed == 5
    assert (await limiter.remaining(0))["used"] == 25
    await store.aclose()


async def test_true_after_one_is_not_charged_to_one() -> None:
    cost = CostTracker()
    manager = CallbackManager([cost])
    for user in (1, True):
        async with manager.llm_call(MESSAGES, model="gpt-4o", user_id=user) as call:
            call.set_response(USAGE)
    assert cost.by_user()["1"]["total_tokens"] == 5
    assert cost.by_user()["anonymous"]["total_tokens"] == 5


@pytest.mark.parametrize("model", ["gpt-4o\x1falice", "gpt-4o\x1ealice", "a\x1e1b"])
async def test_a_model_name_cannot_move_usage_to_another_user(model: str) -> None:
    cost, tokens = CostTracker(), TokenCounter()
    manager = CallbackManager([cost, tokens])
    async with manager.llm_call(MESSAGES, model=model, user_id="mallory") as call:
        call.set_response(USAGE)
    assert list(cost.by_user()) == ["mallory"]
    for tracker in (cost, tokens):
        assert list(tracker.by_model()) == [model]


@given(
    st.lists(st.text(alphabet=st.sampled_from("ab\x1e\x1f01"), max_size=6), min_size=3, max_size=3)
)
def test_tracker_keys_round_trip(parts: list[str]) -> None:
    assert split_key(join_key(*parts)) == parts


async def test_a_request_id_whose_str_raises_never_breaks_the_call() -> None:
    class Hostile:
        def __str__(self) -> str:
            raise RuntimeError("no")

    tokens = TokenCounter()
    manager = CallbackManager([tokens])
    async with manager.llm_call(MESSAGES, model="gpt-4o", request_id=Hostile()) as call:
        call.set_response(USAGE)
    assert tokens.total_tokens == 5 and call.request_id
    assert (await manager.health())["bad_input"] == 1
