"""The metering handlers of the seed API, and a shared per-call recorder.

``RedisTokenCallbackHandler(user_id)`` and ``DetailedRedisTokenCallbackHandler(user_id)`` charge
the user they were built for; ``UsageRecorder()`` charges each call's ``user_id`` kwarg
(``"anonymous"`` without one), which suits a gateway serving many users with one handler. All
write the whole normalized record (tokens with their cache and reasoning subsets, ``cost_pusd``,
``calls``, ``errors``, ``timeouts``) into the user's hash for the cycle, through the store's
in-process ledger: no await, no I/O on the call path.

Through a :class:`~llmtally.CallbackManager` they take the fast path (one synchronous call per
event, no coroutine); called directly, their async methods do exactly the same.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, ClassVar

from llmtally._calls import is_timeout
from llmtally._ids import RequestWindow
from llmtally._ids import state as _id_state
from llmtally._names import request_key
from llmtally._native import (
    BadUsage,
    CallUserSink,
    Sink,
    Usage,
    UserKeySink,
    extract_text,
    extract_usage,
    usd_to_pusd,
)
from llmtally.events import CustomAsyncCallbackHandler
from llmtally.identity import user_of
from llmtally.storage import Store, resolve_store
from llmtally.storage.keys import (
    charged_cycle,
    current_cycle,
    usage_key,
    validate_cycle,
    validate_user_id,
)
from llmtally.tokens import estimate_tokens

__all__ = [
    "DetailedRedisTokenCallbackHandler",
    "RedisTokenCallbackHandler",
    "UsageRecorder",
    "create_detailed_token_callback",
    "create_token_callback",
]

logger = logging.getLogger("llmtally")

_MAX_STARTS = 100_000
_NOT_RESPONSES = (str, bytes, int, float, list, tuple)


def _pusd(cost_usd: float | None) -> int:
    return 0 if cost_usd is None else usd_to_pusd(cost_usd) or 0


class _Meter(CustomAsyncCallbackHandler):
    """Shared machinery: dedupe by request id, usage from any response shape, one ledger add."""

    #: Whether a response without a prompt/completion split takes the slow path (to split it).
    _needs_split: ClassVar[bool] = False
    #: The manager calls these synchronous recorders directly (see _tables.FAST); through a
    #: manager the start needs no work (the response always carries usage, estimated if need be).
    _llmtally_fast: ClassVar[dict[str, str | None]] = {
        "on_llm_start": None,
        "on_llm_end": "_meter_end",
        "on_llm_error": "_meter_error",
    }

    def __init__(self, store: Store | str | None) -> None:
        self._store = resolve_store(store)
        self._window: RequestWindow | None = None
        self._starts: dict[Any, Any] = {}
        self.bad_input = 0
        self.duplicates = 0
        self.estimated_calls = 0

    @property
    def store(self) -> Store:
        """The store this handler writes to."""
        return self._store

    @property
    def _llmtally_store(self) -> Store:
        return self._store

    def _key_for(self, kwargs: Mapping[str, Any]) -> str:
        raise NotImplementedError

    def _llmtally_counted(self, store: Store, key: str, kwargs: Mapping[str, Any]) -> bool:
        """Whether this handler records the call of ``kwargs`` into ``key`` of ``store`` (a
        limiter next to it then does not count it a second time)."""
        if self._store is not store:
            return False
        try:
            return self._key_for(kwargs) == key
        except Exception:  # a cycle it cannot read: it records nothing
            return False

    def _llmtally_sink(self) -> Sink | None:
        """What the manager's one-crossing recorder writes for this handler (``None``: this
        handler's own recorder runs)."""
        return None

    # -- async API (the seed's), same behaviour as the fast path -----------------------------

    async def on_llm_start(self, messages: list[dict[str, Any]], **kwargs: Any) -> None:
        """Remember the prompt when this handler may need to estimate from it."""
        self._meter_start(messages, kwargs)

    async def on_llm_end(self, response: dict[str, Any], **kwargs: Any) -> None:
        """Record the call's usage."""
        self._meter_end(response, kwargs)

    async def on_llm_error(self, error: BaseException, **kwargs: Any) -> None:
        """Record a failed call (``errors``, or ``timeouts`` for a timeout)."""
        self._meter_error(error, kwargs)

    # -- the recorders -------------------------------------------------------------------------

    def _meter_start(self, messages: Any, kwargs: Mapping[str, Any]) -> None:
        # The prompt, kept for the estimate fallback; bounded, dropped at the end event.
        starts = self._starts
        if len(starts) >= _MAX_STARTS:
            starts.clear()
        starts[request_key(kwargs.get("request_id"))] = (messages, kwargs.get("model"))

    def _is_duplicate(self, request_id: Any) -> bool:
        # No id: count every end. An id made by this process's manager is unique by
        # construction (and the manager already drops repeated ids given by the caller).
        if request_id is None or (
            type(request_id) is str and request_id.startswith(_id_state.prefix)
        ):
            return False
        window = self._window
        if window is None:
            window = self._window = RequestWindow()
        key = request_key(request_id)
        if key is None:  # an id with no text: counted as bad input, its end counted
            self.bad_input += 1
            logger.warning("request_id could not be read: the end is counted")
            return False
        if window.seen(key):
            self.duplicates += 1
            return True
        return False

    def _meter_end(self, response: Any, kwargs: Mapping[str, Any]) -> None:
        request_id = kwargs.get("request_id")
        started = self._starts.pop(request_key(request_id), None) if self._starts else None
        if self._is_duplicate(request_id):
            return
        key = self._key_for(kwargs)
        store = self._store
        if type(response) is dict and (
            not self._needs_split
            or ("prompt_tokens" in response and "completion_tokens" in response)
        ):
            # The manager's normalized response: one crossing into the ledger.
            try:
                code = store.ledger.add_response(key, response)
            except (TypeError, ValueError, OverflowError):
                code = 2  # not trustworthy as given: the general path below decides
            if code != 2:
                if code == 1:
                    self.bad_input += 1  # usage skipped whole by the manager; the call counts
                store._kick()
                return
        try:
            usage = extract_usage(response) if response is not None else None
        except BadUsage as exc:
            self.bad_input += 1
            logger.warning("%s skipped bad usage: %s", type(self).__name__, exc)
            store.add(key, calls=1)
            return
        if usage is None and (response is None or isinstance(response, _NOT_RESPONSES)):
            self.bad_input += 1
        usage = self._complete(usage, response, started, kwargs)
        store.add(
            key,
            usage.total_tokens,
            usage.prompt_tokens or 0,
            usage.completion_tokens or 0,
            usage.cached_tokens,
            usage.cache_write_tokens,
            usage.reasoning_tokens,
            _pusd(usage.cost_usd),
            1,
        )

    def _complete(
        self, usage: Usage | None, response: Any, started: Any, kwargs: Mapping[str, Any]
    ) -> Usage:
        """The usage to record: as reported, else estimated (never a silent 0)."""
        if usage is not None:
            return usage
        self.estimated_calls += 1
        prompt, completion = self._estimate(response, started, kwargs)
        return Usage(prompt_tokens=prompt, completion_tokens=completion)

    def _estimate(self, response: Any, started: Any, kwargs: Mapping[str, Any]) -> tuple[int, int]:
        model = kwargs.get("model")
        model = model if isinstance(model, str) and model != "unknown" else None
        prompt = 0
        if started is not None:
            try:
                prompt = estimate_tokens(started[0], model)
            except (TypeError, ValueError):
                self.bad_input += 1
        content = None
        try:
            content = extract_text(response)
        except Exception:
            content = None
        completion = estimate_tokens(content, model) if content else 0
        return prompt, completion

    def _meter_error(self, error: BaseException, kwargs: Mapping[str, Any]) -> None:
        if self._starts:
            self._starts.pop(request_key(kwargs.get("request_id")), None)
        if kwargs.get("aborted"):
            return  # refused before it ran (budget, rate limit): not a provider error
        if is_timeout(error):
            self._store.add(self._key_for(kwargs), timeouts=1)
        else:
            self._store.add(self._key_for(kwargs), errors=1)


