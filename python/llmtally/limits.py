"""Budgets and rate limits: handlers that refuse an LLM call before it runs.

:class:`BudgetLimiter` keeps each user's (or team's, org's, API key's...) usage per billing cycle
under a token and/or cost limit with **quota leases**: a process takes a slice of the remaining
budget from the store in one atomic step (Redis: one Lua script; SQLite and memory: one
transaction) and admits calls against it locally, with no I/O on the hot path; the usage its
calls make, once flushed, shrinks the lease; the lease is renewed when a call does not fit,
returned when a renewal is refused, on close, or when its TTL runs out. The leases of all
processes plus the stored usage never pass the limit; near the limit the slices shrink to
exactly one call's estimate, so concurrent calls, in one process or many, cannot together pass
it (beyond what calls already admitted use over their estimates).

Who counts: a :class:`~llmtally.UsageRecorder` (or a seed handler for the call's user) in the
same manager, on the same store, records the call; the limiter then counts nothing itself. A
limiter on its own (or a scoped one: no recorder writes team budgets) records the usage it
enforces on (``total_tokens`` and ``cost_pusd`` of the budget's hash). Each call is counted once.

:class:`RateLimiter` bounds requests and/or tokens per minute over a sliding window, per user or
globally, in this process or shared through a store.

Outages: each limiter operation on the store is bounded by ``store_timeout_s`` (50 ms); after a
failure the limiter leaves the store alone for a backoff period and enforces on this process's
view (the last usage seen plus what this process added since), or refuses what needs the store
with ``fail_closed=True``. Calls inside a lease already granted need no store at all.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import math
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from llmtally import _runtime
from llmtally._ids import new_id
from llmtally._native import (
    LEDGER_FIELDS,
    PUSD_PER_USD,
    Lease,
    LeaseBook,
    pusd_to_usd,
    usd_to_pusd,
)
from llmtally._native import estimate_messages as _core_estimate_messages
from llmtally.errors import BudgetExceeded, ConfigError, RateLimited, StoreError
from llmtally.events import AsyncCallbackHandler
from llmtally.identity import charged_user, describe, user_of
from llmtally.pricing import lookup as price_lookup
from llmtally.storage import AsyncBackend, Store, resolve_store
from llmtally.storage._limits import NO_LIMIT, LeaseState, LocalLimits, RateResult, check_budget
from llmtally.storage.keys import (
    charged_cycle,
    current_cycle,
    rate_key,
    scope_key,
    usage_key,
    validate_cycle,
)
from llmtally.tokens import O200K_PREFIXES, estimate_tokens

if TYPE_CHECKING:
    from llmtally._calls import LLMCall

__all__ = ["BudgetLimiter", "RateLimiter"]

logger = logging.getLogger("llmtally")

_MAX_TRACKED = 100_000
#: Calls ended and not settled yet (see BudgetLimiter._catch_up) at most.
_MAX_ENDED = 4096
_MAX_BACKOFF_S = 30.0
#: How soon a limiter with ``limit_from_store`` sees a limit set or changed in the store.
_STORED_LIMIT_REFRESH_S = 5.0
_T = LEDGER_FIELDS.index("total_tokens")
_P = LEDGER_FIELDS.index("cost_pusd")


def _count(value: Any) -> int | None:
    """A token count given by the caller, or None when it is not a usable one."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 10**12:
        return None
    return value


def _pusd(cost_usd: Any) -> int:
    if isinstance(cost_usd, bool) or not isinstance(cost_usd, int | float):
        return 0
    try:
        return usd_to_pusd(cost_usd) or 0
    except OverflowError:  # (an int past a float)
        return 0


def _positive_s(name: str, value: Any) -> float:
    if isinstance(value, bool) or not (isinstance(value, int | float) and 0 < value < math.inf):
        raise ConfigError(f"{name} must be a positive number of seconds, not {value!r}")
    return float(value)


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


def _loop_time_at(deadline: float) -> float:
    """``deadline`` (``time.monotonic()``) on the running loop's clock."""
    return asyncio.get_running_loop().time() + (deadline - time.monotonic())


async def _all_done(tasks: list[asyncio.Task[None]]) -> None:
    """Wait for ``tasks``, whichever event loops run them (a limiter serves the caller's loop
    and the one of sync clients)."""
    here = asyncio.get_running_loop()
    waits: list[Any] = []
    for task in tasks:
        loop = task.get_loop()
        if loop is here:
            waits.append(task)
        elif not loop.is_closed():
            done: concurrent.futures.Future[None] = concurrent.futures.Future()

            def watch(task: asyncio.Task[None] = task, done: Any = done) -> None:
                task.add_done_callback(lambda _: done.set_result(None))

            try:
                loop.call_soon_threadsafe(watch)
            except RuntimeError:  # (closed meanwhile)
                continue
            waits.append(asyncio.wrap_future(done))
    await asyncio.gather(*waits, return_exceptions=True)


def _give_back(
    store: Store,
    leases: dict[str, _Lease],
    lease_id: str,
    limits: tuple[int, int],
    ttl_ms: int,
    stored_limit: bool,
) -> None:
    """A limiter was collected (no call can be in flight through it): once this process's
    usage is written, its lease records go, on the store's I/O threads."""
    keys = [lease.key for lease in list(leases.values()) if lease.known]
    if not keys or store.closed:
        return
    backend: Any = store.backend

    def run() -> None:
        if not store.flush_sync():
            return  # (the usage is not written: the records expire with their TTL)
        for key in keys:
            backend.lease(key, lease_id, limits=limits, ttl_ms=ttl_ms, stored_limit=stored_limit)

    store.in_background(run)


def _limits_backend(store: Store) -> AsyncBackend:
    backend = store.backend
    if not hasattr(backend, "lease") or not hasattr(backend, "rate_acquire"):
        raise ConfigError(f"the {backend.name} store does not support limits")
    return store.aio


async def _call_user_fn(fn: Callable[..., Any], arg: Any) -> None:
    result = fn(arg)
    if inspect.isawaitable(result):
        await result


def _claim(store: Store, key: str, field: str) -> Callable[[], bool]:
    backend: Any = store.backend
    return lambda: bool(backend.claim_flag(key, field))


class _Outage:
    """When a limiter may use its store: after a failure, not before a backoff period (doubling
    up to 30 s while the store keeps failing)."""

    __slots__ = ("backoff_s", "failures", "until")

    def __init__(self, backoff_s: float) -> None:
        self.backoff_s = backoff_s
        self.failures = 0
        self.until = 0.0

    def open(self) -> bool:
        return not self.failures or time.monotonic() >= self.until

    def failed(self) -> None:
        delay = min(_MAX_BACKOFF_S, self.backoff_s * 2 ** min(self.failures, 10))
        self.failures += 1
        self.until = time.monotonic() + delay

    def ok(self) -> None:
        self.failures = 0


