"""llmtally.litellm against the real LiteLLM, calling tests/fakellm.py over loopback (no
network: LiteLLM reads its bundled price map)."""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # before LiteLLM is imported
pytest.importorskip("litellm")

import litellm

import fakellm
import llmtally
from fakellm import USAGE, FakeLLM
from llmtally import TokenUsageRepository, open_store
from llmtally.errors import BudgetExceeded, CallbackAbort
from llmtally.litellm import LlmtallyLogger, response_dict

from helpers import Failing, Recorder

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
# gpt-4o in LiteLLM's map (and llmtally's): 2.50 USD / 1M input, 1.25 cached, 10.00 output.
COST = 0.00472  # 176 x 2.50 + 1024 x 1.25 + 300 x 10.00, per 1M
COUNTS = (1500, 1200, 300, 1024, 0, 256)

_GLOBAL_LISTS = (
    "callbacks",
    "input_callback",
    "success_callback",
    "failure_callback",
    "_async_input_callback",
    "_async_success_callback",
    "_async_failure_callback",
)


@pytest.fixture(autouse=True)
def _restore_litellm_callbacks() -> Iterator[None]:
    """LiteLLM copies every callback it sees into several global lists: put them all back."""
    saved = {name: list(getattr(litellm, name)) for name in _GLOBAL_LISTS}
    yield
    for name, value in saved.items():
        setattr(litellm, name, value)


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeLLM]:
    server = FakeLLM()
    yield server
    server.close()


@pytest.fixture
async def store() -> AsyncIterator[Any]:
    s = open_store("memory://", flush_interval_s=3600)
    yield s
    await s.aclose()


def use(*handlers: Any, **kwargs: Any) -> LlmtallyLogger:
    logger = LlmtallyLogger(list(handlers), **kwargs)
    litellm.callbacks = [logger]
    return logger


def call_kwargs(fake: FakeLLM, **extra: Any) -> dict[str, Any]:
    return {
        "model": "openai/gpt-4o",
        "api_base": fake.url + "/v1",
        "api_key": "x",
        "messages": MESSAGES,
        "max_retries": 0,
        **extra,
    }


