"""In-process operational counters behind the Prometheus metrics (no dependency).

Failures of handlers are always counted here, per handler class and exception class. Handler
executions and durations, and LLM usage per provider and model, are recorded only while a
metrics exporter is enabled (:func:`llmtally.metrics.enable_metrics`): with none, the hot path
pays nothing for them. Counters only grow, so an exporter can serve them as Prometheus counters.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Any

from llmtally._names import MAX_NAME_CHARS, OTHER, KeyTable, name
from llmtally._native import Histogram, Ledger
from llmtally.identity import charged_user

__all__ = ["HandlerStats", "state", "stats_for"]

logger = logging.getLogger("llmtally")

#: Users given their own ``token_usage_total`` series; later users count under ``"<other>"``.
MAX_USERS = 10_000
#: (provider, model) pairs given their own series; later ones count under model ``"<other>"``.
MAX_MODELS = 1_000
#: Providers given their own label; later ones are ``"<other>"``.
MAX_PROVIDERS = 100
#: (provider, model, user) entries counted apart, and the memory they may take; past either, a
#: new one counts under user ``"<other>"`` (its model's series stay exact).
MAX_KEYS = 100_000
MAX_BYTES = 32 * 1024 * 1024


class HandlerStats:
    """Counters of every handler of one class (``callback_type``)."""

    __slots__ = (
        "durations",
        "error_types",
        "errors",
        "executions",
        "name",
        "successes",
        "timeouts",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.executions = 0
        self.successes = 0
        self.errors = 0
        self.timeouts = 0
        self.error_types: dict[str, int] = {}
        self.durations = Histogram(scale=1e9)  # seconds, nanosecond resolution

    def failed(self, exc: BaseException) -> None:
        self.errors += 1
        name = type(exc).__name__
        self.error_types[name] = self.error_types.get(name, 0) + 1


class _State:
    """Process-wide: per handler class stats, LLM usage, flushes, live managers and stores."""

    def __init__(self) -> None:
        self.on = False
        self.lock = threading.Lock()
        self.handlers: dict[str, HandlerStats] = {}
        # (provider, model, user) labels -> a slot of the ledger of counters (tokens, cost,
        # calls, errors, timeouts)
        self.llm = Ledger()
        self.table = KeyTable(
            MAX_KEYS,
            MAX_BYTES,
            lambda key: (key[0], key[1], OTHER),
            max_others=MAX_MODELS + MAX_PROVIDERS + 2,
        )
        self.llm_totals: dict[tuple[str, ...], list[int]] = {}
        self.users: set[str] = set()
        self.models: set[tuple[str, str]] = set()
        self.providers: set[str] = set()
        self.errors = 0  # calls left out of the metrics (a label that cannot be made)
        self.flush_batches: dict[tuple[str, str], int] = {}
        self.managers: weakref.WeakSet[Any] = weakref.WeakSet()
        self.stores: weakref.WeakSet[Any] = weakref.WeakSet()

    def model_label(self, provider: Any, model: Any) -> tuple[str, str]:
        """``(provider, model)`` labels; past ``MAX_MODELS`` pairs, ``"<other>"`` (model names
        come from callers and providers: the series must stay bounded)."""
        label = _label(name(provider))
        if label not in self.providers:
            if len(self.providers) >= MAX_PROVIDERS:
                label = OTHER
            else:
                self.providers.add(label)
        pair = (label, _label(name(model)))
        if pair in self.models:
            return pair
        if len(self.models) >= MAX_MODELS:
            return pair[0], OTHER
        self.models.add(pair)
        return pair

    def user_label(self, user: Any) -> str:
        """The charged user (the identity rule); ``"<other>"`` past ``MAX_USERS`` users or
        for an id longer than ``MAX_NAME_CHARS``."""
        label = _label(charged_user(user)[0])
        if label in self.users:
            return label
        if len(self.users) >= MAX_USERS or len(label) > MAX_NAME_CHARS:
            return OTHER
        self.users.add(label)
        return label

    def _key(self, provider: Any, model: Any, user: Any) -> str:
        if user is None:
            user = "anonymous"
        try:
            found = self.table.slots.get((provider, model, user))
        except TypeError:  # an unhashable id: bad input, labelled by the identity rule
            found = None
        if found is not None:
            return found  # the labels are the names as given
        return self.table.slot(*self.model_label(provider, model), self.user_label(user))

    def _add(self, key: str, *counts: int, **named: int) -> None:
        try:
            self.llm.add(key, *counts, **named)
        except OverflowError:  # the in-process ledger is full: move it to the totals first
            self.llm_usage()
            self.llm.add(key, *counts, **named)

    def llm_end(self, kwargs: dict[str, Any], response: dict[str, Any]) -> None:
        """Count one ended LLM call's usage (called only while metrics are on; never raises:
        metrics never break a call)."""
        try:
            key = self._key(
                response.get("provider") or kwargs.get("provider"),
                response.get("model") or kwargs.get("model"),
                kwargs.get("user_id"),
            )
            try:
                code = self.llm.add_response(key, response)
            except (TypeError, ValueError, OverflowError):
                code = 2
            if code == 2:
                self._add(key, calls=1)
        except Exception as exc:
            self._failed(exc)

    def llm_usage_end(
        self, kwargs: dict[str, Any], model: Any, usage: Any, cost_pusd: int | None
    ) -> None:
        """:meth:`llm_end` from a call's normalized ``Usage`` (no response dict needed)."""
        try:
            key = self._key(
                kwargs.get("provider"), model or kwargs.get("model"), kwargs.get("user_id")
            )
            self._add(
                key,
                usage.total_tokens,
                usage.prompt_tokens or 0,
                usage.completion_tokens or 0,
                usage.cached_tokens,
                usage.cache_write_tokens,
                usage.reasoning_tokens,
                cost_pusd or 0,
                1,
            )
        except Exception as exc:
            self._failed(exc)

    def llm_failed(self, kwargs: dict[str, Any], timeout: bool) -> None:
        try:
            key = self._key(kwargs.get("provider"), kwargs.get("model"), kwargs.get("user_id"))
            if timeout:
                self._add(key, timeouts=1)
            else:
                self._add(key, errors=1)
        except Exception as exc:
            self._failed(exc)

    def _failed(self, exc: Exception) -> None:
        self.errors += 1
        if self.errors == 1:
            logger.warning("a call's usage was left out of the metrics: %r", exc, exc_info=exc)
        else:
            logger.debug("a call's usage was left out of the metrics: %r", exc)

    def llm_usage(self) -> dict[tuple[str, str, str], list[int]]:
        """Totals so far per (provider, model, user): drained from the ledger into Python
        integers, so they only grow."""
        with self.lock:
            names = {slot: key for key, slot in self.table.slots.items()}
            for slot, counters in self.llm.drain().items():
                key = names[slot]
                acc = self.llm_totals.get(key)
                if acc is None:
                    self.llm_totals[key] = list(counters)
                else:
                    for i, v in enumerate(counters):
                        acc[i] += v
            return {(k[0], k[1], k[2]): list(v) for k, v in self.llm_totals.items()}

    def flushed(self, backend: str, ok: bool) -> None:
        key = (backend, "success" if ok else "error")
        self.flush_batches[key] = self.flush_batches.get(key, 0) + 1


def _label(value: Any) -> str:
    """A label value: the text, with anything not encodable as UTF-8 replaced."""
    text = value if type(value) is str else str(value)
    try:
        text.encode()
    except UnicodeEncodeError:
        text = text.encode("utf-8", "replace").decode()
    return text


state = _State()


def stats_for(name: str) -> HandlerStats:
    """The stats of handler class ``name`` (made on first use)."""
    found = state.handlers.get(name)
    if found is None:
        with state.lock:
            found = state.handlers.setdefault(name, HandlerStats(name))
    return found
