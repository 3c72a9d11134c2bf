"""One identity rule everywhere (DESIGN "Identity"), and tracker keys no name can forge."""

from __future__ import annotations

import json
import logging
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import llmtally
from llmtally import (
    AuditLogger,
    BudgetExceeded,
    BudgetLimiter,
    CallbackManager,
    CostTracker,
    RateLimited,
    RateLimiter,
    TokenCounter,
    _observe,
)
from llmtally.identity import MAX_USER_ID_BYTES, charged_user
from llmtally.storage.keys import current_cycle, usage_key

from helpers import Recorder

MESSAGES = [{"role": "user", "content": "hi"}]
USAGE = {"usage": {"prompt_tokens": 3, "completion_tokens": 2}}


class Name(str):
    """A str subclass whose methods lie: the rule reads its text, not its methods."""

    def __str__(self) -> str:
        raise RuntimeError("no")

    def __len__(self) -> int:
        return 0


class Number(int):
    """An int subclass whose every method a careless reader might call raises."""

    def __str__(self) -> str:
        raise RuntimeError("no")

    def __repr__(self) -> str:
        raise RuntimeError("no")

    def bit_length(self) -> int:
        raise RuntimeError("no")

    def __add__(self, other: object) -> int:
        raise RuntimeError("no")

    def __lt__(self, other: object) -> bool:
        raise RuntimeError("no")


