"""The LLM call scope in the core (``_core.CallScope``): the common call entered and exited
without a coroutine must give what the general path (Python's ``LLMCall``) gives, on every
call shape, and hand everything else over to it."""

from __future__ import annotations

import asyncio
import enum
import gc
import weakref
from typing import Any

import pytest

from llmtally import CallbackManager, CostTracker
from llmtally._calls import LLMCall
from llmtally._context import current_run
from llmtally._observe import state as _observed

from helpers import Recorder

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
USAGE = {"prompt_tokens": 14, "completion_tokens": 7, "total_tokens": 21}


class Provider(enum.Enum):
    OPENAI = "openai"


# (call kwargs, response): the shapes the core takes and the ones it hands to Python.
SHAPES: list[tuple[dict[str, Any], Any]] = [
    ({"provider": "openai", "model": "gpt-4o", "user_id": "alice"}, {"usage": USAGE}),
    ({}, {"usage": dict(USAGE, cost=0.000105)}),  # no kwargs: unknown provider and model
    ({"provider": None, "model": None}, {"usage": USAGE, "model": "gpt-4o"}),
    ({"provider": Provider.OPENAI, "model": "gpt-4o"}, {"usage": USAGE}),  # an enum provider
    ({"model": "gpt-4o", "user_id": "\ud800"}, {"usage": USAGE}),  # a surrogate user id
    ({"model": "gpt-4o", "user_id": ""}, {"usage": USAGE}),  # empty: no id
    ({"model": "gpt-4o", "user_id": None, "request_id": None}, {"usage": USAGE}),  # no values
    ({"model": "gpt-4o", "user_id": "u" * 5000}, {"usage": USAGE}),  # past the safe length
    ({"model": "gpt-4o", "request_id": "req-1"}, {"usage": USAGE}),  # the caller's request id
    ({"model": "gpt-4o", "request_id": "r" * 300}, {"usage": USAGE}),  # a long request id
    ({"model": "gpt-4o", "request_id": "é-1"}, {"usage": USAGE}),  # a non-ASCII request id
    ({"model": "gpt-4o"}, {"usage": USAGE, "model": "gpt-4o-mini"}),  # another model answered
    ({"model": "no-such-model-xyz"}, {"usage": USAGE}),  # unpriced
    (
        {"model": "gpt-4o"},
        {"usage": {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 3}},
    ),
    ({"model": "gpt-4o"}, {"choices": [{"message": {"content": "Paris"}}]}),  # no usage
    ({"model": "gpt-4o"}, None),  # not a response
]


def _stable(response: dict[str, Any] | None) -> dict[str, Any]:
    assert response is not None
    return {
        k: v for k, v in response.items() if k not in ("request_id", "response_time", "response_id")
    }


async def _one(manager: CallbackManager, kwargs: dict[str, Any], response: Any) -> LLMCall:
    async with manager.llm_call(MESSAGES, **dict(kwargs)) as call:
        call.set_response(response)
    return call