def counts(response: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(
        response.get(k)
        for k in ("tokens_used", "prompt_tokens", "completion_tokens", "cached_tokens",
                  "cache_write_tokens", "reasoning_tokens")
    )  # fmt: skip


def wait_for(predicate: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


async def stats(store: Any, user: str) -> dict[str, Any]:
    return await TokenUsageRepository(store).get_usage_stats(user)


# ---------------------------------------------------------------------------------------------
# Success: usage, provider cost, request id, store.


async def test_acompletion_is_counted_once_with_litellm_usage_and_cost(
    fake: FakeLLM, store: Any
) -> None:
    rec, cost, tokens = Recorder(), llmtally.CostTracker(), llmtally.TokenCounter()
    meter = llmtally.RedisTokenCallbackHandler("bob", store=store)
    logger = use(rec, cost, tokens, meter, team="search")
    result = await litellm.acompletion(**call_kwargs(fake, user="bob"))
    assert result.choices[0].message.content == "Paris."
    assert await logger.drain()

    assert rec.names() == ["on_llm_start", "on_llm_end"]
    (messages,), start = rec.of("on_llm_start")[0]
    assert messages == MESSAGES
    assert (start["provider"], start["model"], start["user_id"]) == ("openai", "gpt-4o", "bob")
    assert start["team"] == "search"
    (response,), end = rec.of("on_llm_end")[0]
    assert counts(response) == COUNTS
    assert response["estimated"] is False and response["content"] == "Paris."
    # LiteLLM's response_cost is the provider's cost: it wins over llmtally's table.
    assert result._hidden_params["response_cost"] == pytest.approx(COST)
    assert response["cost_estimate"] == result._hidden_params["response_cost"]
    assert response["cost_source"] == "provider" and end["cost"] == response["cost_estimate"]
    call_id = result._hidden_params["litellm_call_id"]
    assert end["request_id"] == start["request_id"] == end["run_id"] == call_id
    assert 0 < response["response_time"] < 10

    assert (tokens.requests, tokens.total_tokens, tokens.cached_tokens) == (1, 1500, 1024)
    assert cost.by_user()["bob"]["cost_usd"] == pytest.approx(COST)
    s = await stats(store, "bob")
    assert (s["total_tokens"], s["prompt_tokens"], s["completion_tokens"]) == (1500, 1200, 300)
    assert (s["cached_tokens"], s["reasoning_tokens"], s["calls"], s["errors"]) == (1024, 256, 1, 0)
    assert s["cost_usd"] == pytest.approx(COST)
    health = await logger.manager.health()
    assert (health["llm_calls"], health["duplicates"], health["errors"]) == (1, 0, 0)
    assert (logger.errors, logger.open_calls) == (0, 0)


async def test_a_stream_is_counted_once_at_its_end_with_the_final_usage_chunk(
    fake: FakeLLM,
) -> None:
    rec, tokens = Recorder(), llmtally.TokenCounter()
    logger = use(rec, tokens)
    stream = await litellm.acompletion(
        **call_kwargs(fake), stream=True, stream_options={"include_usage": True}
    )
    text = ""
    async for chunk in stream:
        text += chunk.choices[0].delta.content or "" if chunk.choices else ""
    assert text == "Paris."
    assert await logger.drain()
    assert rec.names() == ["on_llm_start", "on_llm_end"]  # never per chunk
    (response,), _ = rec.of("on_llm_end")[0]
    assert counts(response) == COUNTS and response["estimated"] is False
    assert response["cost_source"] == "provider"
    assert response["cost_estimate"] == pytest.approx(COST)
    assert (tokens.requests, tokens.total_tokens) == (1, 1500)


async def test_a_stream_broken_off_and_dropped_ends_as_abandoned(fake: FakeLLM) -> None:
    """LiteLLM fires nothing for a stream whose consumer stops (a break, a client gone): the
    call ends as abandoned once the stream is dropped, not at exit or never."""
    from importlib.metadata import version

    if tuple(int(p) for p in version("litellm").split(".")[:2]) < (1, 110):
        # litellm 1.95 (the lowest we declare) keeps a dropped stream's logging object alive:
        # the call ends at exit or on eviction there. Checked on 1.110.
        pytest.skip(f"litellm {version('litellm')} keeps a dropped stream's logging object")
    rec, tokens = Recorder(), llmtally.TokenCounter()
    logger = use(rec, tokens)
    stream = await litellm.acompletion(
        **call_kwargs(fake), stream=True, stream_options={"include_usage": True}
    )
    async for _ in stream:
        break
    del stream
    deadline = time.monotonic() + 10
    while not rec.of("on_llm_end") and time.monotonic() < deadline:
        gc.collect()
        await asyncio.sleep(0.02)
    assert await logger.drain()
    assert rec.names() == ["on_llm_start", "on_llm_end"]
    (response,), _ = rec.of("on_llm_end")[0]
    assert response["finish_reason"] == "abandoned" and response["estimated"] is True
    assert response["prompt_tokens"] == llmtally.estimate_tokens(MESSAGES, "gpt-4o")
    assert logger.open_calls == 0 and tokens.requests == 1


def test_sync_completion_is_counted_once_from_litellm_logging_thread() -> None:
    server = FakeLLM()
    try:
        rec, tokens = Recorder(), llmtally.TokenCounter()
        threads: list[str] = []

        class Where(llmtally.AsyncCallbackHandler):
            async def on_llm_end(self, response: Any, **kwargs: Any) -> None:
                threads.append(threading.current_thread().name)

        logger = use(rec, tokens, Where(), user_id="carol")
        result = litellm.completion(**call_kwargs(server))
        assert result.choices[0].message.content == "Paris."
        stream = litellm.completion(
            **call_kwargs(server), stream=True, stream_options={"include_usage": True}
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "Paris."
        wait_for(lambda: tokens.requests == 2 and logger.open_calls == 0)
        time.sleep(0.2)  # nothing more arrives: counted exactly once each
        assert rec.names() == ["on_llm_start", "on_llm_end"] * 2
        for (response,), kwargs in rec.of("on_llm_end"):
            assert counts(response) == COUNTS
            assert response["cost_source"] == "provider"
            assert kwargs["user_id"] == "carol"
        assert (tokens.requests, tokens.total_tokens) == (2, 3000)
        assert threads == ["llmtally-events"] * 2  # sync hooks run on the background loop
        assert logger.errors == 0
    finally:
        server.close()


async def test_every_end_hook_fired_again_for_a_call_is_ignored(fake: FakeLLM, store: Any) -> None:
    """LiteLLM fires sync or async hooks depending on the call; if it ever fires both, or
    replays one, the call is still counted once."""
    captured: list[tuple[dict[str, Any], Any, Any, Any]] = []

    class Capture(litellm.integrations.custom_logger.CustomLogger):  # type: ignore[misc]
        async def async_log_success_event(
            self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any
        ) -> None:
            captured.append((kwargs, response_obj, start_time, end_time))

    tokens, meter = llmtally.TokenCounter(), llmtally.UsageRecorder(store=store)
    logger = LlmtallyLogger([tokens, meter])
    capture = Capture()
    litellm.callbacks = [logger, capture]
    await litellm.acompletion(**call_kwargs(fake, user="dave"))
    assert await logger.drain()
    wait_for(lambda: len(captured) == 1)
    kwargs, response, started, ended = captured[0]
    await logger.async_log_success_event(kwargs, response, started, ended)
    await asyncio.to_thread(logger.log_success_event, kwargs, response, started, ended)
    await logger.async_log_failure_event(kwargs, None, started, ended)
    assert (tokens.requests, tokens.total_tokens) == (1, 1500)
    s = await stats(store, "dave")
    assert (s["calls"], s["total_tokens"], s["errors"]) == (1, 1500, 0)
    assert logger.duplicates == 3 and logger.errors == 0


async def test_a_failed_attempt_then_its_retry_count_one_error_and_one_call() -> None:
    """LiteLLM's retries keep the litellm_call_id: the failed attempt is an error, the retry
    that succeeds a call, each once."""
    rec, tokens = Recorder(), llmtally.TokenCounter()
    logger = LlmtallyLogger([rec, tokens])
    kwargs = {"litellm_call_id": "call-1", "model": "openai/gpt-4o", "messages": MESSAGES}
    await logger.async_pre_call_deployment_hook(dict(kwargs), None)
    failed = {**kwargs, "exception": litellm.InternalServerError("boom", "openai", "gpt-4o")}
    await logger.async_log_failure_event(failed, None, None, None)
    await logger.async_pre_call_deployment_hook(dict(kwargs), None)
    response = litellm.ModelResponse(usage=litellm.Usage(**USAGE), model="gpt-4o")
    for _ in range(2):
        await logger.async_log_success_event(dict(kwargs), response, None, None)
    assert rec.names() == ["on_llm_start", "on_llm_error", "on_llm_start", "on_llm_end"]
    assert (tokens.requests, tokens.total_tokens) == (1, 1500)
    health = await logger.manager.health()
    assert (health["llm_errors"], health["llm_calls"]) == (1, 1)
    assert logger.duplicates == 1


async def test_mock_response_usage_and_cost_pass_through(fake: FakeLLM) -> None:
    rec = Recorder()
    logger = use(rec)
    await litellm.acompletion(model="openai/gpt-4o", messages=MESSAGES, mock_response="Paris.")
    assert await logger.drain()
    (response,), _ = rec.of("on_llm_end")[0]
    assert counts(response)[:3] == (30, 10, 20)  # LiteLLM's mock usage
    assert response["cost_estimate"] == pytest.approx(10 * 2.5e-6 + 20 * 10e-6)
    assert response["content"] == "Paris."


async def test_anthropic_cache_reads_and_writes_are_inside_prompt_tokens(fake: FakeLLM) -> None:
    rec = Recorder()
    logger = use(rec)
    await litellm.acompletion(
        model="anthropic/claude-sonnet-4-5", api_base=fake.url, api_key="x", messages=MESSAGES
    )
    assert await logger.drain()
    (response,), kwargs = rec.of("on_llm_end")[0]
    # fakellm: input 50 + cache read 2000 + cache write 300; output 120.
    assert counts(response) == (2470, 2350, 120, 2000, 300, 0)
    assert (kwargs["provider"], kwargs["model"]) == ("anthropic", "claude-sonnet-4-5")
    assert response["cost_source"] == "provider" and response["cost_estimate"] > 0


async def test_a_model_litellm_cannot_price_falls_back_to_the_price_table(fake: FakeLLM) -> None:
    """LiteLLM puts 0.0 in its standard logging payload when it cannot price a model: that is
    not a cost, so llmtally's table (or register_model) prices the call."""
    llmtally.register_model("my-private-model", provider="openai", input_price=1, output_price=2)
    rec = Recorder()
    logger = use(rec)
    await litellm.acompletion(**call_kwargs(fake, model="openai/my-private-model"))
    assert await logger.drain()
    (response,), _ = rec.of("on_llm_end")[0]
    assert response["cost_source"] == "table"
    assert response["cost_pusd"] == 1200 * 1_000_000 + 300 * 2_000_000


# ---------------------------------------------------------------------------------------------
# Errors, timeouts, aborts, isolation.


async def test_failed_calls_count_as_errors_never_as_calls(fake: FakeLLM, store: Any) -> None:
    rec, meter = Recorder(), llmtally.RedisTokenCallbackHandler("erin", store=store)
    logger = use(rec, meter)
    with pytest.raises(litellm.InternalServerError):
        await litellm.acompletion(**call_kwargs(fake, model="openai/fail"))
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    # LiteLLM maps the refused connection to an InternalServerError (or APIConnectionError).
    with pytest.raises((litellm.APIConnectionError, litellm.InternalServerError)):
        await litellm.acompletion(**call_kwargs(fake, api_base=f"http://127.0.0.1:{port}/v1"))
    assert await logger.drain()
    assert rec.names() == ["on_llm_start", "on_llm_error"] * 2
    (error,), kwargs = rec.of("on_llm_error")[0]
    assert isinstance(error, litellm.InternalServerError)
    assert kwargs["request_id"] == rec.of("on_llm_start")[0][1]["request_id"]
    health = await logger.manager.health()
    assert (health["llm_errors"], health["llm_calls"], health["llm_timeouts"]) == (2, 0, 0)
    s = await stats(store, "erin")
    assert (s["errors"], s["calls"], s["total_tokens"]) == (2, 0, 0)


def test_a_failed_sync_completion_counts_an_error() -> None:
    server = FakeLLM()
    try:
        rec = Recorder()
        logger = use(rec)
        with pytest.raises(litellm.InternalServerError):
            litellm.completion(**call_kwargs(server, model="openai/fail"))
        wait_for(lambda: logger.open_calls == 0)
        assert rec.names() == ["on_llm_start", "on_llm_error"]
    finally:
        server.close()


async def test_a_timeout_counts_in_timeouts_not_errors(store: Any) -> None:
    meter = llmtally.RedisTokenCallbackHandler("frank", store=store)
    logger = use(meter)
    with socket.socket() as silent:  # accepts, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        base = f"http://127.0.0.1:{silent.getsockname()[1]}/v1"
        with pytest.raises(litellm.Timeout):
            await litellm.acompletion(
                model="openai/gpt-4o", api_base=base, api_key="x", messages=MESSAGES,
                timeout=0.3, max_retries=0,
            )  # fmt: skip
        assert await logger.drain()
    health = await logger.manager.health()
    assert (health["llm_timeouts"], health["llm_errors"]) == (1, 0)
    s = await stats(store, "frank")
    assert (s["timeouts"], s["errors"], s["calls"]) == (1, 0, 0)


async def test_a_budget_abort_stops_an_async_call_before_the_request(
    fake: FakeLLM, store: Any
) -> None:
    budget = llmtally.BudgetLimiter(max_tokens=5, store=store)
    rec = Recorder()
    logger = use(budget, rec)
    sent = len(fake.requests)
    with pytest.raises(BudgetExceeded) as info:
        await litellm.acompletion(**call_kwargs(fake, user="gina"))
    assert info.value.user_id == "gina"
    assert len(fake.requests) == sent  # the provider was never called
    assert await logger.drain()
    assert rec.names() == []  # refused before the later handlers saw the start
    assert logger.open_calls == 0 and logger.errors == 0
    assert (await logger.manager.health())["llm_calls"] == 0
    remaining = await budget.remaining("gina")
    assert (remaining["used"], remaining["reserved"]) == (0, 0)


def test_a_sync_call_cannot_be_stopped_so_its_usage_is_still_counted() -> None:
    """LiteLLM swallows what its sync start hook raises, so a sync call starts at its end: the
    refusal is logged and counted, the call went on, and its usage is metered."""
    server = FakeLLM()
    try:

        class Refuse(llmtally.AsyncCallbackHandler):
            async def on_llm_start(self, messages: Any, **kwargs: Any) -> None:
                raise CallbackAbort("no")

        tokens = llmtally.TokenCounter()
        logger = use(Refuse(), tokens)
        result = litellm.completion(**call_kwargs(server))
        assert result.choices[0].message.content == "Paris."
        wait_for(lambda: tokens.requests == 1 and logger.open_calls == 0)
        assert logger.unstoppable_aborts == 1 and tokens.total_tokens == 1500
    finally:
        server.close()


async def test_a_failing_handler_never_breaks_the_litellm_call(fake: FakeLLM) -> None:
    failing, tokens = Failing(), llmtally.TokenCounter()
    logger = use(failing, tokens)
    result = await litellm.acompletion(**call_kwargs(fake))
    assert result.choices[0].message.content == "Paris."
    assert await logger.drain()
    assert failing.calls == 2 and tokens.total_tokens == 1500
    assert (await logger.manager.health())["errors"] == 2
    # The logger's own failure (kwargs it cannot read) is logged and counted, never raised.
    await logger.async_log_success_event(None, None, None, None)  # type: ignore[arg-type]
    logger.log_success_event(None, None, None, None)  # type: ignore[arg-type]
    assert logger.errors == 2


# ---------------------------------------------------------------------------------------------
# Who pays, calls whose start was not seen, concurrency.


async def test_the_user_charged_metadata_then_user_then_the_default(fake: FakeLLM) -> None:
    cost = llmtally.CostTracker()
    logger = use(cost, user_id="default")
    await litellm.acompletion(**call_kwargs(fake, user="u1", metadata={"user_id": "m1"}))
    await litellm.acompletion(**call_kwargs(fake, user="u1"))
    await litellm.acompletion(**call_kwargs(fake))
    assert await logger.drain()
    assert {u: v["requests"] for u, v in cost.by_user().items()} == {
        "m1": 1,
        "u1": 1,
        "default": 1,
    }
    use(cost)
    await litellm.acompletion(**call_kwargs(fake))
    assert await litellm.callbacks[0].drain()
    assert cost.by_user()["anonymous"]["requests"] == 1


@pytest.mark.parametrize(
    ("given", "charged"), [(0, "0"), (42, "42"), (["bob"], "anonymous"), (True, "anonymous")]
)
async def test_a_metadata_user_id_of_any_type_is_charged_by_the_rule(
    fake: FakeLLM, given: Any, charged: str
) -> None:
    """LiteLLM's ``metadata["user_id"]`` reaches the manager as given: ``0`` is charged as
    ``"0"`` (not dropped for the default), a list or a bool is bad input charged to
    ``"anonymous"``, the same rule as every other path."""
    cost = llmtally.CostTracker()
    logger = use(cost, user_id="default")
    await litellm.acompletion(**call_kwargs(fake, metadata={"user_id": given}))
    assert await logger.drain()
    assert list(cost.by_user()) == [charged]
    assert cost.by_user()[charged]["requests"] == 1


async def test_a_logger_given_to_one_call_only_counts_it_at_its_end(fake: FakeLLM) -> None:
    """LiteLLM's async start hook sees only ``litellm.callbacks``: a logger passed in one
    call's ``callbacks=`` opens and ends the call when LiteLLM logs its success."""
    rec, tokens = Recorder(), llmtally.TokenCounter()
    logger = LlmtallyLogger([rec, tokens])
    await litellm.acompletion(**call_kwargs(fake), callbacks=[logger])
    deadline = time.monotonic() + 10
    while tokens.requests < 1:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.005)
    assert await logger.drain()
    assert rec.names() == ["on_llm_start", "on_llm_end"]
    (response,), _ = rec.of("on_llm_end")[0]
    assert counts(response) == COUNTS and 0 < response["response_time"] < 10


@pytest.fixture
def wide_fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeLLM]:
    """A FakeLLM whose listen backlog takes 200 connections at once (socketserver's default
    of 5 makes the kernel drop SYNs, and the clients retry them seconds later)."""

    class Wide(fakellm.ThreadingHTTPServer):
        request_queue_size = 1024

    monkeypatch.setattr(fakellm, "ThreadingHTTPServer", Wide)
    server = FakeLLM()
    yield server
    server.close()


async def test_200_concurrent_acompletion_calls_are_counted_exactly(
    wide_fake: FakeLLM, store: Any
) -> None:
    fake = wide_fake
    tokens, cost = llmtally.TokenCounter(), llmtally.CostTracker()
    perf, meter = llmtally.PerformanceTracker(), llmtally.UsageRecorder(store=store)
    logger = use(tokens, cost, perf, meter)
    users = [f"user{i % 10}" for i in range(200)]
    results = await asyncio.gather(
        *(litellm.acompletion(**call_kwargs(fake, user=u)) for u in users)
    )
    assert all(r.choices[0].message.content == "Paris." for r in results)
    assert await logger.drain(30)
    assert (tokens.requests, tokens.total_tokens, tokens.cached_tokens) == (200, 300_000, 204_800)
    assert (cost.request_count, perf.stats()["requests"]) == (200, 200)
    assert cost.total_cost == pytest.approx(200 * COST)
    for i in range(10):
        s = await stats(store, f"user{i}")
        assert (s["calls"], s["total_tokens"], s["reasoning_tokens"]) == (20, 30_000, 5_120)
        assert s["cost_usd"] == pytest.approx(20 * COST)
    health = await logger.manager.health()
    assert (health["llm_calls"], health["duplicates"], health["errors"]) == (200, 0, 0)


# ---------------------------------------------------------------------------------------------
# The mapping on its own.


def test_response_dict_maps_litellm_usage_and_cost() -> None:
    usage = litellm.Usage(
        prompt_tokens=2350,
        completion_tokens=120,
        total_tokens=2470,
        cache_read_input_tokens=2000,
        cache_creation_input_tokens=300,
        completion_tokens_details={"reasoning_tokens": 40},
    )
    response = litellm.ModelResponse(usage=usage, model="claude")
    response.choices[0].message.content = "hi"
    out = response_dict({"response_cost": 0.25}, response)
    assert out == {
        "tokens_used": 2470,
        "prompt_tokens": 2350,
        "completion_tokens": 120,
        "cached_tokens": 2000,
        "cache_write_tokens": 300,
        "reasoning_tokens": 40,
        "cost_estimate": 0.25,
        "content": "hi",
    }
    # No response object: the standard logging payload's usage; an unpriced model's 0.0 there
    # is no cost.
    slo = {
        "response_cost": 0.0,
        "response_cost_failure_debug_info": {"error_str": "not mapped"},
        "metadata": {"usage_object": {"prompt_tokens": 7, "completion_tokens": 3}},
    }
    assert response_dict({"standard_logging_object": slo}, None) == {
        "prompt_tokens": 7,
        "completion_tokens": 3,
        "cached_tokens": 0,
        "cache_write_tokens": 0,
        "reasoning_tokens": 0,
    }
    assert response_dict({}, None) is None
    # Bad counts are handed on as they are: the manager skips them as bad input.
    assert response_dict({}, {"usage": {"prompt_tokens": -1}})["prompt_tokens"] == -1  # type: ignore[index]