#: This process's part of one budget (one key): what the store holds for it, what its calls in
#: flight reserved, and the last state of the store it saw (see ``_core.Lease``). Changed under
#: the limiter's lock (from the event loop, the store's I/O threads and its flusher).
_Lease = Lease


def _usage_of(response: Any) -> tuple[int, int]:
    """``(tokens, pusd)`` of a response dict (0 for what it does not say)."""
    if not isinstance(response, Mapping):
        return 0, 0
    return _count(response.get("tokens_used")) or 0, _pusd(response.get("cost_estimate"))


def _holds(lease: _Lease) -> tuple[int, int]:
    """What this process must hold of a budget now: its calls in flight (estimates) and the
    usage of its calls that ended, not written yet."""
    return (
        lease.inflight_t + lease.settled_t + lease.draining_t,
        lease.inflight_p + lease.settled_p + lease.draining_p,
    )


class _Ticket:
    """One renewal that wants to admit a call: the I/O thread admits it only if the caller
    has not given up waiting (and the caller learns whether it was)."""

    __slots__ = ("abandoned", "admitted", "state")

    def __init__(self) -> None:
        self.abandoned = False
        self.admitted = False
        self.state: LeaseState | None = None


#: A call admitted and not ended: its lease and estimate (tokens, pusd).
_Open = tuple[_Lease, int, int]