@pytest.mark.parametrize("core", ["recorded", "built"])
@pytest.mark.parametrize(("kwargs", "response"), SHAPES)
async def test_the_core_path_gives_what_the_general_path_gives(
    kwargs: dict[str, Any], response: Any, core: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Alone, CostTracker's end is one group of built-in recorders: the core records the end
    # ("recorded"). Next to a Python handler, the core builds the response and Python fires
    # the end ("built"). With metrics on, the general path (Python) does all of it: the
    # reference.
    fast_tracker, general_tracker = CostTracker(), CostTracker()
    recorder = Recorder()
    fast = CallbackManager([fast_tracker] if core == "recorded" else [fast_tracker, Recorder()])
    general = CallbackManager([general_tracker, recorder])
    a = await _one(fast, kwargs, response)
    monkeypatch.setattr(_observed, "on", True)
    b = await _one(general, kwargs, response)
    monkeypatch.setattr(_observed, "on", False)
    assert _stable(a.response) == _stable(b.response)
    assert a.usage_totals() == b.usage_totals()
    assert fast_tracker.summary() == general_tracker.summary()
    assert fast_tracker.total_cost_pusd == general_tracker.total_cost_pusd
    assert (a.provider, a.model) == (b.provider, b.model)
    context = {k: v for k, v in a.context.items() if k not in ("request_id", "run_id", "trace_id")}
    seen = {k: v for k, v in b.context.items() if k not in ("request_id", "run_id", "trace_id")}
    for key in ("token_count", "cost", "duration_ms"):  # what the general path's end adds
        seen.pop(key, None)
        context.pop(key, None)
    assert context == seen
    # The request id each path made, handed back by a retry: a duplicate on both.
    again = {k: v for k, v in kwargs.items() if k != "request_id"}
    await _one(fast, {**again, "request_id": a.request_id}, response)
    monkeypatch.setattr(_observed, "on", True)
    await _one(general, {**again, "request_id": b.request_id}, response)
    monkeypatch.setattr(_observed, "on", False)
    health_a, health_b = await fast.health(), await general.health()
    for key in ("llm_calls", "bad_input", "usage_warnings", "duplicates"):
        assert health_a[key] == health_b[key], key
    assert fast_tracker.summary() == general_tracker.summary()
    # The general path's handler saw the same kwargs the call reports.
    (_, start_kwargs) = recorder.of("on_llm_start")[0]
    assert start_kwargs["request_id"] == b.request_id and start_kwargs["run_id"] == b.run_id


async def test_ids_and_the_run_context_of_a_core_call() -> None:
    tracker = CostTracker()
    manager = CallbackManager([tracker])
    async with manager.agent_run("plan", user_id="alice", trace_id="t-1", team="blue") as agent:
        async with manager.llm_call(MESSAGES, model="gpt-4o") as call:
            assert current_run() == {
                "run_id": call.run_id,
                "user_id": "alice",
                "trace_id": "t-1",
                "team": "blue",
            }
            call.set_response({"usage": USAGE})
        assert current_run() is not None and current_run()["run_id"] == agent.run_id  # type: ignore[index]
    assert current_run() is None
    assert call.request_id == call.run_id != ""
    assert call.context["parent_run_id"] == agent.run_id
    assert call.context["user_id"] == "alice" and call.context["team"] == "blue"
    assert call.context["model"] == "gpt-4o" and call.context["provider"] == "unknown"
    assert tracker.request_count == 1 and tracker.total_tokens == 21
    # A run id given by a framework is kept; the request id is still made.
    async with manager.llm_call(MESSAGES, model="gpt-4o", run_id="lc-7") as call:
        call.set_response({"usage": USAGE})
    assert call.run_id == "lc-7" and call.request_id not in ("", "lc-7")
    assert tracker.request_count == 2


async def test_an_error_in_the_block_fires_one_error_and_is_raised() -> None:
    recorder = Recorder()
    manager = CallbackManager([CostTracker(), recorder])
    with pytest.raises(ValueError, match="boom"):
        async with manager.llm_call(MESSAGES, model="gpt-4o") as call:
            raise ValueError("boom")
    assert recorder.names() == ["on_llm_start", "on_llm_error"]
    assert call.ended
    # A second exit does nothing (and is still awaitable).
    assert await call.__aexit__(None, None, None) is None
    assert recorder.names() == ["on_llm_start", "on_llm_error"]


async def test_a_call_exited_in_another_context_than_it_entered_in() -> None:
    tracker = CostTracker()
    manager = CallbackManager([tracker])
    call = manager.llm_call(MESSAGES, model="gpt-4o")

    async def enter() -> None:
        await call.__aenter__()

    async def leave() -> None:
        call.set_response({"usage": USAGE})
        await call.__aexit__(None, None, None)
        assert current_run() is None

    await asyncio.create_task(enter())
    await asyncio.create_task(leave())
    assert tracker.request_count == 1 and tracker.total_tokens == 21


async def test_a_call_in_a_reference_cycle_is_collected() -> None:
    manager = CallbackManager([CostTracker()])
    async with manager.llm_call(MESSAGES, model="gpt-4o") as call:
        call.set_response({"usage": USAGE, "self": None})
    call._response["self"] = call  # a cycle through the response it holds
    ref = weakref.ref(call)
    del call
    gc.collect()
    assert ref() is None


async def test_the_core_awaitables_behave_as_awaitables() -> None:
    manager = CallbackManager([CostTracker()])
    call = manager.llm_call(MESSAGES, model="gpt-4o")
    entered = call.__aenter__()
    assert await entered is call
    call.set_response({"usage": USAGE})
    done = call.__aexit__(None, None, None)
    assert await done is None
    iterator = call.__aexit__(None, None, None).__await__()
    with pytest.raises(StopIteration):
        next(iterator)
    with pytest.raises(KeyError):
        iterator.throw(KeyError("x"))


async def test_a_call_is_entered_once_and_takes_attributes_of_the_callers() -> None:
    manager = CallbackManager([CostTracker()])
    call = manager.llm_call(MESSAGES, model="gpt-4o")
    call.tag = "mine"  # type: ignore[attr-defined]
    async with call:
        call.set_response({"usage": USAGE})
    assert call.tag == "mine"  # type: ignore[attr-defined]
    with pytest.raises(RuntimeError, match="entered once"):
        async with call:
            pass
    started = manager.llm_call(MESSAGES, model="gpt-4o")
    await started.start()
    with pytest.raises(RuntimeError, match="entered once"):
        await started.__aenter__()
    await started.end({"usage": USAGE})
    assert (await manager.health())["llm_calls"] == 2


async def test_a_replaced_response_may_read_the_call_when_it_goes() -> None:
    manager = CallbackManager([CostTracker()])
    seen: list[Any] = []

    class Response(dict[str, Any]):
        def __del__(self) -> None:
            seen.append(call.request_id)  # reads the call while it replaces this one

    async with manager.llm_call(MESSAGES, model="gpt-4o") as call:
        call.set_response(Response(usage=USAGE))
        call.set_response({"usage": USAGE})
        gc.collect()
    assert seen == [call.request_id]


async def test_a_run_id_with_a_lone_surrogate_is_kept() -> None:
    manager = CallbackManager([CostTracker()])
    async with manager.llm_call(MESSAGES, model="gpt-4o", run_id="\ud800x") as call:
        call.set_response({"usage": USAGE})
    assert call.run_id == "\ud800x" and call.context["trace_id"] == "\ud800x"
