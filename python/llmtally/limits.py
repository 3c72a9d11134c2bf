"""Budgets and rate limits: handlers that refuse an LLM call before it runs.

:class:`BudgetLimiter` keeps each user's usage per billing cycle under a token and/or cost limit.
Before a call it reserves the call's estimate in one atomic step of the store (Redis: one Lua
script; memory and SQLite: one transaction), so concurrent calls, in one process or many sharing
a store, can never together pass the limit. After the call the reservation is settled to the
actual usage and dropped once that usage has been flushed to the store; a failed or aborted
call releases it at once.

Who records usage: not the limiter. It reads the ``total_tokens`` / ``cost_pusd`` fields that a
metering handler (:class:`~llmtally.UsageRecorder`, or a seed handler for that user) writes into
the same store; put one in the same manager, on the same store. Without one, calls are still
limited while they are in flight, but finished calls are not counted.

:class:`RateLimiter` bounds requests and/or tokens per minute over a sliding window, per user or
globally, in this process or shared through a store.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from llmtally.dispatch import new_id
from llmtally.errors import BudgetExceeded, ConfigError, RateLimited, StoreError
from llmtally.events import AsyncCallbackHandler
from llmtally.identity import charged_user, describe, user_of
from llmtally.pricing import lookup as price_lookup
from llmtally.storage import AsyncBackend, Store, resolve_store
from llmtally.storage._limits import NO_LIMIT, BudgetState, LocalLimits, check_budget
from llmtally.storage.keys import (
    current_cycle,
    parse_key,
    rate_key,
    usage_key,
    validate_cycle,
)
from llmtally.tokens import estimate_tokens

__all__ = ["BudgetLimiter", "RateLimiter"]

logger = logging.getLogger("llmtally")

_PUSD = 10**12
_MAX_TRACKED = 100_000


def _count(value: Any) -> int | None:
    """A token count given by the caller, or None when it is not a usable one."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 10**12:
        return None
    return value


def _pusd(cost_usd: Any) -> int:
    if isinstance(cost_usd, bool) or not isinstance(cost_usd, int | float):
        return 0
    if not math.isfinite(cost_usd) or cost_usd <= 0:
        return 0
    return round(cost_usd * _PUSD)


def _estimate(messages: Any, kwargs: Mapping[str, Any]) -> tuple[int, bool]:
    """The tokens a call may use: ``estimated_tokens`` when given, else the prompt's estimate
    plus ``max_tokens``. Returns ``(tokens, bad_input)``."""
    given = _count(kwargs.get("estimated_tokens"))
    if given is not None:
        return given, False
    model = kwargs.get("model")
    model = model if isinstance(model, str) and model != "unknown" else None
    bad = False
    tokens = 0
    if messages is not None:
        try:
            tokens = estimate_tokens(messages, model)
        except (TypeError, ValueError):
            bad = True
    tokens += _count(kwargs.get("max_tokens")) or 0
    return tokens, bad


def _priced_estimate(messages: Any, kwargs: Mapping[str, Any]) -> int:
    """A cost reservation from the price table: the prompt's estimate at the input price and
    ``max_tokens`` at the output price (an ``estimated_tokens`` total, having no split, at the
    output price, the dearer one). 0 for a model without a price."""
    model = kwargs.get("model")
    if not isinstance(model, str) or model in ("", "unknown"):
        return 0
    provider = kwargs.get("provider")
    prices = price_lookup(model, provider if provider not in (None, "unknown") else None)
    if prices is None:
        return 0
    given = _count(kwargs.get("estimated_tokens"))
    try:
        if given is not None:
            return int(prices.cost_pusd(0, given))
        prompt = estimate_tokens(messages, model) if messages is not None else 0
        completion = _count(kwargs.get("max_tokens")) or 0
        return int(prices.cost_pusd(prompt, completion))
    except (TypeError, ValueError, OverflowError):
        return 0


