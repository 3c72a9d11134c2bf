"""B7 (LiteLLM adapter): the cost of metering a LiteLLM call.

Same run, same LiteLLM offline reply (``mock_response=``: usage 10 + 20 tokens, no network),
``await litellm.acompletion(...)`` each time; a round ends when the system's success hook (run
by LiteLLM in a background task) has counted all its calls, so the hook is inside the time:

- ``empty``: the bare call, no callbacks (the floor);
- ``llmtally``: ``LlmtallyLogger([CostTracker(), TokenCounter()])`` in ``litellm.callbacks``;
- ``custom-logger``: a minimal LiteLLM ``CustomLogger`` adding the response's tokens and
  ``response_cost`` to Python counters (what a user writes by hand).

The terminal summary prints each one's added cost per call and the ratio of added costs.

    pytest benches/bench_litellm.py --benchmark-only
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from results import record

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch at import
pytest.importorskip("litellm")

import litellm
from litellm.integrations.custom_logger import CustomLogger

import llmtally
from llmtally.litellm import LlmtallyLogger

BATCH = 100  # calls per measured round
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
_GLOBAL_LISTS = (
    "callbacks",
    "input_callback",
    "success_callback",
    "failure_callback",
    "_async_input_callback",
    "_async_success_callback",
    "_async_failure_callback",
)


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    saved = {name: list(getattr(litellm, name)) for name in _GLOBAL_LISTS}
    loop = asyncio.new_event_loop()
    yield loop
    # LiteLLM's logging worker runs as a task of this loop: end it and any leftover task
    # before the loop closes (else they are destroyed pending, in a later test).
    pending = asyncio.all_tasks(loop)
    for task in pending:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.close()
    for name, value in saved.items():
        setattr(litellm, name, value)


class _Counting(CustomLogger):  # type: ignore[misc]
    """A hand-written LiteLLM logger: tokens and cost into Python counters."""

    def __init__(self) -> None:
        super().__init__()
        self.requests = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cost = 0.0

    async def async_log_success_event(
        self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        usage = response_obj.usage
        self.requests += 1
        self.prompt_tokens += usage.prompt_tokens
        self.completion_tokens += usage.completion_tokens
        self.cost += kwargs.get("response_cost") or 0.0


# A system: its callbacks, how many calls its hook has counted so far, and a final check.
System = tuple[list[Any], Callable[[], int | None], Callable[[], None]]


def _empty() -> System:
    return [], lambda: None, lambda: None


def _llmtally() -> System:
    cost, tokens = llmtally.CostTracker(), llmtally.TokenCounter()
    logger = LlmtallyLogger([cost, tokens])

    def check() -> None:
        assert tokens.total_tokens == tokens.requests * 30 > 0
        assert cost.request_count == tokens.requests
        assert logger.errors == 0 and logger.duplicates == 0

    return [logger], lambda: tokens.requests, check


def _custom_logger() -> System:
    counting = _Counting()

    def check() -> None:
        assert counting.prompt_tokens + counting.completion_tokens == counting.requests * 30 > 0

    return [counting], lambda: counting.requests, check


SYSTEMS: dict[str, Callable[[], System]] = {
    "empty": _empty,
    "llmtally": _llmtally,
    "custom-logger": _custom_logger,
}


@pytest.mark.benchmark(group="B7-litellm")
@pytest.mark.parametrize("system", list(SYSTEMS))
def test_litellm_acompletion(benchmark: Any, loop: asyncio.AbstractEventLoop, system: str) -> None:
    callbacks, counted, check = SYSTEMS[system]()
    litellm.callbacks = callbacks
    calls = 0

    async def batch() -> None:
        nonlocal calls
        for _ in range(BATCH):
            await litellm.acompletion(
                model="openai/gpt-4o", messages=MESSAGES, mock_response="Paris."
            )
        calls += BATCH
        # LiteLLM runs success hooks in background tasks: a batch ends when its hook has
        # counted every call (LiteLLM's tasks offer no event to wait on, and its long-lived
        # worker tasks never end).
        while (n := counted()) is not None and n < calls:  # noqa: ASYNC110
            await asyncio.sleep(0)

    loop.run_until_complete(batch())  # warm-up
    benchmark.pedantic(lambda: loop.run_until_complete(batch()), rounds=10, iterations=1)
    record("B7-litellm", system, benchmark.stats.stats.median / BATCH)
    check()
