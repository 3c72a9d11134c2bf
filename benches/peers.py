"""The systems compared: llmtally and the peers, each as one LLM call (start + end)."""

from __future__ import annotations

import asyncio
from typing import Any

import llmtally

# B1's metering set and LangChain's equivalent: the same definitions `llmtally bench` runs.
from llmtally.bench import langchain_metering_set as _langchain_set
from llmtally.bench import llmtally_metering_set as llmtally_metering_set

from harness import MESSAGES, USAGE, Call, llm_call


async def _noop() -> None:
    return None


def empty_harness(concurrent: bool) -> Call:
    """No callbacks at all: just the fake LLM."""
    if concurrent:
        return lambda: asyncio.sleep(0)
    return _noop


class _Counter(llmtally.AsyncCallbackHandler):
    def __init__(self) -> None:
        self.tokens = 0
        self.calls = 0

    async def on_llm_end(self, response: dict[str, Any], **kwargs: Any) -> None:
        self.tokens += response["tokens_used"]
        self.calls += 1


def llmtally_one_handler(concurrent: bool) -> tuple[Call, _Counter]:
    """One ``llm_call`` with one async counting handler."""
    counter = _Counter()
    call = llm_call(llmtally.CallbackManager([counter]), concurrent)
    return call, counter


def langchain_one_handler(concurrent: bool) -> tuple[Call, Any]:
    """The same through LangChain's ``AsyncCallbackManager`` with an equivalent handler."""
    from langchain_core.callbacks import AsyncCallbackHandler, AsyncCallbackManager
    from langchain_core.outputs import Generation, LLMResult

    class Counter(AsyncCallbackHandler):
        def __init__(self) -> None:
            self.tokens = 0
            self.calls = 0

        async def on_llm_end(self, response: LLMResult, **kwargs: Any) -> None:
            usage = (response.llm_output or {}).get("token_usage", {})
            self.tokens += usage.get("total_tokens", 0)
            self.calls += 1

    counter = Counter()
    manager = AsyncCallbackManager(handlers=[counter])
    result = LLMResult(generations=[[Generation(text="Paris")]], llm_output={"token_usage": USAGE})
    serialized: dict[str, Any] = {"name": "fake"}
    prompts = [MESSAGES[0]["content"]]
    sleep = asyncio.sleep

    async def call() -> None:
        run_managers = await manager.on_llm_start(serialized, prompts)
        if concurrent:
            await sleep(0)
        await run_managers[0].on_llm_end(result)

    return call, counter


def langchain_metering_set(concurrent: bool) -> tuple[Call, Any]:
    """The metering set's work through LangChain: token, cost and latency handlers."""
    made = _langchain_set(concurrent)
    if made is None:
        import pytest

        pytest.skip("langchain-core is not installed")
    return made