def _limits_backend(store: Store) -> AsyncBackend:
    backend = store.backend
    if not hasattr(backend, "budget") or not hasattr(backend, "rate_acquire"):
        raise ConfigError(f"the {backend.name} store does not support limits")
    return store.aio


async def _call_user_fn(fn: Callable[..., Any], arg: Any) -> None:
    result = fn(arg)
    if inspect.isawaitable(result):
        await result


class _Open(NamedTuple):
    """A reservation of a call in flight."""

    key: str
    res_id: str
    tokens: int
    pusd: int
    offline: bool  # made on this process's view while the store was unreachable


class BudgetLimiter(AsyncCallbackHandler):
    """Refuses an LLM call (``BudgetExceeded``) when the user's usage this cycle plus the
    calls in flight plus this call's estimate would pass ``max_tokens`` and/or
    ``max_cost_usd``.

    The user is the call's ``user_id`` kwarg (``"anonymous"`` without one); the cycle is the
    call's ``cycle_start_date`` kwarg, else the current UTC month. The reservation is the call's
    ``estimated_tokens`` kwarg, else :func:`~llmtally.estimate_tokens` of the messages plus the
    ``max_tokens`` kwarg; for a cost limit, the ``estimated_cost_usd`` kwarg, else the same
    estimate priced from the price table (0 for an unpriced model:
    the call then only needs budget left).

    Usage is read from the fields a metering handler (:class:`~llmtally.UsageRecorder`) writes
    into the same store, including this process's unflushed deltas: add one to the manager.
    Open reservations live in the ``reserved_tokens`` / ``reserved_pusd`` fields of the user's
    hash, each backed by a record that expires after ``reservation_ttl_s`` (a process that dies
    mid-call holds its budget that long, no longer).

    ``on_alert`` (a plain or coroutine function) gets ``{"user_id", "threshold", "used",
    "limit", "unit", "cycle_start_date"}`` once per user, cycle and threshold, across processes
    sharing the store (an ``alerted_<unit>_<permille>`` field marks it). When the store is
    unreachable the limiter enforces on this process's view (last usage seen plus local deltas
    and calls in flight), or refuses every call with ``fail_closed=True``.

    Raises:
        ConfigError: for bad arguments (no limit, a negative limit, a threshold outside (0, 1]).
    """

    def __init__(
        self,
        max_tokens: int | None = None,
        max_cost_usd: float | None = None,
        *,
        store: Store | str | None = None,
        thresholds: Sequence[float] = (0.5, 0.8, 1.0),
        on_alert: Callable[[dict[str, Any]], Any] | None = None,
        fail_closed: bool = False,
        reservation_ttl_s: float = 600.0,
    ) -> None:
        if max_tokens is None and max_cost_usd is None:
            raise ConfigError("BudgetLimiter needs max_tokens and/or max_cost_usd")
        if max_tokens is not None and _count(max_tokens) is None:
            raise ConfigError(f"max_tokens must be an int in [0, 10**12), not {max_tokens!r}")
        if max_cost_usd is not None and (
            isinstance(max_cost_usd, bool)
            or not isinstance(max_cost_usd, int | float)
            or not 0 <= max_cost_usd < 9e6
        ):
            raise ConfigError(f"max_cost_usd must be a number in [0, 9e6), not {max_cost_usd!r}")
        try:
            levels = sorted({float(t) for t in thresholds})
        except (TypeError, ValueError):
            raise ConfigError(f"thresholds must be numbers, not {thresholds!r}") from None
        if any(not 0 < t <= 1 for t in levels):
            raise ConfigError(f"thresholds must be in (0, 1], not {thresholds!r}")
        if on_alert is not None and not callable(on_alert):
            raise ConfigError("on_alert must be callable")
        if isinstance(reservation_ttl_s, bool) or not (
            isinstance(reservation_ttl_s, int | float) and 0 < reservation_ttl_s < math.inf
        ):
            raise ConfigError(f"reservation_ttl_s must be positive, not {reservation_ttl_s!r}")
        self.max_tokens = max_tokens
        self.max_cost_usd = max_cost_usd
        self.thresholds = tuple(levels)
        self.on_alert = on_alert
        self.fail_closed = bool(fail_closed)
        self.reservation_ttl_s = float(reservation_ttl_s)
        self._store = resolve_store(store)
        self._backend = _limits_backend(self._store)
        self._limits = (
            NO_LIMIT if max_tokens is None else max_tokens,
            NO_LIMIT if max_cost_usd is None else round(max_cost_usd * _PUSD),
        )
        self._ttl_ms = max(1, round(self.reservation_ttl_s * 1000))
        self._open: dict[Any, list[_Open]] = {}
        # Settled calls whose usage is in this process's ledger, not yet known flushed.
        self._held: dict[str, list[tuple[str, int, int]]] = {}
        self._held_sum: dict[str, tuple[int, int]] = {}
        self._offline: dict[str, tuple[int, int]] = {}
        self._last: dict[str, BudgetState] = {}
        self._alerted: set[tuple[str, str, int]] = set()
        self._task: asyncio.Task[None] | None = None
        self.allowed = 0
        self.refused = 0
        self.store_errors = 0
        self.alert_errors = 0
        self.bad_input = 0

    @property
    def store(self) -> Store:
        """The store holding usage and reservations."""
        return self._store

    @property
    def _llmtally_store(self) -> Store:
        return self._store

    # -- views ---------------------------------------------------------------------------------

    def _key(self, user_id: str, cycle: Any) -> tuple[str, str]:
        cycle = current_cycle() if cycle is None else validate_cycle(cycle)
        return usage_key(user_id, cycle), cycle

    def _adjust(self, key: str) -> tuple[int, int]:
        """What this process adds to the store's numbers: unflushed deltas, minus settled calls
        whose usage is both in those deltas (or already flushed) and still held as a
        reservation."""
        local = self._store.local(key)
        held_t, held_p = self._held_sum.get(key, (0, 0))
        return local.get("total_tokens", 0) - held_t, local.get("cost_pusd", 0) - held_p

    def _offline_state(self, key: str) -> BudgetState:
        last = self._last.get(key) or BudgetState(True, 0, 0, 0, 0)
        off_t, off_p = self._offline.get(key, (0, 0))
        return last._replace(
            reserved_tokens=last.reserved_tokens + off_t, reserved_pusd=last.reserved_pusd + off_p
        )

    def _remember(self, key: str, state: BudgetState) -> None:
        if len(self._last) >= _MAX_TRACKED and key not in self._last:
            self._last.clear()
        self._last[key] = state

    def _store_failed(self, what: str, exc: BaseException) -> None:
        self.store_errors += 1
        level = logging.WARNING if self.store_errors == 1 else logging.DEBUG
        logger.log(
            level, "BudgetLimiter: %s failed (%d store errors): %s", what, self.store_errors, exc
        )

    # -- events --------------------------------------------------------------------------------

    async def on_llm_start(self, messages: list[dict[str, Any]], **kwargs: Any) -> None:
        """Reserve the call's estimate, or raise ``BudgetExceeded``."""
        user_id = user_of(kwargs.get("user_id"), self)
        try:
            key, cycle = self._key(user_id, kwargs.get("cycle_start_date"))
        except ConfigError as exc:
            self.bad_input += 1
            logger.warning("BudgetLimiter: %s; the call is not limited", exc)
            return
        tokens, bad = _estimate(messages, kwargs)
        if bad:
            self.bad_input += 1
        pusd = _pusd(kwargs.get("estimated_cost_usd"))
        if not pusd and self.max_cost_usd is not None:
            pusd = _priced_estimate(messages, kwargs)
        res_id = new_id()
        adjust = self._adjust(key)
        offline = False
        try:
            state = await self._backend.budget(
                key,
                reserve=(res_id, tokens, pusd, self._ttl_ms),
                limits=self._limits,
                adjust=adjust,
            )
            self._remember(key, state)
        except StoreError as exc:
            self._store_failed("reserving", exc)
            if self.fail_closed:
                self.refused += 1
                unit, limit, requested = self._unit_numbers(tokens, pusd)
                raise BudgetExceeded(
                    f"budget of user {user_id!r} not checked: the store is unreachable "
                    "(fail_closed)",
                    user_id=user_id,
                    limit=limit,
                    used=None,
                    requested=requested,
                    unit=unit,
                ) from exc
            offline = True
            base = self._offline_state(key)
            ok = check_budget(
                base.used_tokens, base.reserved_tokens, adjust[0], tokens, self._limits[0]
            ) and check_budget(base.used_pusd, base.reserved_pusd, adjust[1], pusd, self._limits[1])
            state = base._replace(ok=ok)
            if ok:
                off_t, off_p = self._offline.get(key, (0, 0))
                self._offline[key] = (off_t + tokens, off_p + pusd)
        await self._check_alerts(key, user_id, cycle, state)
        if not state.ok:
            self.refused += 1
            self._refuse(user_id, state, adjust, tokens, pusd)
        self.allowed += 1
        token = kwargs.get("run_id") or kwargs.get("request_id")
        if len(self._open) >= _MAX_TRACKED:
            self._open.clear()  # bounded: forgotten reservations expire in the store
        self._open.setdefault(token, []).append(_Open(key, res_id, tokens, pusd, offline))

    def _unit_numbers(self, tokens: int, pusd: int) -> tuple[str, float | int, float | int]:
        if self.max_tokens is not None:
            return "tokens", self.max_tokens, tokens
        assert self.max_cost_usd is not None
        return "usd", self.max_cost_usd, pusd / _PUSD

    def _refuse(
        self, user_id: str, state: BudgetState, adjust: tuple[int, int], tokens: int, pusd: int
    ) -> None:
        used_t = state.used_tokens + state.reserved_tokens + adjust[0]
        used_p = state.used_pusd + state.reserved_pusd + adjust[1]
        limit_t = self._limits[0]
        if limit_t >= 0 and (used_t + tokens > limit_t or (tokens == 0 and used_t >= limit_t)):
            raise BudgetExceeded(
                user_id=user_id, limit=limit_t, used=used_t, requested=tokens, unit="tokens"
            )
        raise BudgetExceeded(
            user_id=user_id,
            limit=self.max_cost_usd,
            used=used_p / _PUSD,
            requested=pusd / _PUSD,
            unit="usd",
        )

    def _pop(self, kwargs: Mapping[str, Any]) -> _Open | None:
        token = kwargs.get("run_id") or kwargs.get("request_id")
        found = self._open.get(token)
        if not found:
            return None
        entry = found.pop(0)
        if not found:
            del self._open[token]
        return entry

    def _drop_offline(self, entry: _Open) -> None:
        off_t, off_p = self._offline.get(entry.key, (0, 0))
        off_t, off_p = max(0, off_t - entry.tokens), max(0, off_p - entry.pusd)
        if off_t or off_p:
            self._offline[entry.key] = (off_t, off_p)
        else:
            self._offline.pop(entry.key, None)

    async def on_llm_end(self, response: dict[str, Any], **kwargs: Any) -> None:
        """Settle the reservation to the call's actual usage (dropped once it is flushed)."""
        entry = self._pop(kwargs)
        if entry is None:
            return
        if entry.offline:
            self._drop_offline(entry)
            return
        tokens = 0
        pusd = 0
        if isinstance(response, Mapping):
            tokens = _count(response.get("tokens_used")) or 0
            pusd = _pusd(response.get("cost_estimate"))
        try:
            await self._backend.budget(entry.key, settle=(entry.res_id, tokens, pusd, self._ttl_ms))
        except StoreError as exc:
            self._store_failed("settling", exc)
        self._held.setdefault(entry.key, []).append((entry.res_id, tokens, pusd))
        held_t, held_p = self._held_sum.get(entry.key, (0, 0))
        self._held_sum[entry.key] = (held_t + tokens, held_p + pusd)
        self._kick()

    async def on_llm_error(self, error: BaseException, **kwargs: Any) -> None:
        """Release the reservation of a failed or aborted call."""
        entry = self._pop(kwargs)
        if entry is None:
            return
        if entry.offline:
            self._drop_offline(entry)
            return
        try:
            state = await self._backend.budget(entry.key, release=[entry.res_id])
            self._remember(entry.key, state)
        except StoreError as exc:
            self._store_failed("releasing", exc)  # the reservation expires with its TTL

    # -- settled reservations --------------------------------------------------------------------

    def _kick(self) -> None:
        task = self._task
        if task is not None and not task.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._task = loop.create_task(self._release_loop(), name="llmtally-budget-release")

    async def _release_loop(self) -> None:
        failures = 0
        while self._held:
            await asyncio.sleep(min(30.0, self._store.flush_interval_s * 2**failures))
            failures = 0 if await self.flush() else min(failures + 1, 10)

    async def flush(self) -> bool:
        """Flush the store, then drop the reservations of settled calls (their usage is now in
        the store) and fire the alerts it reached. Returns False when the store failed (the
        reservations stay, and expire with their TTL)."""
        if not self._held:
            return True
        snapshot = {key: list(items) for key, items in self._held.items()}
        if not await self._store.flush():
            return False
        ok = True
        for key, items in snapshot.items():
            try:
                state = await self._backend.budget(key, release=[i[0] for i in items])
            except StoreError as exc:
                self._store_failed("releasing settled calls", exc)
                ok = False
                continue
            done = {i[0] for i in items}
            left = [i for i in self._held.get(key, []) if i[0] not in done]
            if left:
                self._held[key] = left
                self._held_sum[key] = (sum(i[1] for i in left), sum(i[2] for i in left))
            else:
                self._held.pop(key, None)
                self._held_sum.pop(key, None)
            self._remember(key, state)
            parsed = parse_key(key)
            if parsed is not None:
                await self._check_alerts(key, parsed[0], parsed[1], state)
        return ok

    async def aclose(self) -> None:
        """Drop the reservations of settled calls now and stop the background task."""
        await self.flush()
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()

    # -- alerts --------------------------------------------------------------------------------

    async def _check_alerts(self, key: str, user_id: str, cycle: str, state: BudgetState) -> None:
        if self.on_alert is None:
            return
        adjust = self._adjust(key)
        held_t, held_p = self._held_sum.get(key, (0, 0))
        # Usage = stored + unflushed deltas (settled calls held as reservations are not added).
        used_t = state.used_tokens + adjust[0] + held_t
        used_p = state.used_pusd + adjust[1] + held_p
        for unit, used, limit in (
            ("tokens", used_t, self._limits[0]),
            ("usd", used_p, self._limits[1]),
        ):
            if limit < 0:
                continue
            for threshold in self.thresholds:
                if used < threshold * limit:
                    break
                permille = round(threshold * 1000)
                mark = (key, unit, permille)
                if mark in self._alerted:
                    continue
                if len(self._alerted) >= _MAX_TRACKED:
                    self._alerted.clear()
                self._alerted.add(mark)
                try:
                    first = await self._backend.claim_flag(key, f"alerted_{unit}_{permille}")
                except StoreError as exc:
                    self._store_failed("marking an alert", exc)
                    first = True
                if first:
                    await self._alert(user_id, cycle, unit, threshold, used, limit)

    async def _alert(
        self, user_id: str, cycle: str, unit: str, threshold: float, used: int, limit: int
    ) -> None:
        assert self.on_alert is not None
        alert = {
            "user_id": user_id,
            "threshold": threshold,
            "used": used if unit == "tokens" else used / _PUSD,
            "limit": limit if unit == "tokens" else self.max_cost_usd,
            "unit": unit,
            "cycle_start_date": cycle,
        }
        try:
            await _call_user_fn(self.on_alert, alert)
        except Exception as exc:
            self.alert_errors += 1
            logger.error("BudgetLimiter on_alert failed: %r", exc, exc_info=exc)

    # -- quota ---------------------------------------------------------------------------------

    async def remaining(self, user_id: str, cycle_start_date: str | None = None) -> dict[str, Any]:
        """The user's budget now: ``limit``, ``used`` (metered, with this process's unflushed
        deltas), ``reserved`` (calls in flight), ``remaining`` (never below 0) and ``unit``
        (``"tokens"`` when ``max_tokens`` is set, else ``"usd"``); with both limits, the cost
        numbers are under ``"usd"``. ``stale`` is True when the store could not be reached."""
        given = user_id
        user_id, bad = charged_user(given)
        if bad:
            raise ConfigError(f"user_id is {describe(given)}: give a str or an int")
        key, cycle = self._key(user_id, cycle_start_date)
        stale = False
        try:
            state = await self._backend.budget(key)
            self._remember(key, state)
        except StoreError as exc:
            self._store_failed("reading", exc)
            state = self._offline_state(key)
            stale = True
        adjust = self._adjust(key)
        held_t, held_p = self._held_sum.get(key, (0, 0))
        views: dict[str, dict[str, Any]] = {}
        for unit, used, reserved, limit in (
            (
                "tokens",
                state.used_tokens + adjust[0] + held_t,
                state.reserved_tokens - held_t,
                self._limits[0],
            ),
            (
                "usd",
                state.used_pusd + adjust[1] + held_p,
                state.reserved_pusd - held_p,
                self._limits[1],
            ),
        ):
            if limit < 0:
                continue
            reserved = max(0, reserved)
            left = max(0, limit - used - reserved)
            scale = 1 if unit == "tokens" else _PUSD
            views[unit] = {
                "user_id": user_id,
                "cycle_start_date": cycle,
                "limit": limit if unit == "tokens" else self.max_cost_usd,
                "used": used if unit == "tokens" else used / scale,
                "reserved": reserved if unit == "tokens" else reserved / scale,
                "remaining": left if unit == "tokens" else left / scale,
                "unit": unit,
                "stale": stale,
            }
        out = views.get("tokens") or views["usd"]
        if "tokens" in views and "usd" in views:
            out["usd"] = views["usd"]
        return out