class RedisTokenCallbackHandler(_Meter):
    """Charges every LLM call to ``user_id`` for the billing cycle starting
    ``cycle_start_date`` (``"YYYY-MM-DD"``, default the first day of the current UTC month).

    Writes to ``store`` (a ``Store``, a URL, or ``None`` for the default store: SQLite, or Redis
    when ``REDIS_HOST``/``LLMTALLY_STORE`` say so).

    Raises:
        ValueError: for an empty ``user_id`` or a bad ``cycle_start_date``.
    """

    def __init__(
        self,
        user_id: str,
        cycle_start_date: str | None = None,
        *,
        store: Store | str | None = None,
    ) -> None:
        self.user_id = validate_user_id(user_id)
        self._fixed_cycle = None if cycle_start_date is None else validate_cycle(cycle_start_date)
        self._cycle_key: tuple[str, str] = ("", "")
        super().__init__(store)

    @property
    def cycle_start_date(self) -> str:
        """The cycle being charged."""
        return self._fixed_cycle or current_cycle()

    def _llmtally_sink(self) -> Sink | None:
        if self._needs_split:
            return None  # may need the prompt to split a bare total
        sample = "0000-00-00"
        prefix = usage_key(self.user_id, sample)[: -len(sample)]
        return UserKeySink(self._store, prefix, self._fixed_cycle)

    def _key_for(self, kwargs: Mapping[str, Any]) -> str:
        cycle = self._fixed_cycle or current_cycle()
        cached = self._cycle_key
        if cached[0] != cycle:
            cached = self._cycle_key = (cycle, usage_key(self.user_id, cycle))
        return cached[1]


