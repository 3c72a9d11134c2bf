"""Handlers that record what they see, for the tests."""

from __future__ import annotations

import asyncio
from typing import Any

import llmtally


class Recorder(llmtally.AsyncCallbackHandler):
    """Records every event it gets, with its arguments and kwargs."""

    def __init__(self, name: str = "rec", log: list[tuple[str, str]] | None = None) -> None:
        self.name = name
        self.events: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self.log = log

    def _rec(self, event: str, *args: Any, **kwargs: Any) -> None:
        self.events.append((event, args, kwargs))
        if self.log is not None:
            self.log.append((self.name, event))

    def names(self) -> list[str]:
        return [e[0] for e in self.events]

    def of(self, event: str) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
        return [(a, k) for e, a, k in self.events if e == event]

    async def on_llm_start(self, messages: Any, **kwargs: Any) -> None:
        self._rec("on_llm_start", messages, **kwargs)

    async def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        self._rec("on_llm_end", response, **kwargs)

    async def on_llm_error(self, error: BaseException, **kwargs: Any) -> None:
        self._rec("on_llm_error", error, **kwargs)

    async def on_llm_stream_chunk(self, chunk: Any, **kwargs: Any) -> None:
        self._rec("on_llm_stream_chunk", chunk, **kwargs)

    async def on_agent_start(self, goal: Any, **kwargs: Any) -> None:
        self._rec("on_agent_start", goal, **kwargs)

    async def on_agent_end(self, result: Any, **kwargs: Any) -> None:
        self._rec("on_agent_end", result, **kwargs)

    async def on_agent_error(self, error: BaseException, **kwargs: Any) -> None:
        self._rec("on_agent_error", error, **kwargs)

    async def on_agent_step(self, step: Any, **kwargs: Any) -> None:
        self._rec("on_agent_step", step, **kwargs)

    async def on_tool_start(self, tool_name: str, args: Any, **kwargs: Any) -> None:
        self._rec("on_tool_start", tool_name, args, **kwargs)

    async def on_tool_end(self, tool_name: str, result: Any, **kwargs: Any) -> None:
        self._rec("on_tool_end", tool_name, result, **kwargs)

    async def on_tool_error(self, tool_name: str, error: BaseException, **kwargs: Any) -> None:
        self._rec("on_tool_error", tool_name, error, **kwargs)

    async def on_chain_start(self, chain_name: str, **kwargs: Any) -> None:
        self._rec("on_chain_start", chain_name, **kwargs)

    async def on_chain_end(self, result: Any, **kwargs: Any) -> None:
        self._rec("on_chain_end", result, **kwargs)

    async def on_chain_error(self, error: BaseException, **kwargs: Any) -> None:
        self._rec("on_chain_error", error, **kwargs)

    async def on_retrieval_start(self, query: Any, **kwargs: Any) -> None:
        self._rec("on_retrieval_start", query, **kwargs)

    async def on_retrieval_end(self, documents: Any, **kwargs: Any) -> None:
        self._rec("on_retrieval_end", documents, **kwargs)

    async def on_retrieval_error(self, error: BaseException, **kwargs: Any) -> None:
        self._rec("on_retrieval_error", error, **kwargs)


class Failing(llmtally.AsyncCallbackHandler):
    """Raises ``exc`` from every LLM event."""

    def __init__(self, exc: BaseException | None = None) -> None:
        self.exc = exc or RuntimeError("handler bug")
        self.calls = 0

    async def on_llm_start(self, messages: Any, **kwargs: Any) -> None:
        self.calls += 1
        raise self.exc

    async def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        self.calls += 1
        raise self.exc


class Hanging(llmtally.AsyncCallbackHandler):
    """Never returns from ``on_llm_end`` (until cancelled)."""

    def __init__(self) -> None:
        self.cancelled = 0

    async def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise


MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