class BudgetLimiter(AsyncCallbackHandler):
    """Refuses an LLM call (``BudgetExceeded``) when the budget's usage this cycle plus the
    calls in flight plus this call's estimate would pass ``max_tokens`` and/or
    ``max_cost_usd``.

    The budget is the call's user (``scope="user"``, the default: its ``user_id`` kwarg,
    ``"anonymous"`` without one) or any other context kwarg (``scope="team"``, ``"org"``,
    ``"api_key"``, ``"model"``...; a call without that kwarg is not limited by it). Several
    limiters in one manager nest: the first whose budget is reached refuses, and
    ``BudgetExceeded.scope`` / ``scope_id`` say which. The cycle is the call's
    ``cycle_start_date`` kwarg, else the current UTC month. The estimate is the call's
    ``estimated_tokens`` kwarg, else :func:`~llmtally.estimate_tokens` of the messages plus the
    ``max_tokens`` kwarg; for a cost limit, the ``estimated_cost_usd`` kwarg, else the same
    estimate priced from the price table (0 for an unpriced model: the call then only needs
    budget left).

    Quota leases (see the module): calls are admitted against a slice of the remaining budget
    (``lease_fraction`` of it, at least the call's estimate) held in the store for this process,
    with no I/O; the slice is renewed when a call does not fit in it, or after half of
    ``reservation_ttl_s`` (a process that dies holds its lease that long, no longer).

    Counting: through a manager with a :class:`~llmtally.UsageRecorder` (or the seed handler of
    the call's user) on the same store, the recorder counts the call; otherwise the limiter
    records the usage it enforces on. Either way, once.

    ``on_alert`` (a plain or coroutine function) gets ``{"user_id", "threshold", "used",
    "limit", "unit", "cycle_start_date", "scope"}`` once per budget, cycle and threshold, across
    processes sharing the store (an ``alerted_<unit>_<permille>`` field marks it).

    Outages: no call waits more than ``store_timeout_s`` on the store; after a failure the
    limiter does not touch the store for ``store_backoff_s`` (doubling while it keeps failing)
    and enforces on this process's view, or refuses the calls that need the store with
    ``fail_closed=True``. ``await limiter.aclose()`` (or closing the store) returns the leases.

    Raises:
        ConfigError: for bad arguments (no limit, a negative limit, a threshold outside (0, 1]).
    """

    #: Through a manager: the start is admitted without a coroutine when the lease has room
    #: (``_fast_start`` returns an awaitable only when the store is needed), and the end is
    #: settled by the call after every recorder counted it (``_llmtally_settle``).
    _llmtally_limiter = True
    _llmtally_fast: ClassVar[dict[str, str | None]] = {
        "on_llm_start": "_start",
        "on_llm_end": None,
    }

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
        scope: str = "user",
        store_timeout_s: float = 0.05,
        store_backoff_s: float = 1.0,
        lease_fraction: float = 0.1,
        lease_idle_s: float = 1.0,
        limit_from_store: bool = False,
    ) -> None:
        if max_tokens is None and max_cost_usd is None and not limit_from_store:
            raise ConfigError(
                "BudgetLimiter needs max_tokens and/or max_cost_usd (or limit_from_store=True)"
            )
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
        if not isinstance(scope, str) or not scope or scope in ("user_id",):
            raise ConfigError(
                f"scope must be 'user' or the name of a context kwarg (such as 'team'), "
                f"not {scope!r}"
            )
        if isinstance(lease_fraction, bool) or not (
            isinstance(lease_fraction, int | float) and 0 <= lease_fraction <= 1
        ):
            raise ConfigError(f"lease_fraction must be in [0, 1], not {lease_fraction!r}")
        self.max_tokens = max_tokens
        self.limit_from_store = bool(limit_from_store)
        #: Whether tokens are limited (by max_tokens, or by each budget's stored limit).
        self._tokens = max_tokens is not None or self.limit_from_store
        self.max_cost_usd = max_cost_usd
        self.thresholds = tuple(levels)
        self.on_alert = on_alert
        self.fail_closed = bool(fail_closed)
        self.reservation_ttl_s = _positive_s("reservation_ttl_s", reservation_ttl_s)
        self.store_timeout_s = _positive_s("store_timeout_s", store_timeout_s)
        self.store_backoff_s = _positive_s("store_backoff_s", store_backoff_s)
        self.lease_fraction = float(lease_fraction)
        self.lease_idle_s = _positive_s("lease_idle_s", lease_idle_s)
        self.scope = scope
        self._store = resolve_store(store)
        self._backend = _limits_backend(self._store)
        self._limits = (
            NO_LIMIT if max_tokens is None else max_tokens,
            NO_LIMIT if max_cost_usd is None else usd_to_pusd(max_cost_usd) or 0,
        )
        self._ttl_ms = max(1, round(self.reservation_ttl_s * 1000))
        self._lease_id = new_id()
        self._mu = threading.Lock()
        self._leases: dict[str, _Lease] = {}
        # Leases whose store record may hold more than they need (see tick).
        self._dirty: set[str] = set()
        self._keys: dict[tuple[str, Any], _Lease] = {}
        self._open: dict[Any, _Open] = {}
        self._open_more: dict[Any, list[_Open]] = {}
        self._alerted: set[tuple[str, str, int]] = set()
        self._outage = _Outage(self.store_backoff_s)
        self._keep_alive_at = 0.0  # monotonic: the next look for leases to keep alive
        self._counts_users: dict[tuple[Any, ...], bool] = {}
        # Leases with usage settled since the last drain, and with usage in a drained batch.
        self._settled: set[_Lease] = set()
        self._draining: set[_Lease] = set()
        # The common case, a user budget in tokens only, is admitted in the core when the
        # user's lease has room; else _fast_start.
        self._book = LeaseBook(
            self._keys,
            self._open,
            self._open_more,
            self._counts_users,
            self._mu,
            self,
            self._settled,
            self._fast_start,
            self._settle_call,
            self._catch_up_now,
            _core_estimate_messages,
            list(O200K_PREFIXES),
            _MAX_TRACKED,
            _MAX_ENDED,
            time.monotonic(),
        )
        self._in_core = scope == "user" and max_cost_usd is None
        self._start: Callable[[Any, Any], Any] = (
            self._book.start if self._in_core else self._fast_start
        )
        self._alerting: set[asyncio.Task[None]] = set()
        # Alerts are checked in order, one at a time, on each event loop using the limiter.
        self._alert_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
            weakref.WeakKeyDictionary()
        )
        self._allowed = 0
        self.refused = 0
        self.store_errors = 0
        self.alert_errors = 0
        self.bad_input = 0
        self.renewals = 0
        self._store.add_write_listener(self)
        # Dropped without aclose(): its leases are given back (not held until their TTL).
        _runtime.hand_off.prepare()  # (the finalizer hands its work to that thread)
        finalizer = weakref.finalize(
            self,
            _give_back,
            self._store,
            self._leases,
            self._lease_id,
            self._limits,
            self._ttl_ms,
            self.limit_from_store,
        )
        # (at exit, closing the store gives them back)
        finalizer.atexit = False  # type: ignore[misc, unused-ignore]

    @property
    def allowed(self) -> int:
        """Calls admitted."""
        return self._allowed + self._book.admitted

    @property
    def store(self) -> Store:
        """The store holding usage and leases."""
        return self._store

    @property
    def _llmtally_store(self) -> Store:
        return self._store

    # -- budgets -------------------------------------------------------------------------------

    def _lease_for(self, kwargs: Mapping[str, Any]) -> _Lease | None:
        """The call's budget (``None``: a scoped limiter and a call without that kwarg)."""
        if self.scope == "user":
            scope_id = user_of(kwargs.get("user_id"), self)
        else:
            value = kwargs.get(self.scope)
            if value is None or value == "":
                return None
            scope_id, bad = charged_user(value)
            if bad:
                self.bad_input += 1
                logger.warning("BudgetLimiter: %s is %s: not limited", self.scope, describe(value))
                return None
        cycle = kwargs.get("cycle_start_date")
        if cycle == "" or (cycle is not None and type(cycle) is not str):
            # Not a cycle this limiter looks up as given: charged_cycle reads it (bad input
            # is counted and charged to the current month, as the recorders charge it).
            return self._make_lease(scope_id, charged_cycle(cycle, self))
        lease = self._keys.get((scope_id, cycle))
        if lease is not None and (cycle is not None or lease.cycle == current_cycle()):
            return lease
        return self._make_lease(scope_id, cycle)

    def _make_lease(self, scope_id: str, cycle_given: Any) -> _Lease:
        cycle = charged_cycle(cycle_given, self)
        key = (
            usage_key(scope_id, cycle)
            if self.scope == "user"
            else scope_key(self.scope, scope_id, cycle)
        )
        lease = self._leases.get(key)
        if lease is None:
            if len(self._leases) >= _MAX_TRACKED:
                self._forget_idle()
            lease = self._leases[key] = _Lease(key, scope_id, cycle)
            lease.limit_t = self._limits[0]
        if len(self._keys) >= _MAX_TRACKED:
            self._keys.clear()
        if cycle_given is None or cycle_given == cycle:  # (a bad cycle is counted each time)
            self._keys[(scope_id, cycle_given)] = lease
        return lease

    def _forget_idle(self) -> None:
        """Bounded memory: forget the budgets holding nothing (no call in flight, no usage
        unwritten; their leases expire in the store with their TTL)."""
        with self._mu:
            self._catch_up()
            for key in [k for k, v in self._leases.items() if _holds(v) == (0, 0)]:
                del self._leases[key]
        self._keys.clear()

    def _amounts(self, messages: Any, kwargs: Mapping[str, Any]) -> tuple[int, int]:
        given = kwargs.get("estimated_tokens")
        if self.max_cost_usd is None and type(given) is int and 0 <= given < 10**12:
            return given, 0  # the common case
        tokens = pusd = 0
        if self._tokens:
            tokens, bad = _estimate(messages, kwargs)
            if bad:
                self.bad_input += 1
        if self.max_cost_usd is not None:
            pusd = _pusd(kwargs.get("estimated_cost_usd")) or _priced_estimate(messages, kwargs)
        return tokens, pusd

    # -- the write listener (the store's flusher thread) ----------------------------------------

    def draining(self) -> None:
        """The store's ledger is about to be drained into a batch: the usage of every call
        settled so far is in it (a call settles after its usage entered the ledger)."""
        if not (self._settled or len(self._book)):
            return
        with self._mu:
            self._catch_up()
            for lease in self._settled:
                lease.draining_t += lease.settled_t
                lease.draining_p += lease.settled_p
                lease.settled_t = lease.settled_p = 0
                self._draining.add(lease)
            self._settled.clear()

    def written(self, batch: Any, refused: list[str], caught_up: bool) -> None:
        """Usage of this process reached the store: each lease it was covering shrinks by it,
        and (once no batch drained earlier waits any more: ``caught_up``) the usage of the
        calls drained leaves what the leases must cover, in one step."""
        if not self._leases:
            return
        with self._mu:
            if caught_up:
                for lease in self._draining:
                    lease.draining_t = lease.draining_p = 0
                self._draining.clear()
            for key, lease in list(self._leases.items()):
                counters = batch.get(key)
                tokens, pusd = counters[_T], counters[_P]
                if not (tokens or pusd) or key in refused:
                    continue
                lease.held_t = max(0, lease.held_t - tokens)
                lease.held_p = max(0, lease.held_p - pusd)
                lease.flushed_t += tokens
                lease.flushed_p += pusd
                self._dirty.add(key)

    # -- events --------------------------------------------------------------------------------

    async def on_llm_start(self, messages: list[dict[str, Any]], **kwargs: Any) -> None:
        """Admit the call against this process's lease, renewing it when it does not fit;
        else raise ``BudgetExceeded``."""
        slow = self._start(messages, kwargs)
        if slow is not None:
            await slow

    def _fast_start(self, messages: Any, kwargs: Mapping[str, Any]) -> Any:
        """:meth:`on_llm_start` without a coroutine when the lease has room: returns ``None``
        (admitted) or an awaitable that renews the lease (and admits or raises)."""
        try:
            lease = self._lease_for(kwargs)
        except ConfigError as exc:
            self.bad_input += 1
            logger.warning("BudgetLimiter: %s; the call is not limited", exc)
            return None
        if lease is None:
            return None
        tokens, pusd = self._amounts(messages, kwargs)
        token = kwargs.get("run_id") or kwargs.get("request_id")
        if self._admit_local(lease, tokens, pusd):
            self._opened(token, (lease, tokens, pusd))
            return None
        return self._start_slow(lease, tokens, pusd, token)

    async def _start_slow(self, lease: _Lease, tokens: int, pusd: int, token: Any) -> None:
        admitted, offline = await self._admit_slow(lease, tokens, pusd)
        if not admitted:
            self.refused += 1
            self._refuse(lease, tokens, pusd, offline)
        self._opened(token, (lease, tokens, pusd))

    def _opened(self, token: Any, entry: _Open) -> None:
        self._allowed += 1
        opened = self._open
        if token in opened:  # one id for several calls at once (rare): a queue of its own
            queue = self._open_more.setdefault(token, [])
            queue.append(entry)
            return
        if len(opened) >= _MAX_TRACKED:
            opened.clear()  # bounded: what they held returns with the lease's TTL
            self._open_more.clear()
        opened[token] = entry

    def _admit_local(self, lease: _Lease, tokens: int, pusd: int) -> bool:
        """Admit against the lease, no I/O (False: it does not fit, or it is due for renewal)."""
        now = time.monotonic()
        if lease.renewing is not None or now >= lease.renew_at:
            return False
        lease.last_used = now
        with self._mu:
            self._catch_up()
            if lease.shrinking:
                return False
            if lease.limit_t >= 0:
                committed = lease.inflight_t + lease.settled_t + lease.draining_t
                if committed + tokens > lease.held_t or (tokens == 0 and committed >= lease.held_t):
                    return False
            if self._limits[1] >= 0:
                committed = lease.inflight_p + lease.settled_p + lease.draining_p
                if committed + pusd > lease.held_p or (pusd == 0 and committed >= lease.held_p):
                    return False
            lease.inflight_t += tokens
            lease.inflight_p += pusd
        return True

    def tick(self) -> None:
        """After each flush (the store's flusher thread, no write under way): bring the store's
        record of each lease that changed down to what it still holds. An idle lease (no call
        admitted for two flush intervals) gives its unused slice back; a busy one is rewritten
        once the usage flushed since its renewal is half of it (in between, other processes
        see more of the budget taken than is: never less)."""
        if self._leases and time.monotonic() >= self._keep_alive_at and self._outage.open():
            self._keep_alive()
        dirty = self._dirty
        if not dirty or not self._outage.open():
            return
        idle_before = time.monotonic() - self.lease_idle_s
        for key in list(dirty):
            lease = self._leases.get(key)
            if lease is None or not lease.known:
                dirty.discard(key)
                continue
            shrink = lease.last_used < idle_before and lease.renewing is None
            if shrink:
                with self._mu:
                    self._catch_up()
                    target = _holds(lease)
                    if target == (lease.recorded_t, lease.recorded_p):
                        dirty.discard(key)
                        continue
                    lease.shrinking = True  # (a call now goes the slow way, after this)
            elif 2 * (lease.recorded_t - lease.held_t) > lease.recorded_t or (
                2 * (lease.recorded_p - lease.held_p) > lease.recorded_p
            ):
                target = (lease.held_t, lease.held_p)
            else:
                continue
            try:
                self._set_record(lease, target)
            except StoreError as exc:
                self._failed("bringing a lease down", exc)
                return
            finally:
                lease.shrinking = False
            if shrink:
                dirty.discard(key)

    def _keep_alive(self) -> None:
        """A lease with calls in flight and no call since its renewal was due (a long call, a
        quiet user) is rewritten as it is before its record expires in the store: calls in
        flight stay covered however long they run. Every quarter of ``reservation_ttl_s``."""
        now = time.monotonic()
        self._keep_alive_at = now + self.reservation_ttl_s / 4
        for lease in list(self._leases.values()):
            if not lease.known or lease.renewing is not None or now < lease.renew_at:
                continue
            with self._mu:
                self._catch_up()
                if not (lease.inflight_t or lease.inflight_p):
                    continue
                target = (lease.held_t, lease.held_p)
            try:
                self._set_record(lease, target)
            except StoreError as exc:
                self._failed("keeping a lease alive", exc)
                return
            with self._mu:
                lease.renew_at = max(lease.renew_at, now + self.reservation_ttl_s / 2)

    def _set_record(self, lease: _Lease, target: tuple[int, int]) -> None:
        """Make the store's record of ``lease`` ``target`` (at most what it holds now)."""
        state: LeaseState = self._store.backend.lease(  # type: ignore[attr-defined]
            lease.key,
            self._lease_id,
            base=(
                target[0] if self._tokens else 0,
                target[1] if self._limits[1] >= 0 else 0,
            ),
            limits=self._limits,
            ttl_ms=self._ttl_ms,
            stored_limit=self.limit_from_store,
        )
        with self._mu:
            lease.held_t = min(lease.held_t, state.held_tokens)
            lease.held_p = min(lease.held_p, state.held_pusd)
            lease.recorded_t, lease.recorded_p = state.held_tokens, state.held_pusd
            lease.used_t, lease.used_p = state.used_tokens, state.used_pusd
            lease.others_t, lease.others_p = state.others_tokens, state.others_pusd
            lease.flushed_t = lease.flushed_p = 0

    async def _admit_slow(self, lease: _Lease, tokens: int, pusd: int) -> tuple[bool, bool]:
        """Renew the lease with this call in it. Returns ``(admitted, offline)``. The call waits
        ``store_timeout_s`` at most, for another call's renewal and its own together; past it,
        it is decided on this process's view."""
        deadline = time.monotonic() + self.store_timeout_s
        while lease.renewing is not None:  # one renewal per budget at a time
            renewal = lease.renewing
            try:
                # (a future of no event loop: the renewal may be another loop's, a sync client's)
                async with asyncio.timeout_at(_loop_time_at(deadline)):
                    await asyncio.shield(asyncio.wrap_future(renewal))
            except TimeoutError:
                return self._admit_offline(lease, tokens, pusd), True
            if self._admit_local(lease, tokens, pusd):
                return True, False
            refused = lease.refused
            if (
                refused is not None
                and refused[0] is renewal
                and self._no_less(refused[1], tokens, pusd)
            ):
                # The store refused as much while this call waited: refused too, no I/O.
                return False, False
        left = deadline - time.monotonic()
        if not self._outage.open() or left < self.store_timeout_s / 10:
            # (the store is left alone after a failure; or this call waited its time already)
            return self._admit_offline(lease, tokens, pusd), True
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        done.set_running_or_notify_cancel()  # (never cancelled: its waiters shield it)
        lease.renewing = done
        ticket = _Ticket()
        try:
            await self._store.bounded_call(
                lambda: self._renew(lease, (tokens, pusd), ticket),
                left,
                locked=True,
            )
        except StoreError as exc:
            with self._mu:
                ticket.abandoned = True
                if ticket.admitted:  # it came through after all
                    return True, False
            self._failed("renewing a lease", exc)
            return self._admit_offline(lease, tokens, pusd), True
        except BaseException:
            # Cancelled (or interrupted) while the store answers: the renewal goes on in the
            # store's thread; the call never opens, so an admission gives its estimate back.
            with self._mu:
                ticket.abandoned = True
                if ticket.admitted:
                    lease.settle(tokens, pusd, 0, 0)
            raise
        finally:
            lease.renewing = None
            done.set_result(None)
        self._outage.ok()
        state = ticket.state
        assert state is not None
        lease.refused = None if ticket.admitted else (done, (tokens, pusd))
        if self.on_alert is not None:
            await self._check_alerts(lease)
        return ticket.admitted, False

    def _no_less(self, refused: tuple[int, int], tokens: int, pusd: int) -> bool:
        """Whether a call of ``tokens`` / ``pusd`` wants at least what was ``refused``."""
        return (not self._tokens or tokens >= refused[0]) and (
            self._limits[1] < 0 or pusd >= refused[1]
        )

    def _slice(self, lease: _Lease, unit: int, base: int, want: int) -> int:
        """How much more than this call to take: a fraction of the room seen last time, in
        whole calls of this one's size (0 near the limit: per-call reservations)."""
        limit = lease.limit_t if unit == 0 else self._limits[unit]
        if limit < 0 or not self.lease_fraction:
            return 0
        if unit == 0:
            room = limit - lease.used_t - lease.flushed_t - lease.others_t - base - want
        else:
            room = limit - lease.used_p - lease.flushed_p - lease.others_p - base - want
        slice_ = max(0, int(room * self.lease_fraction))
        if want > 0:  # whole calls of this size: no scraps left in a lease
            slice_ -= slice_ % want
        return slice_

    def _renew(
        self, lease: _Lease, want: tuple[int, int] | None, ticket: _Ticket | None
    ) -> LeaseState:
        """One lease operation (the store's I/O thread, no batch being written): the store
        record becomes what this process holds (calls in flight and unflushed usage), plus
        ``want`` and a slice when it fits."""
        backend: Any = self._store.backend
        keep_ticking = False
        if want is not None and not lease.known and self.lease_fraction:
            # The first lease of this budget here: its slice is sized on what the store holds.
            seen: LeaseState = backend.lease(
                lease.key, "", limits=self._limits, stored_limit=self.limit_from_store
            )
            with self._mu:
                lease.limit_t = seen.limit_tokens
                lease.used_t, lease.used_p = seen.used_tokens, seen.used_pusd
                lease.others_t, lease.others_p = seen.others_tokens, seen.others_pusd
                lease.known = True
        with self._mu:
            self._catch_up()
            base = _holds(lease)
            if not self._tokens:
                base = (0, base[1])
            if self._limits[1] < 0:
                base = (base[0], 0)
        if want is None:
            slice_ = (0, 0)
            wanted = None
        else:
            wanted = (
                want[0] if self._tokens else 0,
                want[1] if self._limits[1] >= 0 else 0,
            )
            slice_ = (
                self._slice(lease, 0, base[0], wanted[0]),
                self._slice(lease, 1, base[1], wanted[1]),
            )
        state: LeaseState = backend.lease(
            lease.key,
            self._lease_id,
            base=base,
            want=wanted,
            slice_=slice_,
            limits=self._limits,
            ttl_ms=self._ttl_ms,
            stored_limit=self.limit_from_store,
        )
        with self._mu:
            lease.limit_t = state.limit_tokens
            lease.held_t, lease.held_p = state.held_tokens, state.held_pusd
            lease.recorded_t, lease.recorded_p = state.held_tokens, state.held_pusd
            lease.used_t, lease.used_p = state.used_tokens, state.used_pusd
            lease.others_t, lease.others_p = state.others_tokens, state.others_pusd
            lease.flushed_t = lease.flushed_p = 0
            lease.known = True
            lease.renew_at = time.monotonic() + self.reservation_ttl_s / 2
            if self.limit_from_store:  # a limit set (or changed) in the store applies soon
                lease.renew_at = min(lease.renew_at, time.monotonic() + _STORED_LIMIT_REFRESH_S)
            self._dirty.add(lease.key)
            if want is not None:
                self.renewals += 1
                keep_ticking = True
            if ticket is not None:
                ticket.state = state
                if state.ok and want is not None and not ticket.abandoned:
                    ticket.admitted = True
                    lease.inflight_t += want[0]
                    lease.inflight_p += want[1]
        if keep_ticking:
            self._store.keep_ticking()  # the leases of long calls are kept alive there (tick)
        return state

    def _admit_offline(self, lease: _Lease, tokens: int, pusd: int) -> bool:
        """The store is unreachable: refuse (``fail_closed``) or decide on this process's view,
        the last usage seen plus what this process added since."""
        if self.fail_closed:
            return False
        with self._mu:
            self._catch_up()
            held_t, held_p = _holds(lease)
            ok = check_budget(
                lease.used_t + lease.flushed_t + lease.others_t, held_t, 0, tokens, lease.limit_t
            ) and check_budget(
                lease.used_p + lease.flushed_p + lease.others_p, held_p, 0, pusd, self._limits[1]
            )
            if ok:
                lease.inflight_t += tokens
                lease.inflight_p += pusd
        return ok

    def _failed(self, what: str, exc: BaseException) -> None:
        self.store_errors += 1
        self._outage.failed()
        level = logging.WARNING if self.store_errors == 1 else logging.DEBUG
        logger.log(
            level,
            "BudgetLimiter: %s failed (%d store errors), the store is left alone for %.1fs: %s",
            what,
            self.store_errors,
            max(0.0, self._outage.until - time.monotonic()),
            exc,
        )

    def _refuse(self, lease: _Lease, tokens: int, pusd: int, offline: bool) -> None:
        who = {"scope": self.scope, "scope_id": lease.scope_id}
        user_id = lease.scope_id if self.scope == "user" else None
        if offline and self.fail_closed:
            unit, limit, requested = (
                ("tokens", lease.limit_t, tokens)
                if self._tokens
                else ("usd", self.max_cost_usd, pusd_to_usd(pusd))
            )
            raise BudgetExceeded(
                f"budget of {self.scope} {lease.scope_id!r} not checked: the store is "
                "unreachable (fail_closed)",
                user_id=user_id,
                limit=limit,
                used=None,
                requested=requested,
                unit=unit,
                **who,
            )
        # ``used``: everything committed (stored usage, this process's unflushed usage and
        # calls in flight, the other processes' leases).
        held_t, held_p = _holds(lease)
        used_t = lease.used_t + lease.flushed_t + lease.others_t + held_t
        used_p = lease.used_p + lease.flushed_p + lease.others_p + held_p
        limit_t = lease.limit_t
        if limit_t >= 0 and (
            self._limits[1] < 0 or used_t + tokens > limit_t or (tokens == 0 and used_t >= limit_t)
        ):
            raise BudgetExceeded(
                user_id=user_id, limit=limit_t, used=used_t, requested=tokens, unit="tokens", **who
            )
        raise BudgetExceeded(
            user_id=user_id,
            limit=self.max_cost_usd,
            used=pusd_to_usd(used_p),
            requested=pusd_to_usd(pusd),
            unit="usd",
            **who,
        )

    def _pop(self, kwargs: Mapping[str, Any]) -> _Open | None:
        return self._pop_token(kwargs.get("run_id") or kwargs.get("request_id"))

    def _pop_token(self, token: Any) -> _Open | None:
        entry = self._open.pop(token, None)
        if entry is not None and self._open_more:
            self._requeue(token)
        return entry

    def _requeue(self, token: Any) -> None:
        """The next call waiting under ``token`` (one id for several calls at once) takes its
        place."""
        queue = self._open_more.get(token)
        if queue:
            self._open[token] = queue.pop(0)
            if not queue:
                del self._open_more[token]

    def _catch_up(self) -> None:
        """Settle the calls ended since the last time (``self._mu`` held): their estimates
        go, their usage stays covered until it is written. Every step that reads what a lease
        holds does this first."""
        if len(self._book):
            self._book.catch_up()

    def _catch_up_now(self) -> None:
        with self._mu:
            self._catch_up()

    def _settle(self, entry: _Open, tokens: int = 0, pusd: int = 0) -> None:
        """The call ended: its estimate goes, its usage (``tokens`` / ``pusd``, already in the
        store's ledger) stays covered until it is written."""
        lease, estimate_t, estimate_p = entry
        with self._mu:
            if lease.settle(estimate_t, estimate_p, tokens, pusd):
                self._settled.add(lease)

    async def on_llm_end(self, response: dict[str, Any], **kwargs: Any) -> None:
        """Count the call's usage (called directly, no recorder counts it), then let its
        estimate go."""
        entry = self._pop(kwargs)
        if entry is None:
            return
        tokens, pusd = _usage_of(response)
        self._count(entry[0], tokens, pusd)
        self._settle(entry, tokens, pusd)  # after the usage is in the ledger
        if self.on_alert is not None:
            await self._check_alerts(entry[0])

    @property
    def _llmtally_settle(self) -> Callable[[LLMCall, tuple[Any, ...]], None]:
        """Through a manager, once the call's end was recorded: count it unless one of
        ``meters`` (the manager's recorders) did or it is a duplicate, then let its estimate
        go. A user budget in tokens is settled in the core (in a batch, see _catch_up)."""
        return self._book.settle if self._in_core else self._settle_call

    def _settle_call(self, call: LLMCall, meters: tuple[Any, ...]) -> None:
        """:attr:`_llmtally_settle` in Python (alerts: in a task of their own)."""
        entry = self._open.pop(call.run_id, None)
        if entry is None:
            return
        if self._open_more:
            self._requeue(call.run_id)
        lease = entry[0]
        if call.duplicate:  # counted by nobody
            self._settle(entry)
        else:
            tokens, pusd = call.usage_totals()
            if not (self._counts_users.get(meters) or self._counted_by(meters, lease, call)):
                self._count(lease, tokens, pusd)
            self._settle(entry, tokens, pusd)
        if self.on_alert is not None:  # in a task of its own (kept until it is done)
            task = asyncio.get_running_loop().create_task(self._check_alerts(lease))
            self._alerting.add(task)
            task.add_done_callback(self._alerting.discard)

    def _counted_by(self, meters: tuple[Any, ...], lease: _Lease, call: LLMCall) -> bool:
        if not meters:
            return False
        store = self._store
        if self.scope == "user":
            known = self._counts_users.get(meters)
            if known is None:
                # A recorder charging each call's user on this store counts every call here.
                known = any(
                    getattr(m, "_llmtally_charges_call_user", False) and m.store is store
                    for m in meters
                )
                if len(self._counts_users) >= 64:
                    self._counts_users.clear()
                self._counts_users[meters] = known
            if known:
                return True
        kwargs = call.context
        return any(m._llmtally_counted(store, lease.key, kwargs) for m in meters)

    def _count(self, lease: _Lease, tokens: int, pusd: int) -> None:
        """Record the usage of a call no recorder counted (tokens and cost)."""
        if tokens or pusd:
            try:
                self._store.add(lease.key, total_tokens=tokens, cost_pusd=pusd)
            except OverflowError:
                self.bad_input += 1

    async def on_llm_error(self, error: BaseException, **kwargs: Any) -> None:
        """Let the estimate of a failed or aborted call go."""
        entry = self._pop(kwargs)
        if entry is not None:
            self._settle(entry)

    # -- returning leases ----------------------------------------------------------------------

    def store_closing(self) -> None:
        """The store is closing, its deltas written (its I/O thread, no write under way): give
        every lease back (best effort: what is not returned expires with its TTL)."""
        for lease in list(self._leases.values()):
            try:
                self._return(lease)
            except StoreError as exc:
                logger.debug("BudgetLimiter: returning a lease failed: %s", exc)

    def _return(self, lease: _Lease) -> None:
        if not lease.known:
            return
        with self._mu:
            lease.renew_at = 0.0
        self._renew(lease, None, None)

    async def flush(self) -> bool:
        """Write this process's usage and bring every lease down to what it still covers
        (calls in flight), giving the rest of each slice back; the alerts under way are
        delivered first. False when the store failed."""
        if self._alerting:
            await _all_done(list(self._alerting))
        ok = await self._store.flush()
        for lease in list(self._leases.values()):
            if not lease.known:
                continue
            try:
                await self._store.bounded_call(
                    lambda lease=lease: self._return(lease),  # type: ignore[misc]
                    self.store_timeout_s,
                    locked=True,
                )
            except StoreError as exc:
                self._failed("returning a lease", exc)
                ok = False
        return ok

    async def aclose(self) -> None:
        """Give this process's leases back now (another process sees the room at once)."""
        await self.flush()

    # -- alerts --------------------------------------------------------------------------------

    async def _check_alerts(self, lease: _Lease) -> None:
        loop = asyncio.get_running_loop()
        lock = self._alert_locks.get(loop)
        if lock is None:
            lock = self._alert_locks[loop] = asyncio.Lock()
        async with lock:  # in order, one at a time
            await self._check_alerts_locked(lease)

    async def _check_alerts_locked(self, lease: _Lease) -> None:
        assert self.on_alert is not None
        used_t = lease.used_t + lease.flushed_t + lease.settled_t + lease.draining_t
        used_p = lease.used_p + lease.flushed_p + lease.settled_p + lease.draining_p
        for unit, used, limit in (
            ("tokens", used_t, lease.limit_t),
            ("usd", used_p, self._limits[1]),
        ):
            if limit < 0:
                continue
            for threshold in self.thresholds:
                if used < threshold * limit:
                    break
                permille = round(threshold * 1000)
                mark = (lease.key, unit, permille)
                if mark in self._alerted:
                    continue
                if len(self._alerted) >= _MAX_TRACKED:
                    self._alerted.clear()
                self._alerted.add(mark)
                first = True
                if self._outage.open():
                    try:
                        first = await self._store.bounded_call(
                            _claim(self._store, lease.key, f"alerted_{unit}_{permille}"),
                            self.store_timeout_s,
                            locked=False,
                        )
                    except StoreError as exc:
                        self._failed("marking an alert", exc)
                if first:
                    await self._alert(lease, unit, threshold, used, limit)

    async def _alert(
        self, lease: _Lease, unit: str, threshold: float, used: int, limit: int
    ) -> None:
        assert self.on_alert is not None
        alert = {
            "user_id": lease.scope_id if self.scope == "user" else None,
            "scope": self.scope,
            "scope_id": lease.scope_id,
            "threshold": threshold,
            "used": used if unit == "tokens" else pusd_to_usd(used),
            "limit": limit if unit == "tokens" else self.max_cost_usd,
            "unit": unit,
            "cycle_start_date": lease.cycle,
        }
        try:
            await _call_user_fn(self.on_alert, alert)
        except Exception as exc:
            self.alert_errors += 1
            logger.error("BudgetLimiter on_alert failed: %r", exc, exc_info=exc)

    # -- quota ---------------------------------------------------------------------------------

    async def remaining(self, user_id: str, cycle_start_date: str | None = None) -> dict[str, Any]:
        """The budget now: ``limit``, ``used`` (metered, with this process's unflushed
        deltas), ``reserved`` (calls in flight here and the leases of other processes),
        ``remaining`` (never below 0) and ``unit`` (``"tokens"`` when ``max_tokens`` is set,
        else ``"usd"``); with both limits, the cost numbers are under ``"usd"``. ``stale`` is
        True when the store could not be reached. ``user_id`` is the scope's id for a scoped
        limiter (a team name for ``scope="team"``)."""
        given = user_id
        scope_id, bad = charged_user(given)
        if bad:
            raise ConfigError(f"user_id is {describe(given)}: give a str or an int")
        if cycle_start_date is not None:
            cycle_start_date = validate_cycle(cycle_start_date)  # (the caller's mistake)
        lease = self._make_lease(scope_id, cycle_start_date)
        with self._mu:
            self._catch_up()
        stale = False
        try:
            if not self._outage.open():
                raise StoreError("left alone after a failure")
            # The store and this process's unflushed deltas, read with no write under way (a
            # flush in between would count the same usage in neither or in both).
            state, (local_t, local_p) = await self._store.bounded_call(
                lambda: (self._read(lease), self._store.local_totals(lease.key)),
                self.store_timeout_s,
                locked=True,
            )
            limit_t = state.limit_tokens
            others = (state.others_tokens, state.others_pusd)
            used = (state.used_tokens, state.used_pusd)
        except StoreError as exc:
            if self._outage.open():
                self._failed("reading", exc)
            stale = True
            limit_t = lease.limit_t
            others = (lease.others_t, lease.others_p)
            used = (lease.used_t + lease.flushed_t, lease.used_p + lease.flushed_p)
            local_t, local_p = self._store.local_totals(lease.key)
        views: dict[str, dict[str, Any]] = {}
        for unit, used_n, reserved, limit in (
            ("tokens", used[0] + local_t, others[0] + lease.inflight_t, limit_t),
            ("usd", used[1] + local_p, others[1] + lease.inflight_p, self._limits[1]),
        ):
            if limit < 0:
                continue
            left = max(0, limit - used_n - reserved)
            scale = 1 if unit == "tokens" else PUSD_PER_USD
            views[unit] = {
                "user_id": scope_id,
                "cycle_start_date": lease.cycle,
                "limit": limit if unit == "tokens" else self.max_cost_usd,
                "used": used_n if unit == "tokens" else used_n / scale,
                "reserved": reserved if unit == "tokens" else reserved / scale,
                "remaining": left if unit == "tokens" else left / scale,
                "unit": unit,
                "stale": stale,
            }
            if self.scope != "user":
                views[unit]["scope"] = self.scope
        if not views:  # limit_from_store, and no limit stored for this budget
            return {
                "user_id": scope_id,
                "cycle_start_date": lease.cycle,
                "limit": None,
                "used": used[0] + local_t,
                "reserved": others[0] + lease.inflight_t,
                "remaining": None,
                "unit": "tokens",
                "stale": stale,
            }
        out = views.get("tokens") or views["usd"]
        if "tokens" in views and "usd" in views:
            out["usd"] = views["usd"]
        return out

    def _read(self, lease: _Lease) -> LeaseState:
        """The store's state of the budget, the others' leases apart from this one's."""
        state: LeaseState = self._store.backend.lease(  # type: ignore[attr-defined]
            lease.key, "", limits=self._limits, stored_limit=self.limit_from_store
        )
        with self._mu:
            mine = (lease.recorded_t, lease.recorded_p) if lease.known else (0, 0)
        return state._replace(
            others_tokens=max(0, state.others_tokens - mine[0]),
            others_pusd=max(0, state.others_pusd - mine[1]),
        )


