"""Dispatch: the manager, the face of firing events on handlers and scoping LLM calls and runs.

A handler's exception, hang (past ``timeout``) or slowness never reaches the caller and never
stops the other handlers: it is logged and counted. Only :class:`~llmtally.errors.CallbackAbort`
(``BudgetExceeded``, ``RateLimited``, ...) stops a call, on purpose.

The parts, one concept each: ``_ids`` (request and run ids), ``_tables`` (handler tables and
global callbacks), ``_firing`` (the firing loop), ``_context`` (run context), ``_calls``
(:class:`LLMCall` and the call context), ``_scopes`` (agent, tool, chain, retrieval). This module
re-exports what other modules import from it.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from llmtally._calls import CallContext, LLMCall, is_timeout, price_response
from llmtally._context import current_run
from llmtally._firing import _Dispatcher
from llmtally._ids import RequestWindow, new_id
from llmtally._observe import state as _observed
from llmtally._scopes import AgentRun, ChainRun, Retrieval, ToolCall
from llmtally._tables import (
    ASYNC,
    FAST,
    GROUP,
    SYNC,
    _Entry,
    _Table,
    get_global_callbacks,
    set_global_callbacks,
)
from llmtally.config import settings, validate_timeout
from llmtally.errors import InvalidHandler
from llmtally.events import EVENTS, AsyncCallbackHandler
from llmtally.metrics import auto_enable as auto_enable_metrics

__all__ = [
    "ASYNC",
    "FAST",
    "GROUP",
    "SYNC",
    "AgentRun",
    "CallbackManager",
    "ChainRun",
    "CompositeCallbackHandler",
    "LLMCall",
    "Retrieval",
    "ToolCall",
    "create_composite_callback",
    "RequestWindow",
    "current_run",
    "get_global_callbacks",
    "is_timeout",
    "new_id",
    "price_response",
    "set_global_callbacks",
]


class CallbackManager:
    """Fires events on a set of handlers and scopes LLM calls, agent runs, tools, chains and
    retrievals.

    Sequential mode (the default) runs handlers one after another, by priority (higher first),
    then by registration; ``parallel=True`` runs them concurrently (bounded by
    ``LLMTALLY_MAX_CONCURRENT_CALLBACKS`` when set). ``timeout`` (seconds) bounds each handler
    call; default ``LLMTALLY_CALLBACK_TIMEOUT_S``, else no bound.

    >>> import asyncio
    >>> class Printer(AsyncCallbackHandler):
    ...     async def on_llm_end(self, response, **kwargs):
    ...         print(response["tokens_used"])
    >>> async def main():
    ...     manager = CallbackManager([Printer()])
    ...     async with manager.llm_call([{"role": "user", "content": "hi"}]) as call:
    ...         call.set_response({"prompt_tokens": 9, "completion_tokens": 3})
    >>> asyncio.run(main())
    12
    """

    def __init__(
        self,
        callbacks: Iterable[object] | None = None,
        *,
        timeout: float | None = None,
        parallel: bool = False,
    ) -> None:
        env = settings()
        timeout = validate_timeout(timeout)
        if timeout is None:
            timeout = env.callback_timeout_s
        if not isinstance(parallel, bool):
            raise InvalidHandler(f"parallel must be a bool, not {type(parallel).__name__}")
        if callbacks is not None and not isinstance(callbacks, Iterable):
            raise InvalidHandler(
                f"callbacks must be a list of handlers, not {type(callbacks).__name__}"
            )
        auto_enable_metrics()  # the first manager registers the Prometheus collector
        self._dispatcher = _Dispatcher(timeout, parallel, env.max_concurrent_callbacks)
        # Its handlers, and what its calls and scopes get of it.
        self._ctx = ctx = CallContext(callbacks or (), self._dispatcher)
        self._stats = ctx.stats
        _observed.managers.add(self)

    # -- configuration --------------------------------------------------------------------

    @property
    def timeout(self) -> float | None:
        """Per-handler timeout in seconds, or ``None``."""
        return self._dispatcher.timeout

    @property
    def parallel(self) -> bool:
        """Whether handlers of one event run concurrently."""
        return self._dispatcher.parallel

    @property
    def handlers(self) -> list[object]:
        """The handlers fired, in sequential order (globals included)."""
        return [entry.handler for entry in self._current_table().entries]

    def add_handler(self, handler: object, *, priority: int = 0) -> None:
        """Register ``handler``; safe while events are in flight (they keep their snapshot)."""
        self._ctx.add(handler, int(priority))

    def remove_handler(self, handler: object) -> None:
        """Unregister ``handler`` (no-op when it is not registered)."""
        self._ctx.remove(handler)

    def _current_table(self) -> _Table:
        return self._ctx.current()

    # -- firing -----------------------------------------------------------------------------

    async def dispatch(self, event: str, *args: Any, **kwargs: Any) -> None:
        """Fire ``event`` (an ``on_*`` name) with these arguments on every handler."""
        targets = self._current_table().by_event.get(event)
        if targets is None:
            raise ValueError(f"unknown event {event!r}; events are: {', '.join(EVENTS)}")
        if targets:
            await self._dispatcher.fire(targets, event, args, kwargs)

    def llm_call(
        self,
        messages: Any = None,
        *,
        provider: str | None = None,
        model: str | None = None,
        **context: Any,
    ) -> LLMCall:
        """Scope one LLM call: ``on_llm_start`` on entry, then ``on_llm_end`` with the normalized
        response (or ``on_llm_error``, re-raising the error).

        ``context`` kwargs (``user_id``, ``request_id``, ``trace_id``, anything else) are passed
        to every event; nested scopes inherit ``user_id``, ``trace_id`` and custom keys. A
        ``run_id`` and ``parent_run_id`` given here (a framework's run ids) are kept.
        """
        return LLMCall(self._ctx, messages, provider, model, context)

    def agent_run(self, goal: Any = None, **context: Any) -> AgentRun:
        """Scope an agent run: ``on_agent_start``, ``await run.step(...)``, end or error."""
        return AgentRun(self._ctx, (goal,), context)

    def tool_call(self, tool_name: str, args: Any = None, **context: Any) -> ToolCall:
        """Scope a tool call: ``on_tool_start(tool_name, args)``, then end or error."""
        return ToolCall(self._ctx, (tool_name, args), context)

    def chain_run(self, chain_name: str, **context: Any) -> ChainRun:
        """Scope a chain run: ``on_chain_start(chain_name)``, then end or error."""
        return ChainRun(self._ctx, (chain_name,), context)

    def retrieval(self, query: Any = None, **context: Any) -> Retrieval:
        """Scope a retrieval: ``on_retrieval_start(query)``, then end (documents) or error."""
        return Retrieval(self._ctx, (query,), context)

    # -- health ---------------------------------------------------------------------------

    async def health(self) -> dict[str, Any]:
        """Handler and call counters; ``status`` is ``"healthy"`` unless a store reports
        otherwise."""
        entries = self._current_table().entries
        per_handler = []
        errors = timeouts = 0
        stores: list[dict[str, Any]] = []
        seen_stores: list[Any] = []
        for entry in entries:
            e, t = entry.errors, entry.timeouts
            handler = entry.handler
            nested = getattr(handler, "_dispatch_stats", None)
            if callable(nested):
                ne, nt = nested()
                e += ne
                t += nt
            errors += e
            timeouts += t
            per_handler.append({"name": entry.name, "errors": e, "timeouts": t})
            store = getattr(handler, "_llmtally_store", None)
            if store is not None and all(store is not s for s in seen_stores):
                seen_stores.append(store)
                try:
                    stores.append(await store.health())
                except Exception as exc:
                    stores.append({"status": "unhealthy", "ok": False, "error": repr(exc)})
        unhealthy = any(not s.get("ok", True) for s in stores)
        s = self._stats
        return {
            "status": "unhealthy" if unhealthy else "healthy",
            "handlers": len(entries),
            "errors": errors,
            "timeouts": timeouts,
            "bad_input": s.bad_input,
            "duplicates": s.duplicates,
            "abandoned_calls": s.abandoned,
            "usage_warnings": s.usage_warnings,
            "llm_calls": s.llm_calls,
            "llm_errors": s.llm_errors,
            "llm_timeouts": s.llm_timeouts,
            "store": stores[0] if len(stores) == 1 else (stores or None),
            "pending_deltas": sum(int(st.get("pending_deltas", 0)) for st in stores),
            "per_handler": per_handler,
        }


# ---------------------------------------------------------------------------------------------
# Composite handler.


def _make_event(event: str) -> Callable[..., Awaitable[None]]:
    async def method(self: CompositeCallbackHandler, *args: Any, **kwargs: Any) -> None:
        targets = self._table.by_event[event]
        if targets:
            await self._dispatcher.fire(
                targets, event, args, kwargs, stop_on_abort=event.endswith("_start")
            )

    method.__name__ = method.__qualname__ = event
    method.__doc__ = f"Fire ``{event}`` on every child handler, each isolated."
    return method


class CompositeCallbackHandler(AsyncCallbackHandler):
    """Several handlers behind one: every event fans out to the children that implement it,
    concurrently by default (``parallel=True``), one child's failure isolated from the others.

    Pick it to hand a fixed group of handlers around as one (the seed API); a
    :class:`CallbackManager` does the same with ordering, priorities and timeouts.
    """

    def __init__(self, handlers: Iterable[object] | None = None, parallel: bool = True) -> None:
        env = settings()
        self._dispatcher = _Dispatcher(
            env.callback_timeout_s, parallel, env.max_concurrent_callbacks
        )
        self._seq = itertools.count()
        self._entries: list[_Entry] = [
            _Entry(handler, 0, next(self._seq)) for handler in (handlers or ())
        ]
        self._table = _Table(self._entries)

    @property
    def handlers(self) -> list[object]:
        """The child handlers, in order."""
        return [entry.handler for entry in self._entries]

    def add_handler(self, handler: object) -> None:
        """Add a child handler."""
        self._entries = [*self._entries, _Entry(handler, 0, next(self._seq))]
        self._table = _Table(self._entries)

    def remove_handler(self, handler: object) -> None:
        """Remove a child handler (no-op when absent)."""
        self._entries = [entry for entry in self._entries if entry.handler is not handler]
        self._table = _Table(self._entries)

    def _dispatch_stats(self) -> tuple[int, int]:
        errors = timeouts = 0
        for entry in self._entries:
            errors += entry.errors
            timeouts += entry.timeouts
            nested = getattr(entry.handler, "_dispatch_stats", None)
            if callable(nested):
                e, t = nested()
                errors += e
                timeouts += t
        return errors, timeouts


for _event in EVENTS:
    setattr(CompositeCallbackHandler, _event, _make_event(_event))
del _event


def create_composite_callback(*handlers: object) -> CompositeCallbackHandler:
    """A :class:`CompositeCallbackHandler` over ``handlers`` (the seed factory)."""
    return CompositeCallbackHandler(list(handlers))
