"""Edges of the hot path: forks, context leaks, odd inputs with metrics on, subclasses of the
built-in handlers, flushers left in closed loops."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

import llmtally
from llmtally import (
    CallbackManager,
    CompositeCallbackHandler,
    RedisTokenCallbackHandler,
    TokenCounter,
    dispatch,
    open_store,
)
from llmtally._observe import state as observed

from helpers import MESSAGES, Recorder

USAGE = {"usage": {"prompt_tokens": 10, "completion_tokens": 5}}


@pytest.fixture(params=["metrics off", "metrics on"])
def metrics(request: pytest.FixtureRequest) -> Any:
    was = observed.on
    observed.on = request.param == "metrics on"
    yield
    observed.on = was


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
async def test_a_composite_built_before_a_fork_meters_into_the_childs_store(
    tmp_path: Path,
) -> None:
    store = open_store(f"sqlite:///{tmp_path}/composite.db", flush_interval_s=3600)
    composite = CompositeCallbackHandler(
        [RedisTokenCallbackHandler("comp", "2026-11-01", store=store), TokenCounter()]
    )
    manager = CallbackManager([composite])
    async with manager.llm_call(MESSAGES, model="gpt-4o") as call:
        call.set_response(USAGE)
    pid = os.fork()
    if pid == 0:
        code = 0
        try:

            async def child() -> None:
                async with manager.llm_call(MESSAGES, model="gpt-4o") as c:
                    c.set_response(USAGE)
                await store.aclose()

            asyncio.run(child())
        except BaseException:
            code = 1
        os._exit(code)
    _, status = await asyncio.to_thread(os.waitpid, pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    await store.flush()
    row = await store.read("llmtally:{comp}:2026-11-01")
    assert (row["total_tokens"], row["calls"]) == (30, 2)
    await store.aclose()


async def test_an_ended_calls_end_fields_never_reach_tasks_it_started(metrics: Any) -> None:
    """A task started inside a streamed call keeps that call as its parent: after the call
    ends, what it and its own calls inherit has no ``ttft_ms``, ``token_count`` or ``cost``."""
    rec = Recorder()
    perf = llmtally.PerformanceTracker()
    manager = CallbackManager([rec, perf])
    go = asyncio.Event()
    seen: dict[str, Any] = {}

    async def later() -> None:
        await go.wait()
        seen["current"] = llmtally.current_run()
        async with manager.llm_call(MESSAGES, model="gpt-4o") as inner:
            inner.set_response(USAGE)

    async with manager.llm_call(MESSAGES, model="gpt-4o", user_id="u1") as call:
        await call.chunk("Par")
        task = asyncio.create_task(later())
        call.set_response(USAGE)
    go.set()
    await task
    assert seen["current"] is not None
    assert not {"ttft_ms", "token_count", "cost", "duration_ms"} & set(seen["current"])
    assert seen["current"]["user_id"] == "u1"  # the rest is inherited as before
    (_, outer_kwargs), (_, inner_kwargs) = rec.of("on_llm_end")
    assert "ttft_ms" in outer_kwargs and "ttft_ms" not in inner_kwargs
    assert perf.stats()["requests"] == 2
    assert perf.stats("gpt-4o")["ttft_p50_ms"] is not None
    # one streamed call: one time to first token
    assert perf._models["gpt-4o"].ttft.count == 1


class _BadHash(str):
    def __hash__(self) -> int:
        raise ValueError("no hash")


@pytest.mark.parametrize("user_id", ["\ud800", _BadHash("bad-hash"), ["a", "list"], 42], ids=str)
async def test_odd_user_ids_and_models_never_break_a_call(metrics: Any, user_id: Any) -> None:
    manager = CallbackManager([TokenCounter()])
    async with manager.llm_call(MESSAGES, model="gpt\ud800", user_id=user_id) as call:
        call.set_response(USAGE)
    assert call.response is not None and call.response["tokens_used"] == 15
    with pytest.raises(KeyError):  # the caller's own error, unchanged
        async with manager.llm_call(MESSAGES, model="gpt-4o", user_id=user_id):
            raise KeyError("caller")


async def test_a_model_that_is_not_a_string_is_counted_under_its_text() -> None:
    counter = TokenCounter()
    manager = CallbackManager([counter])
    async with manager.llm_call(MESSAGES, model=["gpt-4o"]) as call:  # type: ignore[arg-type]
        call.set_response(USAGE)
    assert counter.total_tokens == 15
    assert (await manager.health())["bad_input"] == 1


class _Choice:
    message = type("M", (), {"content": "Paris."})()

    @property
    def finish_reason(self) -> str:
        raise RuntimeError("lazy SDK field blew up")


class _Raising:
    """An SDK-like response whose optional fields (id, finish reason) raise when read."""

    def __init__(self) -> None:
        self.usage = type("U", (), {"prompt_tokens": 10, "completion_tokens": 5})()
        self.model = "gpt-4o"
        self.choices = [_Choice()]

    @property
    def id(self) -> str:
        raise RuntimeError("lazy SDK field blew up")


async def test_optional_fields_that_raise_cost_nothing(metrics: Any) -> None:
    for handlers in ([TokenCounter()], [TokenCounter(), Recorder()]):
        manager = CallbackManager(handlers)
        async with manager.llm_call(MESSAGES, provider="openai", model="gpt-4o") as call:
            call.set_response(_Raising())
        response = call.response
        assert response is not None
        assert (response["tokens_used"], response["estimated"]) == (15, False)
        assert "response_id" not in response and "finish_reason" not in response
        assert handlers[0].total_tokens == 15


async def test_a_bad_usage_call_is_one_request() -> None:
    counter = TokenCounter()
    manager = CallbackManager([counter])
    async with manager.llm_call(MESSAGES, model="gpt-4o") as call:
        call.set_response({"usage": {"prompt_tokens": -1, "completion_tokens": 5}})
    assert counter.requests == 1 and counter.total_tokens == 0


async def test_a_subclass_of_a_built_in_handler_keeps_its_own_methods() -> None:
    class Counted(TokenCounter):
        ends = 0

        async def on_llm_end(self, response: Any, **kwargs: Any) -> None:
            Counted.ends += 1
            await super().on_llm_end(response, **kwargs)

    class Doubled(TokenCounter):
        def _track_end(self, response: Any, kwargs: Any) -> None:
            super()._track_end(response, kwargs)
            super()._track_end(response, kwargs)

    counted, doubled, plain = Counted(), Doubled(), TokenCounter()
    manager = CallbackManager([counted, doubled, plain])
    for _ in range(3):
        async with manager.llm_call(MESSAGES, provider="openai", model="gpt-4o") as call:
            call.set_response(USAGE)
    assert Counted.ends == 3 and counted.total_tokens == 45
    assert doubled.total_tokens == 90  # its own recorder ran, not the group's
    assert plain.total_tokens == 45
    # Only the plain TokenCounter is in the core's group; the subclasses run on their own.
    kinds = {e.handler: kind for e, _, kind in manager._current_table().by_event["on_llm_end"]}
    assert kinds == {counted: dispatch.ASYNC, doubled: dispatch.FAST, plain: dispatch.GROUP}


async def test_a_flusher_left_in_a_closed_loop_is_replaced_at_once(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path}/loops.db", flush_interval_s=0.01)
    manager = CallbackManager([RedisTokenCallbackHandler("loops", "2026-11-01", store=store)])

    async def one() -> None:
        async with manager.llm_call(MESSAGES, model="gpt-4o") as call:
            call.set_response(USAGE)

    def in_a_closed_loop() -> None:
        loop = asyncio.new_event_loop()
        loop.run_until_complete(one())
        loop.close()  # its flusher task is left pending, never cancelled

    await asyncio.to_thread(in_a_closed_loop)
    before = store.batches_written
    await one()  # within the 10 ms loop check: the closed loop is seen at once
    await asyncio.sleep(0.2)
    assert store.batches_written > before
    assert (await store.read("llmtally:{loops}:2026-11-01"))["calls"] == 2
    await store.aclose()
