"""Run context: the open scope of the running task, so nested scopes link through ``run_id`` and
``parent_run_id`` and inherit ``user_id``, ``trace_id`` and custom keys (contextvars)."""

from __future__ import annotations

import contextvars
from typing import Any

__all__ = ["_close_context", "_open_context", "current_run"]

# The innermost open scope: its event kwargs (with its ``run_id``); children inherit part.
_current: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "llmtally_run", default=None
)
# A scope's own keys, and the ones its end adds, never pass to the scopes opened inside it.
_NOT_INHERITED = frozenset(
    {
        "request_id",
        "run_id",
        "parent_run_id",
        "provider",
        "model",
        "estimated_tokens",
        "token_count",
        "cost",
        "duration_ms",
        "ttft_ms",
        "aborted",
    }
)


def _inherited(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if k not in _NOT_INHERITED}


def current_run() -> dict[str, Any] | None:
    """The innermost open scope's ``run_id`` and inheritable context, or ``None``."""
    ctx = _current.get()
    if ctx is None:
        return None
    return {"run_id": ctx["run_id"], **_inherited(ctx)}


def _open_context(
    context: dict[str, Any], run_id: str
) -> tuple[dict[str, Any], contextvars.Token[Any]]:
    """Build the event kwargs of a new scope (``context`` is ours to change) and make it the
    current run. A ``parent_run_id`` given in ``context`` (a framework's own run tree, such as
    LangChain's) wins over the enclosing scope's."""
    parent = _current.get()
    given_parent = context.get("parent_run_id")
    if parent is None:
        kwargs = context
        kwargs["parent_run_id"] = given_parent
    else:
        kwargs = _inherited(parent)
        kwargs.update(context)
        kwargs["parent_run_id"] = parent["run_id"] if given_parent is None else given_parent
    if kwargs.get("trace_id") is None:
        kwargs["trace_id"] = run_id
    kwargs["run_id"] = run_id
    if "user_id" in kwargs and kwargs["user_id"] is None:
        del kwargs["user_id"]
    return kwargs, _current.set(kwargs)


def _close_context(token: contextvars.Token[Any]) -> None:
    try:
        _current.reset(token)
    except ValueError:
        # Exited in another context than it was entered in: restore the parent by value.
        _current.set(token.old_value if token.old_value is not contextvars.Token.MISSING else None)
