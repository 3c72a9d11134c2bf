"""Exactly one end or error per started call, whatever the caller does; the public start/end API
for callback-shaped code."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from typing import Any

import pytest

import llmtally
from llmtally import CallbackManager, TokenCounter

from helpers import Recorder

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


async def test_start_then_end_fires_once_whatever_is_called_after() -> None:
    rec = Recorder()
    manager = CallbackManager([rec])
    call = manager.llm_call(MESSAGES, model="gpt-4o", user_id="alice")
    assert await call.start() is call
    assert not call.ended
    response = await call.end({"usage": {"prompt_tokens": 7, "completion_tokens": 3}})
    assert response is not None and response["tokens_used"] == 10
    assert call.ended
    await call.end({"usage": {"prompt_tokens": 70, "completion_tokens": 30}})
    await call.fail(RuntimeError("late"))
    await call.abandon()
    assert rec.names() == ["on_llm_start", "on_llm_end"]
    assert call.context["user_id"] == "alice"
    with pytest.raises(TypeError):
        call.context["user_id"] = "mallory"  # type: ignore[index]


async def test_fail_fires_one_error_and_nothing_after() -> None:
    rec = Recorder()
    call = await CallbackManager([rec]).llm_call(MESSAGES).start()
    await call.fail(TimeoutError("slow"))
    await call.end({"usage": {"prompt_tokens": 1, "completion_tokens": 1}})
    assert rec.names() == ["on_llm_start", "on_llm_error"]


async def test_a_refused_start_ends_the_call() -> None:
    class Refuse(llmtally.AsyncCallbackHandler):
        async def on_llm_start(self, messages: Any, **kwargs: Any) -> None:
            raise llmtally.CallbackAbort("no")

    rec = Recorder()
    call = CallbackManager([rec, Refuse()]).llm_call(MESSAGES)
    with pytest.raises(llmtally.CallbackAbort):
        await call.start()
    assert call.ended
    await call.end({"usage": {"prompt_tokens": 1, "completion_tokens": 1}})
    assert rec.names() == ["on_llm_start", "on_llm_error"]  # told once, as before


async def test_an_unstoppable_start_stays_open_and_its_end_counts() -> None:
    class Refuse(llmtally.AsyncCallbackHandler):
        async def on_llm_start(self, messages: Any, **kwargs: Any) -> None:
            raise llmtally.CallbackAbort("no")

    tokens = TokenCounter()
    call = CallbackManager([tokens, Refuse()]).llm_call(MESSAGES, model="gpt-4o")
    with pytest.raises(llmtally.CallbackAbort):
        await call.start(stoppable=False)
    assert not call.ended
    await call.end({"usage": {"prompt_tokens": 7, "completion_tokens": 3}})
    assert (tokens.requests, tokens.total_tokens) == (1, 10)


async def test_abandon_ends_with_the_usage_seen_so_far_marked_estimated() -> None:
    rec = Recorder()
    manager = CallbackManager([rec])
    call = await manager.llm_call(MESSAGES, provider="anthropic", model="claude-sonnet-4").start()
    await call.chunk(
        {
            "type": "message_start",
            "message": {
                "usage": {"input_tokens": 50, "output_tokens": 1, "cache_read_input_tokens": 10000}
            },
        }
    )
    await call.chunk({"type": "content_block_delta", "delta": {"type": "text_delta", "text": "Pa"}})
    await call.abandon()
    (response,), _ = rec.of("on_llm_end")[0]
    assert response["estimated"] is True and response["finish_reason"] == "abandoned"
    assert response["prompt_tokens"] == 10050 and response["cached_tokens"] == 10000
    assert response["completion_tokens"] >= 1
    assert (await manager.health())["abandoned_calls"] == 1


async def test_abandon_without_any_usage_is_an_estimate() -> None:
    rec = Recorder()
    call = await CallbackManager([rec]).llm_call(MESSAGES, model="gpt-4o").start()
    await call.chunk("Paris is the capital")
    await call.abandon()
    (response,), _ = rec.of("on_llm_end")[0]
    assert response["estimated"] is True and response["finish_reason"] == "abandoned"
    assert response["prompt_tokens"] == llmtally.estimate_tokens(MESSAGES, "gpt-4o")
    assert response["completion_tokens"] == llmtally.estimate_tokens("Paris is the capital")


async def test_a_generator_closed_inside_the_call_ends_it_as_abandoned() -> None:
    """``async with manager.llm_call(...)`` inside an async generator that its consumer leaves
    (break, then the generator is closed): the call ends, abandoned, not silently dropped."""
    rec = Recorder()
    manager = CallbackManager([rec])

    async def tokens() -> AsyncIterator[str]:
        async with manager.llm_call(MESSAGES, model="gpt-4o") as call:
            for word in ["Paris", " is", " the", " capital"]:
                await call.chunk(word)
                yield word

    stream = tokens()
    async for word in stream:
        if word == " is":
            break
    await stream.aclose()
    assert rec.names() == [
        "on_llm_start",
        "on_llm_stream_chunk",
        "on_llm_stream_chunk",
        "on_llm_end",
    ]
    (response,), _ = rec.of("on_llm_end")[0]
    assert response["finish_reason"] == "abandoned" and response["estimated"] is True
    assert response["content"] == "Paris is"


async def test_cancellation_fires_one_error() -> None:
    rec = Recorder()
    manager = CallbackManager([rec])
    started = asyncio.Event()

    async def call() -> None:
        async with manager.llm_call(MESSAGES):
            started.set()
            await asyncio.sleep(3600)

    task = asyncio.create_task(call())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert rec.names() == ["on_llm_start", "on_llm_error"]


def test_calls_left_open_are_ended_at_exit_and_their_usage_is_written(tmp_path: Any) -> None:
    code = """
    import asyncio, sys, llmtally
    store = llmtally.open_store(sys.argv[1])
    manager = llmtally.CallbackManager([llmtally.UsageRecorder(store=store)])
    async def main():
        call = manager.llm_call([{"role": "user", "content": "hi"}], model="gpt-4o",
                                user_id="alice", cycle_start_date="2026-12-01")
        await call.start()
        await call.chunk("Paris is the capital of France")
        return call  # never ended
    keep = asyncio.run(main())
    """
    url = f"sqlite:///{tmp_path}/exit.db"
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    read = """
    import asyncio, json, sys, llmtally
    repo = llmtally.TokenUsageRepository(store=sys.argv[1])
    print(json.dumps(asyncio.run(repo.get_usage_stats("alice", "2026-12-01"))))
    """
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(read), url],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    stats = json.loads(out)
    assert stats["calls"] == 1
    assert stats["completion_tokens"] == llmtally.estimate_tokens("Paris is the capital of France")


async def test_an_integration_with_too_many_open_runs_ends_the_oldest_as_abandoned() -> None:
    from llmtally._runtime import runner
    from llmtally.integrations._runs import OpenRuns

    rec = Recorder()
    manager = CallbackManager([rec])
    runs: OpenRuns[Any] = OpenRuns(2, "test runs", lambda call: runner.submit(call.abandon()))
    calls = [await manager.llm_call(MESSAGES, request_id=f"r{i}").start() for i in range(3)]
    for i, call in enumerate(calls):
        runs.put(f"r{i}", call)
    assert runs.evicted == 1 and len(runs) == 2 and runs.pop("r0") is None
    for _ in range(200):
        if calls[0].ended:
            break
        await asyncio.sleep(0.01)
    ends = rec.of("on_llm_end")
    assert [kwargs["request_id"] for _, kwargs in ends] == ["r0"]
    assert ends[0][0][0]["finish_reason"] == "abandoned"
    assert not calls[1].ended and not calls[2].ended


def test_sync_code_inside_a_handler_waits_for_its_events_and_sees_a_refusal() -> None:
    """A sync instrumented client called from a handler that runs on the background loop:
    its start must finish (and a refusal reach it) before the request, its end after."""
    from llmtally._runtime import runner

    order: list[str] = []

    async def refuse() -> None:
        await asyncio.sleep(0.02)
        order.append("start")
        raise llmtally.BudgetExceeded("alice", limit=1, used=1, requested=1, unit="tokens")

    async def end() -> None:
        order.append("end")

    async def handler_doing_sync_work() -> str:
        with pytest.raises(llmtally.BudgetExceeded):
            runner.run(refuse())
        runner.run(end())
        return "done"

    assert runner.run(handler_doing_sync_work()) == "done"
    assert order == ["start", "end"]


async def test_a_multibyte_model_name_is_capped_alike_on_both_paths() -> None:
    name = "é" * 200  # 200 characters, 400 bytes: under the 256-character cap
    llmtally.register_model(name, provider="openai", input_price=1.0, output_price=2.0)

    class Own(TokenCounter):  # a subclass takes the handler's own path
        pass

    core, own = TokenCounter(), Own()
    for tracker in (core, own):
        manager = CallbackManager([tracker])
        async with manager.llm_call(MESSAGES, provider="openai", model=name) as call:
            call.set_response({"usage": {"prompt_tokens": 3, "completion_tokens": 2}})
    assert list(core.by_model()) == list(own.by_model()) == [name]


async def test_a_call_cancelled_while_its_start_handlers_run_ends_with_an_error() -> None:
    """Cancelled (a timeout, task.cancel) while a handler's on_llm_start awaits: the call never
    ran, and every handler sees an error for it, never a start alone."""

    class SlowStart(llmtally.AsyncCallbackHandler):
        def __init__(self) -> None:
            self.events: list[str] = []

        async def on_llm_start(self, messages: Any, **kwargs: Any) -> None:
            self.events.append("start")
            await asyncio.sleep(5)

        async def on_llm_end(self, response: Any, **kwargs: Any) -> None:
            self.events.append("end")

        async def on_llm_error(self, error: BaseException, **kwargs: Any) -> None:
            self.events.append(f"error:{type(error).__name__}")

    slow, rec = SlowStart(), Recorder()
    manager = CallbackManager([slow, rec], parallel=True)

    async def scoped() -> None:
        async with manager.llm_call(MESSAGES, model="gpt-4o", user_id="u") as call:
            call.set_response({"usage": {"prompt_tokens": 1, "completion_tokens": 1}})

    with pytest.raises(TimeoutError):
        await asyncio.wait_for(scoped(), 0.05)
    started = manager.llm_call(MESSAGES, model="gpt-4o")
    task = asyncio.create_task(started.start())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert started.ended
    assert slow.events == ["start", "error:CancelledError"] * 2
    assert rec.names() == ["on_llm_start", "on_llm_error"] * 2
    health = await manager.health()
    assert (health["llm_calls"], health["llm_errors"]) == (0, 2)
