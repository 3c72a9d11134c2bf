"""The callback interface: every event llmtally fires, as no-op async methods.

Subclass :class:`AsyncCallbackHandler` (alias :data:`Callbacks`) and override only the events you
need; an event a handler does not override is never called for it, so it costs nothing.
:class:`CustomAsyncCallbackHandler` is the stricter base of the seed API: its three ``on_llm_*``
methods are abstract.
"""

from __future__ import annotations

import abc
from typing import Any

__all__ = [
    "EVENTS",
    "AsyncCallbackHandler",
    "Callbacks",
    "CustomAsyncCallbackHandler",
    "overridden_events",
]


class AsyncCallbackHandler:
    """Base class for handlers: every event is an async no-op, all take ``**kwargs``.

    Context kwargs come with every event when known: ``provider``, ``model``, ``user_id``,
    ``request_id``, ``trace_id``, ``run_id``, ``parent_run_id``; end events also carry
    ``token_count``, ``cost`` and ``duration_ms``.
    """

    # LLM
    async def on_llm_start(self, messages: list[dict[str, Any]], **kwargs: Any) -> None:
        """An LLM call starts with these chat messages."""

    async def on_llm_end(self, response: dict[str, Any], **kwargs: Any) -> None:
        """An LLM call ended; ``response`` is the normalized response dict."""

    async def on_llm_error(self, error: BaseException, **kwargs: Any) -> None:
        """An LLM call failed (or was aborted by a handler)."""

    async def on_llm_stream_chunk(self, chunk: Any, **kwargs: Any) -> None:
        """A streamed chunk arrived."""

    # Agents
    async def on_agent_start(self, goal: Any, **kwargs: Any) -> None:
        """An agent run starts."""

    async def on_agent_end(self, result: Any, **kwargs: Any) -> None:
        """An agent run ended."""

    async def on_agent_error(self, error: BaseException, **kwargs: Any) -> None:
        """An agent run failed."""

    async def on_agent_step(self, step: Any, **kwargs: Any) -> None:
        """An agent took a step."""

    # Tools
    async def on_tool_start(self, tool_name: str, args: Any, **kwargs: Any) -> None:
        """A tool call starts."""

    async def on_tool_end(self, tool_name: str, result: Any, **kwargs: Any) -> None:
        """A tool call ended."""

    async def on_tool_error(self, tool_name: str, error: BaseException, **kwargs: Any) -> None:
        """A tool call failed."""

    # Chains
    async def on_chain_start(self, chain_name: str, **kwargs: Any) -> None:
        """A chain run starts."""

    async def on_chain_end(self, result: Any, **kwargs: Any) -> None:
        """A chain run ended."""

    async def on_chain_error(self, error: BaseException, **kwargs: Any) -> None:
        """A chain run failed."""

    # Retrieval
    async def on_retrieval_start(self, query: Any, **kwargs: Any) -> None:
        """A retrieval starts."""

    async def on_retrieval_end(self, documents: Any, **kwargs: Any) -> None:
        """A retrieval ended."""

    async def on_retrieval_error(self, error: BaseException, **kwargs: Any) -> None:
        """A retrieval failed."""


Callbacks = AsyncCallbackHandler
"""Alias of :class:`AsyncCallbackHandler` (the name used by ai-infra)."""


class CustomAsyncCallbackHandler(AsyncCallbackHandler, abc.ABC):
    """Seed-compatible abstract base: ``on_llm_start``, ``on_llm_end`` and ``on_llm_error`` are
    abstract; every other event is a no-op."""

    @abc.abstractmethod
    async def on_llm_start(self, messages: list[dict[str, Any]], **kwargs: Any) -> None:
        """An LLM call starts with these chat messages."""

    @abc.abstractmethod
    async def on_llm_end(self, response: dict[str, Any], **kwargs: Any) -> None:
        """An LLM call ended; ``response`` is the normalized response dict."""

    @abc.abstractmethod
    async def on_llm_error(self, error: BaseException, **kwargs: Any) -> None:
        """An LLM call failed."""


EVENTS: tuple[str, ...] = tuple(
    name for name in vars(AsyncCallbackHandler) if name.startswith("on_")
)
"""Every event name, in declaration order."""

_NOOPS = {name: vars(AsyncCallbackHandler)[name] for name in EVENTS}
_overrides_cache: dict[type, frozenset[str]] = {}


def overridden_events(handler: object) -> frozenset[str]:
    """The events ``handler`` actually implements (decided once per class).

    A method inherited unchanged from :class:`AsyncCallbackHandler` does not count; any other
    callable attribute named like an event does, so duck-typed handlers work too.
    """
    instance_attrs = getattr(handler, "__dict__", None)
    if instance_attrs and any(name in instance_attrs for name in EVENTS):
        return _scan(handler)
    cls = type(handler)
    found = _overrides_cache.get(cls)
    if found is None:
        found = _overrides_cache[cls] = _scan(cls)
    return found


def _scan(obj: object) -> frozenset[str]:
    names = set()
    for name in EVENTS:
        attr = getattr(obj, name, None)
        if attr is None or attr is _NOOPS[name] or not callable(attr):
            continue
        if getattr(attr, "__func__", None) is _NOOPS[name]:
            continue
        names.add(name)
    return frozenset(names)