ids = st.one_of(
    st.text(max_size=20),
    st.text(alphabet=st.characters(categories=["Cs", "Cc"]), min_size=1, max_size=5),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.sampled_from([0, -1, 10**5000, -(10**5000), 10**70_000]),
    st.booleans(),
    st.none(),
    st.floats(),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
    st.builds(object),
    st.sampled_from(
        [
            "x" * MAX_USER_ID_BYTES,
            "x" * (MAX_USER_ID_BYTES + 1),
            "é" * (MAX_USER_ID_BYTES // 2),
            "é" * (MAX_USER_ID_BYTES // 2 + 1),
            "\U0001f600" * (MAX_USER_ID_BYTES // 4 + 1),
            Name("bob"),
            Number(7),
            Number(10**5000),
        ]
    ),
)


def expected(value: Any) -> tuple[str, bool]:
    """The DESIGN text, read literally."""
    if isinstance(value, bool):
        return "anonymous", True
    if isinstance(value, int):
        old = sys.get_int_max_str_digits()
        sys.set_int_max_str_digits(0)
        try:
            digits = int.__repr__(value)
        finally:
            sys.set_int_max_str_digits(old)
        return (digits, False) if len(digits) <= MAX_USER_ID_BYTES else ("anonymous", True)
    if value is None or value == "":
        return "anonymous", False
    if isinstance(value, str):
        text = str.__str__(value)
        too_long = len(text.encode("utf-8", "surrogatepass")) > MAX_USER_ID_BYTES
        return ("anonymous", True) if too_long else (text, False)
    return "anonymous", True


@settings(max_examples=400, deadline=None)
@given(ids)
def test_the_rule_is_the_design_text(value: Any) -> None:
    assert charged_user(value) == expected(value)


def test_the_size_limit_is_in_utf8_bytes() -> None:
    assert MAX_USER_ID_BYTES == 64 * 1024
    assert charged_user("é" * 32_768) == ("é" * 32_768, False)  # 65,536 bytes
    assert charged_user("é" * 32_769) == ("anonymous", True)
    assert charged_user(10**5000) == ("1" + "0" * 5000, False)
    assert charged_user(-(10**65_535)) == ("anonymous", True)  # 65,537 characters
    assert charged_user(10**65_535 - 1) == ("9" * 65_535, False)


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def metrics_on() -> Iterator[None]:
    was = _observe.state.on
    _observe.state.on = True
    yield
    _observe.state.on = was


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ids)
async def test_every_handler_charges_the_same_user(metrics_on: None, value: Any) -> None:
    """Handlers, trackers, both limiters, the audit record, the metrics and the store key all
    charge one user, the rule's; bad input is counted once, by the manager."""
    user, bad = expected(value)
    model = f"m-{uuid.uuid4().hex}"
    llmtally.register_model(model, input_price=1.0, output_price=2.0)  # priced: the core's path
    store = llmtally.open_store("memory://")
    audit_lines = _Lines()
    audit_logger = logging.getLogger(f"audit-{model}")
    audit_logger.addHandler(audit_lines)
    audit_logger.propagate = False
    audit_logger.setLevel(logging.INFO)
    rec, cost, tokens = Recorder(), CostTracker(), TokenCounter()
    budget = BudgetLimiter(max_tokens=1_000, store=store)
    rate = RateLimiter(requests_per_minute=1, store=store)
    audit = AuditLogger(logger=audit_logger)
    handlers = [rec, cost, tokens, llmtally.UsageRecorder(store=store), budget, rate, audit]
    manager = CallbackManager(handlers)
    async with manager.llm_call(MESSAGES, model=model, user_id=value) as call:
        call.set_response(USAGE)
    _, kwargs = rec.of("on_llm_end")[0]
    assert kwargs.get("user_id", "anonymous") == user
    assert list(cost.by_user()) == [user]
    assert tokens.total_tokens == 5
    assert (await store.read(usage_key(user, current_cycle())))["calls"] == 1
    assert (await budget.remaining(user))["used"] == 5
    with pytest.raises(RateLimited) as refused:  # the same user's second call in the minute
        async with manager.llm_call(MESSAGES, model=model, user_id=value) as call:
            call.set_response(USAGE)
    assert refused.value.user_id == user
    await audit.aclose()
    assert json.loads(audit_lines.lines[0])["user_id"] == user
    labels = [k[2] for k in _observe.state.llm_usage() if k[1] == model]
    label = user.encode("utf-8", "replace").decode() if len(user) <= 256 else "<other>"
    assert labels in ([label], ["<other>"])  # "<other>" past 10,000 users
    assert (await manager.health())["bad_input"] == 2 * int(bad)  # each call, once
    for handler in (cost, tokens, budget, rate, audit):
        assert handler.bad_input == 0  # counted where the call entered, not again
    await store.aclose()


@pytest.mark.parametrize(
    "value",
    [[1], True, 1.5, object(), "x" * (MAX_USER_ID_BYTES + 1), Number(3)],
    ids=["list", "bool", "float", "object", "long-str", "int-subclass"],
)
async def test_a_handler_called_directly_counts_and_logs_a_bad_id(
    value: Any, caplog: pytest.LogCaptureFixture
) -> None:
    store = llmtally.open_store("memory://")
    handlers: list[Any] = [
        CostTracker(),
        TokenCounter(),
        llmtally.UsageRecorder(store=store),
        BudgetLimiter(max_tokens=1_000, store=store),
        RateLimiter(requests_per_minute=100),
        AuditLogger(logger=logging.getLogger("audit-direct")),
    ]
    user, bad = expected(value)
    end = {"tokens_used": 5, "prompt_tokens": 3, "completion_tokens": 2, "cost_estimate": 0.0}
    for handler in handlers:
        for _ in range(2):
            caplog.clear()
            before = handler.bad_input
            with caplog.at_level(logging.WARNING, logger="llmtally"):
                await handler.on_llm_start(MESSAGES, user_id=value, model="gpt-4o")
                await handler.on_llm_end(end, user_id=value, model="gpt-4o", duration_ms=3.0)
            warned = [r for r in caplog.records if "user_id is" in r.getMessage()]
            counted = handler.bad_input - before
            assert counted == len(warned), type(handler).__name__  # logged once per occurrence
            assert (counted >= 1) == bad, type(handler).__name__
    assert list(handlers[0].by_user()) == [user]
    await store.flush()
    assert (await store.read(usage_key(user, current_cycle())))["calls"] == 2
    await handlers[5].aclose()
    await store.aclose()


async def test_an_int_user_is_limited_as_it_is_charged() -> None:
    """user_id=0 was charged to "anonymous" while the limiter checked "0": 20 calls passed a
    budget of 5."""
    store = llmtally.open_store("memory://")
    limiter = BudgetLimiter(max_tokens=5, store=store)
    manager = CallbackManager([llmtally.UsageRecorder(store=store), limiter])
    one = {"usage": {"prompt_tokens": 1, "completion_tokens": 0}}
    passed = 0
    for _ in range(20):
        try:
            async with manager.llm_call(
                MESSAGES, model="gpt-4o", user_id=0, estimated_tokens=1
            ) as call:
                call.set_response(one)
            passed += 1
        except BudgetExceeded as refused:
            assert refused.user_id == "0"
    assert passed == 5
    assert (await limiter.remaining(0))["used"] == 5
    assert (await limiter.remaining("0"))["used"] == 5
    assert (await limiter.remaining("anonymous"))["used"] == 0
    await store.flush()
    assert (await store.read(usage_key("0", current_cycle())))["calls"] == 5
    assert await store.read(usage_key("anonymous", current_cycle())) in ({}, None)
    await store.aclose()


async def test_an_int_user_in_sqlite_is_limited_as_it_is_charged(tmp_path: Any) -> None:
    store = llmtally.open_store(f"sqlite:///{tmp_path}/usage.db")
    limiter = BudgetLimiter(max_tokens=5, store=store)
    manager = CallbackManager([llmtally.UsageRecorder(store=store), limiter])
    one = {"usage": {"prompt_tokens": 1, "completion_tokens": 0}}
    passed = 0
    for _ in range(20):
        try:
            async with manager.llm_call(
                MESSAGES, model="gpt-4o", user_id=0, estimated_tokens=1
            ) as call:
                call.set_response(one)
            passed += 1
        except BudgetExceeded:
            pass
    assert passed == 5
    await store.aclose()


async def test_true_after_one_is_not_charged_to_one() -> None:
    cost = CostTracker()
    manager = CallbackManager([cost])
    for user in (1, True):
        async with manager.llm_call(MESSAGES, model="gpt-4o", user_id=user) as call:
            call.set_response(USAGE)
    assert cost.by_user()["1"]["total_tokens"] == 5
    assert cost.by_user()["anonymous"]["total_tokens"] == 5
    assert (await manager.health())["bad_input"] == 1


async def test_a_list_id_is_bad_input_charged_to_anonymous() -> None:
    store = llmtally.open_store("memory://")
    cost, rec = CostTracker(), Recorder()
    manager = CallbackManager([rec, cost, llmtally.UsageRecorder(store=store)])
    async with manager.llm_call(MESSAGES, model="gpt-4o", user_id=["alice"]) as call:
        call.set_response(USAGE)
    assert rec.of("on_llm_end")[0][1]["user_id"] == "anonymous"
    assert cost.by_user() == {"anonymous": cost.by_user()["anonymous"]}
    assert (await manager.health())["bad_input"] == 1
    assert (await store.read(usage_key("anonymous", current_cycle())))["calls"] == 1
    await store.aclose()


@pytest.mark.parametrize("user", ["\ud800", "a\x1fb", "<other>x", "é" * 20_000])
async def test_any_str_id_is_counted_as_given_by_every_tracker(user: str) -> None:
    """A lone surrogate or a separator character in an id is still the id: every tracker
    counts it (the core's path and the handlers' own agree)."""
    store = llmtally.open_store("memory://")
    cost, tokens = CostTracker(), TokenCounter()
    manager = CallbackManager([cost, tokens, llmtally.UsageRecorder(store=store)])
    for _ in range(2):
        async with manager.llm_call(MESSAGES, model="gpt-4o", user_id=user) as call:
            call.set_response(USAGE)
    assert cost.by_user() == {user: cost.by_user()[user]}
    assert cost.by_user()[user]["total_tokens"] == 10
    assert tokens.total_tokens == 10
    assert (await store.read(usage_key(user, current_cycle())))["calls"] == 2
    assert (await manager.health())["errors"] == 0
    await store.aclose()


@pytest.mark.parametrize(
    "model", ["gpt-4o\x1falice", "gpt-4o\x1ealice", "a\x1e1b", "gpt-4o', 'alice"]
)
async def test_a_model_name_cannot_move_usage_to_another_user(model: str, metrics_on: None) -> None:
    cost, tokens = CostTracker(), TokenCounter()
    manager = CallbackManager([cost, tokens])
    for user, m in (("alice", "gpt-4o"), ("mallory", model)):
        async with manager.llm_call(MESSAGES, model=m, provider="openai", user_id=user) as call:
            call.set_response(USAGE)
    assert cost.by_user()["mallory"]["total_tokens"] == 5
    assert cost.by_user()["alice"]["total_tokens"] == 5
    assert cost.cost_for(user_id="alice") == cost.cost_for(model="gpt-4o")
    assert cost.by_model()[model]["total_tokens"] == 5
    assert tokens.by_model()[model]["total_tokens"] == 5
    assert cost.by_provider()["openai"]["total_tokens"] == 10
    usage = _observe.state.llm_usage()
    assert ("openai", model, "mallory") in usage
    assert ("openai", "gpt-4o", "mallory") not in usage


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


async def test_an_id_whose_comparison_raises_never_breaks_the_call() -> None:
    class Hostile:
        def __eq__(self, other: object) -> bool:
            raise RuntimeError("no")

        __hash__ = object.__hash__

    cost = CostTracker()
    manager = CallbackManager([cost])
    async with manager.llm_call(MESSAGES, model="gpt-4o", user_id=Hostile()) as call:
        call.set_response(USAGE)
    assert list(cost.by_user()) == ["anonymous"]
    assert (await manager.health())["bad_input"] == 1


@pytest.mark.parametrize("given", ["\ud800", "req-\udcff-1", "r\udfff" * 100])
async def test_a_request_id_without_a_utf8_form_is_a_digest_never_an_error(given: str) -> None:
    """Ids decoded with ``surrogateescape`` (from headers) carry lone surrogates: the call runs,
    through the core's path and a Python handler's, and a repeat is still a duplicate."""
    rec, tokens = Recorder(), TokenCounter()
    manager = CallbackManager([rec, tokens])
    for _ in range(2):
        async with manager.llm_call(MESSAGES, model="gpt-4o", request_id=given) as call:
            call.set_response(USAGE)
    ids = {kwargs["request_id"] for _, kwargs in rec.of("on_llm_end")}
    assert len(ids) == 1 and next(iter(ids)).startswith("sha256:")
    assert tokens.total_tokens == 5 and tokens.requests == 1  # the repeat: a duplicate
    health = await manager.health()
    assert (health["llm_calls"], health["duplicates"], health["errors"]) == (1, 1, 0)


async def test_a_long_request_id_is_kept_as_a_digest_and_still_deduplicated() -> None:
    store = llmtally.open_store("memory://")
    rec, tokens, recorder = Recorder(), TokenCounter(), llmtally.UsageRecorder(store=store)
    manager = CallbackManager([rec, tokens, recorder])
    long_id = "r" * 1_000_000
    for _ in range(2):
        async with manager.llm_call(MESSAGES, model="gpt-4o", request_id=long_id) as call:
            call.set_response(USAGE)
    ids = {kwargs["request_id"] for _, kwargs in rec.of("on_llm_end")}
    assert len(ids) == 1 and next(iter(ids)).startswith("sha256:") and len(next(iter(ids))) == 71
    assert tokens.total_tokens == 5  # the second end of the same request is a duplicate
    # A handler called directly keeps the same digest in its window.
    end = {"tokens_used": 5, "prompt_tokens": 3, "completion_tokens": 2}
    direct = llmtally.UsageRecorder(store=store)
    for _ in range(2):
        await direct.on_llm_end(end, model="gpt-4o", request_id=long_id)
    assert direct.duplicates == 1
    await store.aclose()