class RateLimiter(AsyncCallbackHandler):
    """Refuses an LLM call (``RateLimited``, with ``retry_after_s``) past
    ``requests_per_minute`` and/or ``tokens_per_minute`` over a sliding window of
    ``window_s`` (60 s).

    ``per="user"`` keeps a window per call ``user_id`` (``"anonymous"`` without one);
    ``per="global"`` one for all calls. With ``store=None`` the windows live in this process;
    with a store (a ``Store`` or URL) they are shared by every process using it (Redis: one Lua
    script per call). Tokens count the call's estimate (as :class:`BudgetLimiter` reserves it)
    and are corrected to the actual usage when the call ends; a call aborted by another handler
    is taken out of the windows. ``clock`` (seconds, for tests) replaces the time source.

    Outages (shared windows): no call waits more than ``store_timeout_s`` on the store; after a
    failure the limiter leaves the store alone for ``store_backoff_s`` (doubling while it keeps
    failing) and enforces on this process's own calls in the window, or refuses every call
    with ``fail_closed=True`` (``retry_after_s``: the rest of the backoff period).
    """

    #: Through a manager: sees every call, a request id handed back included (see dispatch).
    _llmtally_limiter = True

    def __init__(
        self,
        requests_per_minute: int | None = None,
        tokens_per_minute: int | None = None,
        *,
        store: Store | str | None = None,
        per: str = "user",
        window_s: float = 60.0,
        clock: Callable[[], float] | None = None,
        fail_closed: bool = False,
        store_timeout_s: float = 0.05,
        store_backoff_s: float = 1.0,
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
        if clock is not None and not callable(clock):
            raise ConfigError("clock must be a callable returning seconds")
        self.requests_per_minute = requests_per_minute
        self.tokens_per_minute = tokens_per_minute
        self.per = per
        self.window_s = _positive_s("window_s", window_s)
        self.fail_closed = bool(fail_closed)
        self.store_timeout_s = _positive_s("store_timeout_s", store_timeout_s)
        self.store_backoff_s = _positive_s("store_backoff_s", store_backoff_s)
        self._window_ms = max(1, round(self.window_s * 1000))
        self._clock = clock
        self._store: Store | None = None if store is None else resolve_store(store)
        self._backend = None if self._store is None else _limits_backend(self._store)
        # This process's calls in the windows: the windows themselves without a store, the
        # view enforced on while the store is unreachable with one.
        self._local = LocalLimits()
        self._outage = _Outage(self.store_backoff_s)
        self._dims: list[tuple[str, int]] = []
        if requests_per_minute is not None:
            self._dims.append(("requests", requests_per_minute))
        if tokens_per_minute is not None:
            self._dims.append(("tokens", tokens_per_minute))
        self._open: dict[Any, tuple[list[str], str, int, bool]] = {}
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

    def _local_ms(self) -> int:
        if self._clock is not None:
            return int(self._clock() * 1000)
        return int(time.monotonic() * 1000)

    def _keys(self, user_id: str) -> list[str]:
        user = None if self.per == "global" else user_id
        return [rate_key(user, f"rate:{name}") for name, _ in self._dims]

    def _failed(self, what: str, exc: BaseException) -> None:
        self.store_errors += 1
        self._outage.failed()
        level = logging.WARNING if self.store_errors == 1 else logging.DEBUG
        logger.log(
            level,
            "RateLimiter: %s failed (%d store errors), the store is left alone for %.1fs: %s",
            what,
            self.store_errors,
            max(0.0, self._outage.until - time.monotonic()),
            exc,
        )

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
        shared = False
        result: RateResult | None = None
        if self._store is not None and self._outage.open():
            store = self._store
            backend: Any = store.backend
            now = self._now_ms()
            try:
                result = await store.bounded_call(
                    lambda: backend.rate_acquire(
                        keys, member, weights, limits, self._window_ms, now
                    ),
                    self.store_timeout_s,
                    locked=False,
                )
                self._outage.ok()
                shared = True
            except StoreError as exc:
                self._failed("counting a call", exc)
        if result is None:
            if self._store is not None and self.fail_closed:
                self.refused += 1
                raise RateLimited(
                    f"rate of {user_id!r} not checked: the store is unreachable (fail_closed)",
                    user_id=user_id,
                    limit=limits[0],
                    retry_after_s=max(0.0, self._outage.until - time.monotonic()),
                )
            result = self._local.rate_acquire(
                keys, member, weights, limits, self._window_ms, self._local_ms()
            )
        elif result.ok:
            # This process's own view, for when the store is unreachable.
            never = [10**18] * len(limits)
            self._local.rate_acquire(
                keys, member, weights, never, self._window_ms, self._local_ms()
            )
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
            self._open[token] = (keys, member, tokens, shared)

    async def _update(self, key: str, member: str, old: int, new: int | None, shared: bool) -> None:
        self._local.rate_update(key, member, old, new)
        if not shared or self._store is None or not self._outage.open():
            return
        backend: Any = self._store.backend
        try:
            await self._store.bounded_call(
                lambda: backend.rate_update(key, member, old, new),
                self.store_timeout_s,
                locked=False,
            )
        except StoreError as exc:
            self._failed("updating a window", exc)

    async def on_llm_end(self, response: dict[str, Any], **kwargs: Any) -> None:
        """Correct the call's tokens to its actual usage."""
        found = self._open.pop(kwargs.get("run_id") or kwargs.get("request_id"), None)
        if found is None or self.tokens_per_minute is None:
            return
        keys, member, estimate, shared = found
        actual = _count(response.get("tokens_used")) if isinstance(response, Mapping) else None
        if actual is not None and actual != estimate:
            await self._update(keys[-1], member, estimate, actual, shared)

    async def on_llm_error(self, error: BaseException, **kwargs: Any) -> None:
        """A call aborted before it ran (``aborted=True``) leaves the windows; a failed call
        still counts."""
        found = self._open.pop(kwargs.get("run_id") or kwargs.get("request_id"), None)
        if found is None or not kwargs.get("aborted"):
            return
        keys, member, estimate, shared = found
        for (name, _), key in zip(self._dims, keys, strict=True):
            await self._update(key, member, 1 if name == "requests" else estimate, None, shared)
