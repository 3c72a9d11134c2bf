"""The event interface: fixed names, no-op defaults, the abstract seed base."""

from __future__ import annotations

import inspect
from typing import Any

import pytest

import llmtally
from llmtally.events import EVENTS, overridden_events

FIXED = [
    "on_llm_start",
    "on_llm_end",
    "on_llm_error",
    "on_llm_stream_chunk",
    "on_agent_start",
    "on_agent_end",
    "on_agent_error",
    "on_agent_step",
    "on_tool_start",
    "on_tool_end",
    "on_tool_error",
    "on_chain_start",
    "on_chain_end",
    "on_chain_error",
    "on_retrieval_start",
    "on_retrieval_end",
    "on_retrieval_error",
]


def test_every_fixed_event_is_an_async_no_op_taking_kwargs() -> None:
    assert list(EVENTS) == FIXED
    handler = llmtally.AsyncCallbackHandler()
    for name in FIXED:
        method = getattr(handler, name)
        assert inspect.iscoroutinefunction(method)
        params = inspect.signature(method).parameters
        assert any(p.kind is p.VAR_KEYWORD for p in params.values())
    assert llmtally.Callbacks is llmtally.AsyncCallbackHandler


async def test_no_op_defaults_return_none() -> None:
    handler = llmtally.Callbacks()
    assert await handler.on_tool_end("t", 1, x=1) is None
    assert await handler.on_llm_end({}) is None


def test_custom_handler_requires_the_three_llm_events() -> None:
    class Partial(llmtally.CustomAsyncCallbackHandler):
        async def on_llm_start(self, messages: Any, **kwargs: Any) -> None: ...

    with pytest.raises(TypeError):
        Partial()  # type: ignore[abstract]

    class Complete(Partial):
        async def on_llm_end(self, response: Any, **kwargs: Any) -> None: ...
        async def on_llm_error(self, error: BaseException, **kwargs: Any) -> None: ...

    assert overridden_events(Complete()) == {"on_llm_start", "on_llm_end", "on_llm_error"}
    assert isinstance(Complete(), llmtally.AsyncCallbackHandler)


def test_overridden_events_are_decided_per_class_and_for_duck_types() -> None:
    class Tools(llmtally.AsyncCallbackHandler):
        async def on_tool_start(self, tool_name: str, args: Any, **kwargs: Any) -> None: ...

    class Duck:
        async def on_chain_end(self, result: Any, **kwargs: Any) -> None: ...

    assert overridden_events(Tools()) == {"on_tool_start"}
    assert overridden_events(Duck()) == {"on_chain_end"}
    bound = Tools()
    bound.on_llm_end = lambda response, **kw: None  # type: ignore[method-assign,assignment]
    assert overridden_events(bound) == {"on_tool_start", "on_llm_end"}
    assert overridden_events(Tools()) == {"on_tool_start"}