class DetailedRedisTokenCallbackHandler(RedisTokenCallbackHandler):
    """Like :class:`RedisTokenCallbackHandler`, and always records a prompt/completion split:
    the response's own, else the total minus the estimated prompt, else an estimate of both."""

    _needs_split = True
    # Through a manager too, the prompt is kept: a provider may report only a total.
    _llmtally_fast: ClassVar[dict[str, str | None]] = {
        "on_llm_start": "_meter_start",
        "on_llm_end": "_meter_end",
        "on_llm_error": "_meter_error",
    }

    def _complete(
        self, usage: Usage | None, response: Any, started: Any, kwargs: Mapping[str, Any]
    ) -> Usage:
        if usage is not None and (usage.prompt_tokens is None or usage.completion_tokens is None):
            # Only a total: split it with the estimated prompt.
            prompt_estimate = 0
            if started is not None:
                model = kwargs.get("model")
                try:
                    prompt_estimate = estimate_tokens(
                        started[0], model if isinstance(model, str) and model != "unknown" else None
                    )
                except (TypeError, ValueError):
                    self.bad_input += 1
            total = usage.total_tokens
            if usage.prompt_tokens is not None:
                prompt = min(usage.prompt_tokens, total)
            elif usage.completion_tokens is not None:
                prompt = max(0, total - usage.completion_tokens)
            else:
                prompt = min(prompt_estimate, total)
            return Usage(
                total_tokens=total,
                prompt_tokens=prompt,
                completion_tokens=total - prompt,
                cost_usd=usage.cost_usd,
            )
        return super()._complete(usage, response, started, kwargs)


_MAX_CACHED_USER = 256


class UsageRecorder(_Meter):
    """One handler for every user: charges each call to its ``user_id`` kwarg (``"anonymous"``
    without one) and its ``cycle_start_date`` kwarg (default the current UTC month).

    Pick it for a gateway: one instance in the manager instead of a handler per user.
    """

    #: Charges each call to its own user on its store (a user budget limiter next to it on
    #: that store counts nothing itself).
    _llmtally_charges_call_user: ClassVar[bool] = True

    def __init__(self, *, store: Store | str | None = None) -> None:
        self._keys: dict[Any, tuple[str, str]] = {}
        super().__init__(store)

    def _llmtally_sink(self) -> Sink | None:
        return CallUserSink(self._store, usage_key)

    def _key_for(self, kwargs: Mapping[str, Any]) -> str:
        user_id = user_of(kwargs.get("user_id"), self)
        cycle = kwargs.get("cycle_start_date") or current_cycle()
        found = self._keys.get(user_id)
        if found is not None and type(cycle) is str and found[0] == cycle:
            return found[1]
        valid = charged_cycle(cycle, self)
        key = usage_key(user_id, valid)
        # The cache stays small in bytes, whatever the ids; it holds valid cycles only.
        if len(user_id) <= _MAX_CACHED_USER and valid == cycle:
            if len(self._keys) >= 100_000:
                self._keys.clear()
            self._keys[user_id] = (valid, key)
        return key


def create_token_callback(
    user_id: str, cycle_start_date: str | None = None, *, store: Store | str | None = None
) -> RedisTokenCallbackHandler:
    """A :class:`RedisTokenCallbackHandler` (the seed factory)."""
    return RedisTokenCallbackHandler(user_id, cycle_start_date, store=store)


def create_detailed_token_callback(
    user_id: str, cycle_start_date: str | None = None, *, store: Store | str | None = None
) -> DetailedRedisTokenCallbackHandler:
    """A :class:`DetailedRedisTokenCallbackHandler` (the seed factory)."""
    return DetailedRedisTokenCallbackHandler(user_id, cycle_start_date, store=store)
