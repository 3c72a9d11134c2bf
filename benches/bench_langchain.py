"""B7: the cost of metering a LangChain chat model call.

Same run, same fake chat model (``tests/fakechat.py``: an ``AIMessage`` with ``usage_metadata``,
no network), ``await model.ainvoke(...)`` each time:

- ``empty``: the bare call, no callbacks (the floor);
- ``llmtally``: ``LlmtallyCallbackHandler([CostTracker(), TokenCounter()])`` in the call's
  ``callbacks``;
- ``usage-metadata``: LangChain's own ``UsageMetadataCallbackHandler``.

The terminal summary prints each one's added cost per call and the ratio of added costs.

    pytest benches/bench_langchain.py --benchmark-only
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from results import record

pytest.importorskip("langchain_core")

from langchain_core.callbacks import UsageMetadataCallbackHandler

import llmtally
from llmtally.langchain import LlmtallyCallbackHandler

from fakechat import FakeChat

BATCH = 200  # calls per measured round
PROMPT = "What is the capital of France?"


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def _empty() -> tuple[list[Any], Callable[[], None]]:
    return [], lambda: None


def _llmtally() -> tuple[list[Any], Callable[[], None]]:
    cost, tokens = llmtally.CostTracker(), llmtally.TokenCounter()
    handler = LlmtallyCallbackHandler([cost, tokens])

    def check() -> None:
        assert tokens.total_tokens == tokens.requests * 120 > 0
        assert cost.total_cost_pusd == cost.request_count * 27_000_000
        assert handler.errors == 0

    return [handler], check


def _usage_metadata() -> tuple[list[Any], Callable[[], None]]:
    handler = UsageMetadataCallbackHandler()

    def check() -> None:
        assert handler.usage_metadata["gpt-4o-mini"]["total_tokens"] > 0

    return [handler], check


SYSTEMS: dict[str, Callable[[], tuple[list[Any], Callable[[], None]]]] = {
    "empty": _empty,
    "llmtally": _llmtally,
    "usage-metadata": _usage_metadata,
}


@pytest.mark.benchmark(group="B7-langchain")
@pytest.mark.parametrize("system", list(SYSTEMS))
def test_langchain_ainvoke(benchmark: Any, loop: asyncio.AbstractEventLoop, system: str) -> None:
    callbacks, check = SYSTEMS[system]()
    model = FakeChat()
    config: Any = {"callbacks": callbacks} if callbacks else None

    async def batch() -> None:
        for _ in range(BATCH):
            await model.ainvoke(PROMPT, config=config)

    loop.run_until_complete(batch())  # warm-up
    benchmark.pedantic(lambda: loop.run_until_complete(batch()), rounds=20, iterations=1)
    record("B7-langchain", system, benchmark.stats.stats.median / BATCH)
    check()
