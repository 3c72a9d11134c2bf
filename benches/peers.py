"""The systems compared: llmtally and the peers, each as one LLM call (start + end)."""

from __future__ import annotations

import asyncio
from typing import Any

import llmtally

from harness import MESSAGES, USAGE, Call


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
    manager = llmtally.CallbackManager([counter])
    response = {"usage": USAGE}
    sleep = asyncio.sleep

    async def call() -> None:
        async with manager.llm_call(MESSAGES, provider="openai", model="gpt-4o") as c:
            if concurrent:
                await sleep(0)
            c.set_response(response)

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


def llmtally_metering_set(concurrent: bool) -> tuple[Call, Any]:
    """B1's metering set: RedisTokenCallbackHandler on the memory store, CostTracker and
    PerformanceTracker, flusher running."""
    store = llmtally.open_store("memory://")
    cost = llmtally.CostTracker()
    manager = llmtally.CallbackManager(
        [
            llmtally.RedisTokenCallbackHandler("alice", store=store),
            cost,
            llmtally.PerformanceTracker(),
        ]
    )
    response = {"usage": dict(USAGE, cost=0.000105)}
    sleep = asyncio.sleep

    async def call() -> None:
        async with manager.llm_call(MESSAGES, provider="openai", model="gpt-4o") as c:
            if concurrent:
                await sleep(0)
            c.set_response(response)

    class Check:
        @property
        def calls(self) -> int:
            return cost.request_count

        @property
        def tokens(self) -> int:
            return cost.total_tokens

    return call, Check()


def langchain_metering_set(concurrent: bool) -> tuple[Call, Any]:
    """The same work through LangChain: token, cost and latency handlers."""
    import time

    from langchain_core.callbacks import AsyncCallbackHandler, AsyncCallbackManager
    from langchain_core.outputs import Generation, LLMResult

    class Tokens(AsyncCallbackHandler):
        def __init__(self) -> None:
            self.tokens = 0
            self.calls = 0

        async def on_llm_end(self, response: LLMResult, **kwargs: Any) -> None:
            usage = (response.llm_output or {}).get("token_usage", {})
            self.tokens += usage.get("total_tokens", 0)
            self.calls += 1

    class Cost(AsyncCallbackHandler):
        def __init__(self) -> None:
            self.total = 0.0

        async def on_llm_end(self, response: LLMResult, **kwargs: Any) -> None:
            usage = (response.llm_output or {}).get("token_usage", {})
            self.total += (
                usage.get("prompt_tokens", 0) * 2.5e-6 + usage.get("completion_tokens", 0) * 10e-6
            )

    class Latency(AsyncCallbackHandler):
        def __init__(self) -> None:
            self.started: dict[Any, float] = {}
            self.samples: list[float] = []

        async def on_llm_start(self, serialized: Any, prompts: Any, **kwargs: Any) -> None:
            self.started[kwargs.get("run_id")] = time.perf_counter()

        async def on_llm_end(self, response: LLMResult, **kwargs: Any) -> None:
            t0 = self.started.pop(kwargs.get("run_id"), None)
            if t0 is not None:
                self.samples.append(time.perf_counter() - t0)

    tokens = Tokens()
    manager = AsyncCallbackManager(handlers=[tokens, Cost(), Latency()])
    result = LLMResult(generations=[[Generation(text="Paris")]], llm_output={"token_usage": USAGE})
    serialized: dict[str, Any] = {"name": "fake"}
    prompts = [MESSAGES[0]["content"]]
    sleep = asyncio.sleep

    async def call() -> None:
        run_managers = await manager.on_llm_start(serialized, prompts)
        if concurrent:
            await sleep(0)
        await run_managers[0].on_llm_end(result)

    return call, tokens