class RateLimiter(AsyncCallbackHandler):
    """Refuses an LLM call (``RateLimited``, with ``retry_after_s``) past
    ``requests_per_minute`` and/or ``tokens_per_minute`` over a sliding window of
    ``window_s`` (60 s).

    ``per="user"`` keeps a window per call ``user_id`` (``"anonymous"`` without one);
    ``per="global"`` one for all calls. With ``store=None`` the windows live in this process;
    with a store (a ``Store`` or URL) they are shared by every process using it (Redis: one Lua
    script per call). Tokens count the call's estimate (as :class:`BudgetLimiter` reserves it)
    and are corrected to the actual usage when the call ends; a call aborted by another handler
    is taken out of the windows. ``clock`` (seconds, for tests) replaces the time source; store
    errors are logged and counted, and let the call through.
    """

    def __init__(
        self,
        requests_per_minute: int | None = None,
        tokens_per_minute: int | None = None,
        *,
        store: Store | str | None = None,
        per: str = "user",
        window_s: float = 60.0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if requests_per_minute is None and tokens_per_minute is None:
            raise ConfigError("RateLimiter needs requests_per_minute and/or tokens_per_minute")
        for name, value in (
            ("requests_per_minute", requests_per_minute),
            ("tokens_per_minute", tokens_per_minute),
        ):
            if value is not None and (_count(value) is None or value < 1):
                raise ConfigError(f"{name} must be a positive int, not {value!r}")
        if per not in ("user", "global"):
            raise ConfigError(f"per must be 'user' or 'global', not {per!r}")
        if isinstance(window_s, bool) or not (
            isinstance(window_s, int | float) and 0 < window_s < math.inf
        ):
            raise ConfigError(f"window_s must be positive, not {window_s!r}")
        if clock is not None and not callable(clock):
            raise ConfigError("clock must be a callable returning seconds")
        self.requests_per_minute = requests_per_minute
        self.tokens_per_minute = tokens_per_minute
        self.per = per
        self.window_s = float(window_s)
        self._window_ms = max(1, round(self.window_s * 1000))
        self._clock = clock
        self._store: Store | None = None if store is None else resolve_store(store)
        self._backend = None if self._store is None else _limits_backend(self._store)
        self._local = LocalLimits()
        self._dims: list[tuple[str, int]] = []
        if requests_per_minute is not None:
            self._dims.append(("requests", requests_per_minute))
        if tokens_per_minute is not None:
            self._dims.append(("tokens", tokens_per_minute))
        self._open: dict[Any, tuple[list[str], str, int]] = {}
        self.allowed = 0
        self.refused = 0
        self.store_errors = 0
        self.bad_input = 0

    @property
    def _llmtally_store(self) -> Store | None:
        return self._store

    def _now_ms(self) -> int | None:
        if self._clock is not None:
            return int(self._clock() * 1000)
        if self._backend is None:
            return int(time.monotonic() * 1000)
        return None  # the store's clock

    def _keys(self, user_id: str) -> list[str]:
        user = None if self.per == "global" else user_id
        return [rate_key(user, f"rate:{name}") for name, _ in self._dims]

    async def on_llm_start(self, messages: list[dict[str, Any]], **kwargs: Any) -> None:
        """Count the call in its windows, or raise ``RateLimited``."""
        user_id = user_of(kwargs.get("user_id"), self)
        keys = self._keys(user_id)
        tokens = 0
        if self.tokens_per_minute is not None:
            tokens, bad = _estimate(messages, kwargs)
            if bad:
                self.bad_input += 1
        weights = [1 if name == "requests" else tokens for name, _ in self._dims]
        limits = [limit for _, limit in self._dims]
        member = new_id()
        now = self._now_ms()
        if self._backend is None:
            result = self._local.rate_acquire(keys, member, weights, limits, self._window_ms, now)
        else:
            try:
                result = await self._backend.rate_acquire(
                    keys, member, weights, limits, self._window_ms, now
                )
            except StoreError as exc:
                self.store_errors += 1
                level = logging.WARNING if self.store_errors == 1 else logging.DEBUG
                logger.log(level, "RateLimiter: the store failed, call let through: %s", exc)
                return
        if not result.ok:
            self.refused += 1
            raise RateLimited(
                user_id=user_id,
                limit=limits[result.refused],
                retry_after_s=result.retry_after_ms / 1000,
            )
        self.allowed += 1
        token = kwargs.get("run_id") or kwargs.get("request_id")
        if token is not None:
            if len(self._open) >= _MAX_TRACKED:
                self._open.clear()
            self._open[token] = (keys, member, tokens)

    async def _update(self, key: str, member: str, old: int, new: int | None) -> None:
        if self._backend is None:
            self._local.rate_update(key, member, old, new)
            return
        try:
            await self._backend.rate_update(key, member, old, new)
        except StoreError as exc:
            self.store_errors += 1
            logger.debug("RateLimiter: updating a window failed: %s", exc)

    async def on_llm_end(self, response: dict[str, Any], **kwargs: Any) -> None:
        """Correct the call's tokens to its actual usage."""
        found = self._open.pop(kwargs.get("run_id") or kwargs.get("request_id"), None)
        if found is None or self.tokens_per_minute is None:
            return
        keys, member, estimate = found
        actual = _count(response.get("tokens_used")) if isinstance(response, Mapping) else None
        if actual is not None and actual != estimate:
            await self._update(keys[-1], member, estimate, actual)

    async def on_llm_error(self, error: BaseException, **kwargs: Any) -> None:
        """A call aborted before it ran (``aborted=True``) leaves the windows; a failed call
        still counts."""
        found = self._open.pop(kwargs.get("run_id") or kwargs.get("request_id"), None)
        if found is None or not kwargs.get("aborted"):
            return
        keys, member, estimate = found
        for (name, _), key in zip(self._dims, keys, strict=True):
            await self._update(key, member, 1 if name == "requests" else estimate, None)
