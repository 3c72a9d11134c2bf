"""CallbackManager: ordering, concurrency, isolation, timeouts, aborts, run-time registration."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

import llmtally
from llmtally import (
    AsyncCallbackHandler,
    BudgetExceeded,
    CallbackAbort,
    CallbackManager,
    ConfigError,
    InvalidHandler,
    RateLimited,
)

from helpers import MESSAGES, Failing, Hanging, Recorder

RESPONSE = {"usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}


async def one_call(manager: CallbackManager, **context: Any) -> llmtally.LLMCall:
    async with manager.llm_call(MESSAGES, provider="openai", model="gpt-4o", **context) as call:
        call.set_response(RESPONSE)
    return call


async def test_sequential_mode_keeps_list_order() -> None:
    log: list[tuple[str, str]] = []
    handlers = [Recorder(name, log) for name in ("a", "b", "c")]
    await one_call(CallbackManager(handlers))
    assert log == [
        ("a", "on_llm_start"),
        ("b", "on_llm_start"),
        ("c", "on_llm_start"),
        ("a", "on_llm_end"),
        ("b", "on_llm_end"),
        ("c", "on_llm_end"),
    ]


async def test_priority_orders_higher_first_then_registration() -> None:
    log: list[tuple[str, str]] = []
    a, b, c, d = (Recorder(n, log) for n in "abcd")
    manager = CallbackManager([a])
    manager.add_handler(b, priority=5)
    manager.add_handler(c)
    manager.add_handler(d, priority=5)
    await manager.dispatch("on_chain_start", "x")
    assert [name for name, _ in log] == ["b", "d", "a", "c"]
    assert manager.handlers == [b, d, a, c]


class _Overlap(AsyncCallbackHandler):
    """Measures how many handlers run at once."""

    active = 0
    peak = 0

    async def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        type(self).active += 1
        type(self).peak = max(type(self).peak, type(self).active)
        await asyncio.sleep(0.01)
        type(self).active -= 1


@pytest.mark.parametrize(("parallel", "peak"), [(False, 1), (True, 4)])
async def test_parallel_mode_runs_handlers_concurrently(parallel: bool, peak: int) -> None:
    class Overlap(_Overlap):
        active = 0
        peak = 0

    manager = CallbackManager([Overlap() for _ in range(4)], parallel=parallel)
    await one_call(manager)
    assert Overlap.peak == peak


async def test_max_concurrent_callbacks_bounds_parallel_mode(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LLMTALLY_MAX_CONCURRENT_CALLBACKS", "2")
    llmtally.config.settings(reload=True)

    class Overlap(_Overlap):
        active = 0
        peak = 0

    await one_call(CallbackManager([Overlap() for _ in range(5)], parallel=True))
    assert Overlap.peak == 2


@pytest.mark.parametrize("parallel", [False, True])
async def test_failing_handler_is_isolated_logged_and_counted(
    parallel: bool, caplog: pytest.LogCaptureFixture
) -> None:
    before, after = Recorder("before"), Recorder("after")
    bad = Failing(ValueError("boom"))
    manager = CallbackManager([before, bad, after], parallel=parallel)
    with caplog.at_level(logging.DEBUG, logger="llmtally"):
        for _ in range(3):
            call = await one_call(manager)
    assert call.response is not None and call.response["tokens_used"] == 15
    assert before.names().count("on_llm_end") == 3
    assert after.names().count("on_llm_end") == 3
    health = await manager.health()
    assert health["errors"] == 6  # start and end, three calls
    assert health["timeouts"] == 0
    assert health["per_handler"][1] == {"name": "Failing", "errors": 6, "timeouts": 0}
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    # The first failure of each event is logged with its traceback; repeats go to DEBUG.
    assert len(errors) == 2
    assert errors[0].exc_info is not None
    assert "Failing.on_llm_start" in errors[0].getMessage()


@pytest.mark.parametrize("parallel", [False, True])
async def test_hanging_handler_times_out_and_counts_as_timeout(parallel: bool) -> None:
    hang = Hanging()
    rec = Recorder()
    manager = CallbackManager([hang, rec], timeout=0.05, parallel=parallel)
    call = await one_call(manager)
    assert call.response is not None
    assert hang.cancelled == 1
    assert rec.names() == ["on_llm_start", "on_llm_end"]
    health = await manager.health()
    assert (health["timeouts"], health["errors"]) == (1, 0)


async def test_handler_raising_timeout_error_itself_is_an_error_not_a_timeout() -> None:
    manager = CallbackManager([Failing(TimeoutError("its own"))], timeout=5)
    await one_call(manager)
    health = await manager.health()
    assert (health["timeouts"], health["errors"]) == (0, 2)


async def test_timeout_from_environment_and_alias(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CALLBACK_TIMEOUT", "7")
    llmtally.config.settings(reload=True)
    assert CallbackManager([]).timeout == 7.0
    monkeypatch.setenv("LLMTALLY_CALLBACK_TIMEOUT_S", "0.25")
    llmtally.config.settings(reload=True)
    assert CallbackManager([]).timeout == 0.25  # the LLMTALLY_ name wins over the alias
    assert CallbackManager([], timeout=3).timeout == 3.0  # an argument wins over both


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("LLMTALLY_CALLBACK_TIMEOUT_S", "soon"),
        ("LLMTALLY_CALLBACK_TIMEOUT_S", "-1"),
        ("CALLBACK_MAX_CONCURRENT", "0"),
        ("LLMTALLY_LOG_LEVEL", "LOUD"),
    ],
)
def test_bad_environment_raises_config_error_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, var: str, value: str
) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError, match=var):
        llmtally.config.settings(reload=True)
    monkeypatch.delenv(var)


def test_log_level_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    logger = logging.getLogger("llmtally")
    old = logger.level
    monkeypatch.setenv("CALLBACK_LOG_LEVEL", "debug")
    try:
        llmtally.config.settings(reload=True)
        assert logger.level == logging.DEBUG
    finally:
        logger.setLevel(old)


@pytest.mark.parametrize(
    ("callbacks", "kwargs", "error"),
    [
        (["not a handler"], {}, InvalidHandler),
        ([Recorder], {}, InvalidHandler),
        ([object()], {}, InvalidHandler),
        ([], {"timeout": -1}, ConfigError),
        ([], {"timeout": "1"}, ConfigError),
        ([], {"timeout": float("nan")}, ConfigError),
        ([], {"parallel": "yes"}, ConfigError),
    ],
)
def test_constructor_rejects_bad_arguments(
    callbacks: list[Any], kwargs: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error):
        CallbackManager(callbacks, **kwargs)


def test_invalid_handler_is_both_type_and_value_error() -> None:
    with pytest.raises(TypeError):
        CallbackManager([42])
    with pytest.raises(ValueError):
        CallbackManager([42])


async def test_abort_on_start_stops_the_call_and_releases_earlier_handlers() -> None:
    first, last = Recorder("first"), Recorder("last")

    class Budget(AsyncCallbackHandler):
        async def on_llm_start(self, messages: Any, **kwargs: Any) -> None:
            raise BudgetExceeded(user_id="u1", limit=100, used=100, requested=5)

    manager = CallbackManager([first, Budget(), last])
    ran = False
    with pytest.raises(BudgetExceeded) as info:
        async with manager.llm_call(MESSAGES, user_id="u1"):
            ran = True
    assert not ran
    assert (info.value.user_id, info.value.limit, info.value.requested) == ("u1", 100, 5)
    assert info.value.unit == "tokens"
    # The handler that saw the start is told the call did not happen; the later one saw nothing.
    assert first.names() == ["on_llm_start", "on_llm_error"]
    (error,), kwargs = first.of("on_llm_error")[0]
    assert error is info.value and kwargs["aborted"] is True
    assert last.names() == []
    health = await manager.health()
    assert health["errors"] == 0


async def test_abort_on_end_runs_every_end_handler_then_raises() -> None:
    class Limiter(AsyncCallbackHandler):
        async def on_llm_end(self, response: Any, **kwargs: Any) -> None:
            raise RateLimited(user_id="u", limit=10, retry_after_s=1.5)

    after = Recorder()
    manager = CallbackManager([Limiter(), after])
    with pytest.raises(RateLimited) as info:
        await one_call(manager)
    assert info.value.retry_after_s == 1.5
    assert after.names() == ["on_llm_start", "on_llm_end"]


async def test_abort_in_parallel_mode_propagates() -> None:
    class Stop(AsyncCallbackHandler):
        async def on_llm_start(self, messages: Any, **kwargs: Any) -> None:
            raise CallbackAbort("no")

    rec = Recorder()
    manager = CallbackManager([rec, Stop()], parallel=True)
    with pytest.raises(CallbackAbort):
        await one_call(manager)
    assert rec.names() == ["on_llm_start", "on_llm_error"]


async def test_cancellation_is_not_swallowed() -> None:
    class Cancels(AsyncCallbackHandler):
        async def on_llm_start(self, messages: Any, **kwargs: Any) -> None:
            raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await one_call(CallbackManager([Cancels()]))


async def test_sync_handler_methods_are_called() -> None:
    seen: list[int] = []

    class Sync:
        def on_llm_end(self, response: dict[str, Any], **kwargs: Any) -> None:
            seen.append(response["tokens_used"])

    await one_call(CallbackManager([Sync()]))
    assert seen == [15]


async def test_event_not_overridden_is_never_called() -> None:
    class OnlyEnd(AsyncCallbackHandler):
        async def on_llm_end(self, response: Any, **kwargs: Any) -> None:
            pass

    manager = CallbackManager([OnlyEnd()])
    table = manager._current_table().by_event
    assert len(table["on_llm_end"]) == 1
    assert {event for event, targets in table.items() if targets} == {"on_llm_end"}


async def test_add_and_remove_handlers_while_a_call_is_in_flight() -> None:
    b, c = Recorder("b"), Recorder("c")

    class Swapper(AsyncCallbackHandler):
        async def on_llm_start(self, messages: Any, **kwargs: Any) -> None:
            manager.remove_handler(b)
            manager.add_handler(c)

    manager = CallbackManager([Swapper(), b])
    await one_call(manager)
    # The call in flight keeps the handlers it started with.
    assert b.names() == ["on_llm_start", "on_llm_end"]
    assert c.names() == []
    await one_call(manager)
    assert b.names() == ["on_llm_start", "on_llm_end"]
    assert c.names() == ["on_llm_start", "on_llm_end"]
    manager.remove_handler(b)  # removing an absent handler is a no-op


async def test_concurrent_registration_from_many_tasks() -> None:
    manager = CallbackManager([])
    handlers = [Recorder(str(i)) for i in range(50)]

    async def churn(h: Recorder) -> None:
        manager.add_handler(h)
        await one_call(manager)
        manager.remove_handler(h)

    await asyncio.gather(*(churn(h) for h in handlers))
    assert manager.handlers == []
    # Every handler saw its own call's start and end at least (others' too, while registered).
    for h in handlers:
        assert h.names().count("on_llm_start") == h.names().count("on_llm_end") >= 1


async def test_global_callbacks_fire_on_every_manager() -> None:
    glob, own = Recorder("global"), Recorder("own")
    manager = CallbackManager([own])  # built before the globals are set
    llmtally.set_global_callbacks([glob])
    assert llmtally.get_global_callbacks() == [glob]
    await one_call(manager)
    await one_call(CallbackManager([]))
    assert own.names() == ["on_llm_start", "on_llm_end"]
    assert glob.names() == ["on_llm_start", "on_llm_end"] * 2
    llmtally.set_global_callbacks([])
    await one_call(manager)
    assert len(glob.events) == 4
    assert llmtally.get_global_callbacks() == []


async def test_global_handler_also_registered_locally_fires_once() -> None:
    rec = Recorder()
    llmtally.set_global_callbacks([rec])
    await one_call(CallbackManager([rec]))
    assert rec.names() == ["on_llm_start", "on_llm_end"]


def test_set_global_callbacks_validates() -> None:
    with pytest.raises(InvalidHandler):
        llmtally.set_global_callbacks(["nope"])


async def test_dispatch_fires_any_event_and_rejects_unknown_names() -> None:
    rec = Recorder()
    manager = CallbackManager([rec])
    await manager.dispatch("on_tool_start", "search", {"q": 1}, user_id="u")
    assert rec.events == [("on_tool_start", ("search", {"q": 1}), {"user_id": "u"})]
    with pytest.raises(ValueError, match="unknown event"):
        await manager.dispatch("on_llm_begin")


async def test_health_reports_counters() -> None:
    manager = CallbackManager([Recorder(), Failing()])
    await one_call(manager)
    with pytest.raises(KeyError):
        async with manager.llm_call(MESSAGES):
            raise KeyError("provider")
    with pytest.raises(TimeoutError):
        async with manager.llm_call(MESSAGES):
            raise TimeoutError
    health = await manager.health()
    assert health["status"] == "healthy"
    assert health["handlers"] == 2
    assert health["errors"] == 4  # Failing: start+end of call 1, start of calls 2 and 3
    assert health["timeouts"] == 0
    assert (health["llm_calls"], health["llm_errors"], health["llm_timeouts"]) == (1, 1, 1)
    assert health["bad_input"] == 0
    assert health["pending_deltas"] == 0
