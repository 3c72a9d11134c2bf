"""Agent, tool, chain and retrieval scopes: start on entry, end with the result, or error
(re-raised), nested through the run context like LLM calls."""

from __future__ import annotations

import contextlib
import logging
from types import TracebackType
from typing import Any

from llmtally._calls import _SAFE_USER_CHARS, CallContext, _normalize_user
from llmtally._context import _close_context, _open_context
from llmtally._ids import state as _id_state
from llmtally._tables import _Entry
from llmtally._tables import globals_state as _globals
from llmtally.errors import CallbackAbort

__all__ = ["AgentRun", "ChainRun", "Retrieval", "ToolCall"]

logger = logging.getLogger("llmtally")


class _Scope:
    """Agent, tool, chain and retrieval scopes: start on entry, end with the result set by
    :meth:`set_result`, or error (re-raised)."""

    __slots__ = ("_args", "_ctx", "_kwargs", "_result", "_table", "_token", "run_id")

    START: str
    END: str
    ERROR: str
    #: How many of the start arguments are repeated before the result/error (tool_name).
    PREFIX = 0

    def __init__(self, ctx: CallContext, args: tuple[Any, ...], context: dict[str, Any]) -> None:
        self._ctx = ctx
        self._args = args
        user = context.get("user_id")
        if user is not None and (type(user) is not str or not 0 < len(user) <= _SAFE_USER_CHARS):
            _normalize_user(ctx.stats, context)
        self._kwargs = context
        self._result: Any = None
        self.run_id = ""

    def set_result(self, result: Any) -> None:
        """The scope's result, passed to the end event."""
        self._result = result

    async def __aenter__(self) -> Any:
        ctx = self._ctx
        if ctx.version == _globals.version:
            self._table = ctx.table
        else:
            self._table = ctx.current()
        self.run_id = _id_state.maker.next()
        self._kwargs, self._token = _open_context(self._kwargs, self.run_id)
        targets = self._table.by_event[self.START]
        if targets:
            try:
                await ctx.dispatcher.fire(
                    targets, self.START, self._args, self._kwargs, stop_on_abort=True
                )
            except CallbackAbort as abort:
                completed: list[_Entry] = abort.__dict__.pop("_llmtally_completed", [])
                _close_context(self._token)
                await self._abort_started(abort, completed)
                raise
        return self

    async def _abort_started(self, abort: CallbackAbort, completed: list[_Entry]) -> None:
        """A handler refused the scope: the error event (``aborted=True``) for the handlers
        that already saw its start."""
        if not completed:
            return
        wanted = {id(e) for e in completed}
        targets = tuple(t for t in self._table.by_event[self.ERROR] if id(t[0]) in wanted)
        if targets:
            kwargs = {**self._kwargs, "aborted": True}
            with contextlib.suppress(CallbackAbort):  # already aborting
                await self._ctx.dispatcher.fire(
                    targets, self.ERROR, (*self._args[: self.PREFIX], abort), kwargs
                )

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        _close_context(self._token)
        prefix = self._args[: self.PREFIX]
        if exc is None:
            targets = self._table.by_event[self.END]
            if targets:
                await self._ctx.dispatcher.fire(
                    targets, self.END, (*prefix, self._result), self._kwargs
                )
            return None
        if isinstance(exc, GeneratorExit | KeyboardInterrupt | SystemExit):
            return None
        targets = self._table.by_event[self.ERROR]
        if targets:
            try:
                await self._ctx.dispatcher.fire(targets, self.ERROR, (*prefix, exc), self._kwargs)
            except CallbackAbort as abort:
                logger.debug(
                    "abort %r during %s ignored: the scope already failed", abort, self.ERROR
                )
        return None


class AgentRun(_Scope):
    """An agent run; ``await run.step(step)`` fires ``on_agent_step``."""

    __slots__ = ()
    START, END, ERROR = "on_agent_start", "on_agent_end", "on_agent_error"

    async def step(self, step: Any) -> None:
        """Record one agent step."""
        targets = self._table.by_event["on_agent_step"]
        if targets:
            await self._ctx.dispatcher.fire(targets, "on_agent_step", (step,), self._kwargs)


class ToolCall(_Scope):
    """A tool call."""

    __slots__ = ()
    START, END, ERROR = "on_tool_start", "on_tool_end", "on_tool_error"
    PREFIX = 1


class ChainRun(_Scope):
    """A chain run."""

    __slots__ = ()
    START, END, ERROR = "on_chain_start", "on_chain_end", "on_chain_error"


class Retrieval(_Scope):
    """A retrieval; the result is the documents."""

    __slots__ = ()
    START, END, ERROR = "on_retrieval_start", "on_retrieval_end", "on_retrieval_error"
