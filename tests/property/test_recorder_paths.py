"""The manager's one-crossing recorder (the core's ``Recorder``) against each built-in handler's
own recorder: for any call, both paths leave every accumulator with the same numbers."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmtally import (
    CallbackManager,
    CostTracker,
    PerformanceTracker,
    RedisTokenCallbackHandler,
    TokenCounter,
    UsageRecorder,
    open_store,
)
from llmtally.dispatch import GROUP
from llmtally.storage import Store

from helpers import Recorder as Spy


@pytest.fixture(autouse=True, params=["metrics off", "metrics on"])
def metrics(request: pytest.FixtureRequest) -> Iterator[None]:
    """Both ways: with Prometheus metrics on, the manager also times and counts each end."""
    from llmtally._observe import state as observed

    was = observed.on
    observed.on = request.param == "metrics on"
    yield
    observed.on = was


counts = st.one_of(
    st.integers(min_value=0, max_value=10**6),
    st.none(),
    st.just(-1),
    st.just(10**12),
    st.just("12"),
    st.just(1.5),
)
usage = st.fixed_dictionaries(
    {},
    optional={
        "prompt_tokens": counts,
        "completion_tokens": counts,
        "total_tokens": counts,
        "cost": st.one_of(st.floats(min_value=0, max_value=10.0), st.none()),
        "prompt_tokens_details": st.fixed_dictionaries({"cached_tokens": counts}),
        "completion_tokens_details": st.fixed_dictionaries({"reasoning_tokens": counts}),
    },
)
calls = st.lists(
    st.fixed_dictionaries(
        {
            "usage": usage,
            "model": st.sampled_from(["gpt-4o", "gpt-4o-mini", "no-such-model", None]),
            "provider": st.sampled_from(["openai", None]),
            "user_id": st.sampled_from(["alice", "bob", "ü ser}", None, 7]),
            "request_id": st.sampled_from([None, None, "r-1", "r-2"]),
            "cycle": st.sampled_from([None, None, "2026-05-15"]),
            "response_kind": st.sampled_from(["usage", "usage", "bare", "text", "list"]),
            # The model the response names: the call's, another priced one, an unpriced one.
            "response_model": st.sampled_from(["same", "same", "gpt-4o", "no-such-model-2"]),
        }
    ),
    min_size=1,
    max_size=25,
)


def handlers(store: Store, perf_clock: bool) -> list[Any]:
    return [
        RedisTokenCallbackHandler("alice", store=store),
        RedisTokenCallbackHandler("carol", "2026-02-03", store=store),
        UsageRecorder(store=store),
        CostTracker(),
        TokenCounter(),
        PerformanceTracker(clock=(lambda: 5000.0) if perf_clock else None),
    ]


def state(store: Store, hs: list[Any], *, timings: bool = True) -> dict[str, Any]:
    ledger = store.ledger
    perf: PerformanceTracker = hs[5]
    out: dict[str, Any] = {"store": {k: ledger.get(k) for k in ledger.keys()}}  # noqa: SIM118
    for i in (3, 4):
        lg = hs[i]._ledger
        out[f"tracker{i}"] = {k: lg.get(k) for k in lg.keys()}  # noqa: SIM118
    out["unpriced"] = (hs[3].unpriced_requests, hs[3].unpriced_models)
    out["bad_input"] = [getattr(h, "bad_input", None) for h in hs]
    out["duplicates"] = [getattr(h, "duplicates", None) for h in hs[:3]]
    keys = ["requests", "errors", "requests_per_min"]
    if timings:  # the same events fed to both: the same durations
        keys += ["latency_max_ms", "latency_p50_ms", "ttft_p50_ms", "tokens_per_s"]
    for model in perf.models():
        s = perf.stats(model)
        out[f"perf:{model}"] = {k: s[k] for k in keys}
    return out


def response_of(call: dict[str, Any]) -> Any:
    kind = call["response_kind"]
    if kind == "usage":
        named = call["response_model"]
        return {"usage": call["usage"], "model": call["model"] if named == "same" else named}
    if kind == "bare":
        return {"choices": [{"message": {"content": "Paris is the capital."}}]}
    if kind == "text":
        return "Paris"
    return [1, 2]


async def run(spec: list[dict[str, Any]], *, stream: bool) -> None:
    # The ledgers are compared: no flush may drain one of them in between.
    group_store = open_store("memory://", flush_interval_s=3600)
    own_store = open_store("memory://", flush_interval_s=3600)
    grouped = handlers(group_store, perf_clock=False)
    own = handlers(own_store, perf_clock=False)
    spy = Spy()
    manager = CallbackManager([*grouped, spy])
    end_targets = manager._current_table().by_event["on_llm_end"]
    assert end_targets[0][2] == GROUP
    for call in spec:
        context = {k: call[k] for k in ("user_id", "request_id") if call[k] is not None}
        if call["cycle"] is not None:
            context["cycle_start_date"] = call["cycle"]
        async with manager.llm_call(
            [{"role": "user", "content": "What is the capital of France?"}],
            provider=call["provider"],
            model=call["model"],
            **context,
        ) as c:
            if stream:
                await c.chunk("Par")
            c.set_response(response_of(call))
    ends = spy.of("on_llm_end")
    assert len(ends) == manager._stats.llm_calls
    for (response,), kwargs in ends:
        # The same event through each handler's own recorder; durations as the manager gave.
        for h in own:
            fn = getattr(h, h._llmtally_fast["on_llm_end"])
            fn(response, kwargs)
    a, b = state(group_store, grouped), state(own_store, own)
    assert a == b
    await group_store.aclose()
    await own_store.aclose()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(calls, st.booleans())
def test_one_crossing_records_what_each_handler_would(
    spec: list[dict[str, Any]], stream: bool
) -> None:
    asyncio.run(run(spec, stream=stream))


async def test_the_common_case_takes_the_core_path() -> None:
    """Through a manager, a metered call is written by the core's recorder, not by the handlers'
    Python recorders (which would raise here)."""
    store = open_store("memory://")
    hs = handlers(store, perf_clock=False)

    def refuse(*args: Any) -> None:
        raise AssertionError("the handler's own recorder ran")

    for h in hs:
        setattr(h, h._llmtally_fast["on_llm_end"], refuse)
    manager = CallbackManager(hs)  # tables are built with the patched recorders
    for _ in range(3):
        async with manager.llm_call(
            [{"role": "user", "content": "hi"}], provider="openai", model="gpt-4o", user_id="bob"
        ) as c:
            c.set_response({"usage": {"prompt_tokens": 10, "completion_tokens": 5}})
    health = await manager.health()
    assert health["errors"] == 0
    assert hs[3].request_count == 3 and hs[3].total_tokens == 45
    assert hs[3].total_cost == pytest.approx(3 * (10 * 2.5 + 5 * 10) / 1e6)
    assert hs[4].total_tokens == 45
    assert hs[5].stats()["requests"] == 3
    assert store.ledger.get("llmtally:{bob}:" + hs[0].cycle_start_date)[:3] == (45, 30, 15)
    assert store.ledger.get("llmtally:{alice}:" + hs[0].cycle_start_date)[7] == 3
    await store.aclose()


@pytest.mark.parametrize(
    ("context", "body_model", "priced"),
    [
        ({}, None, False),  # llm_call(messages) alone: model "unknown"
        ({"model": "in-house-model-x"}, None, False),  # a model without a price
        ({}, "gpt-4o", True),  # the response names the model the call did not
        ({"model": "gpt-4o"}, "gpt-4o-mini", True),  # the response names another model
    ],
)
async def test_every_call_shape_takes_the_core_path(
    context: dict[str, Any], body_model: str | None, priced: bool
) -> None:
    """No context kwargs, an unpriced model, a response naming another model: the core records
    them too (the handlers' own recorders would raise here), with the general path's numbers."""
    store = open_store("memory://")
    hs = handlers(store, perf_clock=False)

    def refuse(*args: Any) -> None:
        raise AssertionError("the handler's own recorder ran")

    for h in hs:
        setattr(h, h._llmtally_fast["on_llm_end"], refuse)
    manager = CallbackManager(hs)
    body: dict[str, Any] = {"usage": {"prompt_tokens": 10, "completion_tokens": 5}}
    if body_model is not None:
        body["model"] = body_model
    async with manager.llm_call([{"role": "user", "content": "hi"}], **context) as c:
        c.set_response(body)
    assert (await manager.health())["errors"] == 0
    cost: CostTracker = hs[3]
    assert cost.request_count == 1 and cost.total_tokens == 15
    assert (cost.unpriced_requests, cost.total_cost_pusd > 0) == (0 if priced else 1, priced)
    assert c.response is not None
    assert (c.response["cost_estimate"] is not None) is priced
    if body_model is not None:
        assert list(cost.by_model()) == [body_model] == [c.response["model"]]
    await store.aclose()


async def test_an_overflow_is_counted_on_its_handler_and_the_others_still_record() -> None:
    store = open_store("memory://")
    seed = RedisTokenCallbackHandler("alice", store=store)
    cost = CostTracker()
    manager = CallbackManager([seed, cost])
    key = "llmtally:{alice}:" + seed.cycle_start_date
    store.ledger.add(key, total_tokens=2**63 - 10)
    async with manager.llm_call(
        [{"role": "user", "content": "hi"}], provider="openai", model="gpt-4o"
    ) as c:
        c.set_response({"usage": {"prompt_tokens": 10, "completion_tokens": 5}})
    health = await manager.health()
    assert health["errors"] == 1
    assert [h["errors"] for h in health["per_handler"]] == [1, 0]
    assert store.ledger.get(key)[0] == 2**63 - 10  # refused whole, never wrapped
    assert cost.request_count == 1 and cost.total_tokens == 15
    store.ledger.drain()
    await store.aclose()


bodies = st.fixed_dictionaries(
    {"usage": usage},
    optional={
        "model": st.sampled_from(["gpt-4o", "gpt-4o-mini", "", None, 5]),
        "choices": st.sampled_from(
            [
                [{"message": {"content": "Paris."}}],
                [{"message": {"content": "Paris."}, "finish_reason": "stop"}],
                [],
            ]
        ),
        "id": st.sampled_from(["chatcmpl-9", 5, None]),
        "stop_reason": st.sampled_from(["end_turn", None]),
    },
)


async def run_lazy(spec: list[tuple[dict[str, Any], str | None, str | None]]) -> None:
    """A manager with only built-in recorders builds the response dict only when read; it is
    the same dict, and the same numbers, as a manager whose user handler needs it at once."""
    lazy_store = open_store("memory://", flush_interval_s=3600)  # ledgers compared: no flush
    eager_store = open_store("memory://", flush_interval_s=3600)
    lazy_hs, eager_hs = handlers(lazy_store, False), handlers(eager_store, False)
    lazy = CallbackManager(lazy_hs)
    eager = CallbackManager([*eager_hs, Spy()])
    assert lazy._current_table().end_group is not None
    assert eager._current_table().end_group is None
    for body, model, user in spec:
        context = {} if user is None else {"user_id": user}
        calls = []
        for manager in (lazy, eager):
            async with manager.llm_call(None, provider="openai", model=model, **context) as c:
                c.set_response(body)
            calls.append(c)
        a, b = (dict(c.response or {}) for c in calls)
        for d in (a, b):
            d.pop("request_id", None)
            d.pop("response_time", None)
        assert a == b
        assert list(a) == list(b)  # same keys in the same order
        assert calls[0].usage == calls[1].usage
    # Two managers time their own calls: the counts agree, not the latencies.
    assert state(lazy_store, lazy_hs, timings=False) == state(eager_store, eager_hs, timings=False)
    assert (await lazy.health())["llm_calls"] == (await eager.health())["llm_calls"]
    await lazy_store.aclose()
    await eager_store.aclose()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            bodies,
            st.sampled_from(["gpt-4o", "claude-sonnet-4-5", "no-such-model", None]),
            st.sampled_from(["alice", None, ""]),
        ),
        min_size=1,
        max_size=12,
    )
)
def test_the_lazy_response_is_the_eager_one(
    spec: list[tuple[dict[str, Any], str | None, str | None]],
) -> None:
    asyncio.run(run_lazy(spec))
