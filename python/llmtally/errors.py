"""Exceptions raised by llmtally.

Everything derives from :class:`LlmtallyError`. Where a caller already catches a builtin for the
same mistake, the error also derives from it (a bad URL is a ``ValueError``, a missing tokenizer
a ``LookupError``). Only :class:`CallbackAbort` and its subclasses ever cross from a callback into
the LLM call, and only on purpose.
"""

from __future__ import annotations

__all__ = [
    "BadInput",
    "BadUsage",
    "BudgetExceeded",
    "CallbackAbort",
    "ConfigError",
    "InvalidHandler",
    "LlmtallyError",
    "RateLimited",
    "StoreError",
    "StoreUnavailable",
    "TokenizerUnavailable",
]


class LlmtallyError(Exception):
    """Base class of every llmtally error."""

    slug = "llmtally_error"


class ConfigError(LlmtallyError, ValueError):
    """A constructor argument, URL or environment variable is invalid."""

    slug = "config"


class InvalidHandler(ConfigError, TypeError):
    """Something given as a callback handler is not one."""

    slug = "invalid_handler"


class BadInput(LlmtallyError, ValueError):
    """Malformed data handed to llmtally where the caller can be told (never inside a callback)."""

    slug = "bad_input"


class BadUsage(BadInput):
    """Usage that cannot be trusted (a count of the wrong type, outside ``[0, 10**12)``, or
    parts larger than their whole): it is skipped whole. Raised by the core's readers
    (``extract_usage``, ``merge_stream_usage``, ``Usage(...)``); inside the event path it is
    counted as bad input, never raised."""

    slug = "bad_usage"


class TokenizerUnavailable(LlmtallyError, LookupError):
    """An exact token count was asked for but tiktoken or the model's encoding is not available."""

    slug = "tokenizer_unavailable"


class StoreError(LlmtallyError):
    """A storage backend failed."""

    slug = "store"


class StoreUnavailable(StoreError):
    """The storage backend cannot be reached."""

    slug = "store_unavailable"


class CallbackAbort(LlmtallyError):
    """Raised by a handler to stop the LLM call on purpose; the only error dispatch lets through."""

    slug = "callback_abort"


class BudgetExceeded(CallbackAbort):
    """The user's budget for the cycle does not allow this call."""

    slug = "budget_exceeded"

    def __init__(
        self,
        message: str = "",
        *,
        user_id: str | None = None,
        limit: float | int | None = None,
        used: float | int | None = None,
        requested: float | int | None = None,
        unit: str = "tokens",
        scope: str = "user",
        scope_id: str | None = None,
    ) -> None:
        self.user_id = user_id
        self.limit = limit
        self.used = used
        self.requested = requested
        self.unit = unit
        #: Which budget refused: ``"user"``, or the context kwarg of a scoped limiter
        #: (``"team"``, ``"org"``, ``"api_key"``, ``"model"``...), whose value is ``scope_id``.
        self.scope = scope
        self.scope_id = user_id if scope_id is None and scope == "user" else scope_id
        if not message:
            who = f"user {user_id!r}" if scope == "user" else f"{scope} {self.scope_id!r}"
            message = (
                f"budget exceeded for {who}: used {used} + requested {requested}"
                f" > limit {limit} {unit}"
            )
        super().__init__(message)


class RateLimited(CallbackAbort):
    """The user's rate limit does not allow this call now; retry after ``retry_after_s``."""

    slug = "rate_limited"

    def __init__(
        self,
        message: str = "",
        *,
        user_id: str | None = None,
        limit: float | int | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        self.user_id = user_id
        self.limit = limit
        self.retry_after_s = retry_after_s
        if not message:
            message = (
                f"rate limited for user {user_id!r}: limit {limit}, retry after {retry_after_s}s"
            )
        super().__init__(message)
