"""LLM calls: the scope that fires start, then end (with the normalized, priced response and
timing) or error, whatever the caller does; and what a call needs of its manager
(:class:`CallContext`).

Once a call's start fired, exactly one end or error fires: on return, exception, cancellation,
or, for a call started with :meth:`LLMCall.start` (a framework's hooks, a stream handed back),
at its ``end``, ``fail`` or ``abandon``, else as abandoned at interpreter exit.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Iterable, Mapping
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any, Final

from llmtally import _runtime
from llmtally import pricing as _pricing
from llmtally._context import _NOT_INHERITED, _close_context, _current
from llmtally._firing import _Dispatcher
from llmtally._ids import RequestWindow
from llmtally._ids import state as _id_state
from llmtally._names import MAX_ID_CHARS, request_key
from llmtally._native import (
    DECLINED,
    READ_BAD_USAGE,
    READ_NOT_A_RESPONSE,
    READ_OK,
    CallScope,
    CallStats,
    Prices,
    call_modifiers,
    extract_usage,
    finish_response,
    make_response,
    pusd_to_usd,
    read_response,
    response_meta,
    usd_to_pusd,
)
from llmtally._native import RECORDED as _RECORDED
from llmtally._observe import state as _observed
from llmtally._tables import GROUP, Handlers, _Entry, _FastGroup
from llmtally._tables import globals_state as _globals
from llmtally.errors import CallbackAbort
from llmtally.identity import MAX_USER_ID_BYTES, charged_user, describe
from llmtally.pricing import cached as cached_prices
from llmtally.pricing import lookup as price_lookup
from llmtally.storage import store as _store_module
from llmtally.tokens import estimate_tokens
from llmtally.usage import BadUsage, Usage

__all__ = ["CallContext", "LLMCall", "is_timeout", "price_response"]

logger = logging.getLogger("llmtally")


class CallContext(Handlers):
    """What calls and scopes need of their manager: its handlers (this registry, whose
    ``table`` is current while ``version`` is the global one), its dispatcher, its counters and
    its window of counted request ids."""

    __slots__ = ("dispatcher", "stats", "window")

    def __init__(self, handlers: Iterable[object], dispatcher: _Dispatcher) -> None:
        super().__init__(handlers)
        self.dispatcher = dispatcher
        self.stats = CallStats()
        self.window = RequestWindow()

    def prepare_call(
        self, provider: Any, model: Any, context: dict[str, Any]
    ) -> tuple[str, str, str | None]:
        """A call's unusual input, as the core hands it over (a ``user_id``, provider, model or
        request id that is not a plain short string): normalized here, where bad input is
        counted and logged. Returns the provider, the model and the request id given (its text,
        or ``None`` when none or unreadable); ``context`` gets the normalized ``user_id`` and
        ``request_id``."""
        user = context.get("user_id")
        if user is not None and (type(user) is not str or not 0 < len(user) <= _SAFE_USER_CHARS):
            _normalize_user(self.stats, context)
        if type(provider) is not str or type(model) is not str:
            provider, model = _names(self.stats, provider, model)
        given = context.get("request_id")
        if given is not None and (
            type(given) is not str or len(given) > MAX_ID_CHARS or not given.isascii()
        ):
            # Its text (a digest past MAX_ID_CHARS, so the windows of ids stay small in bytes,
            # or when it has no UTF-8 form).
            given = request_key(given)
            if given is None:  # an id whose str() fails: bad input, one is made
                self.stats.bad_input += 1
                logger.warning("request_id could not be read: a new one is used")
                del context["request_id"]
            else:
                context["request_id"] = given
        return provider or "unknown", model or "unknown", given


_TIMEOUT_ERRORS: tuple[type[BaseException], ...] = (TimeoutError,)


def _names(stats: CallStats, provider: Any, model: Any) -> tuple[str, str]:
    """A provider or model given as something else than a string (an enum, a list by mistake)
    is counted under its text, never raised into the call; anything but an enum is bad input."""
    out = []
    for value in (provider, model):
        if value is None or type(value) is str:
            out.append(value or "")
            continue
        text = getattr(value, "value", None)
        if not isinstance(text, str):
            stats.bad_input += 1
            try:
                text = str(value)
            except Exception:
                text = type(value).__name__
            logger.warning(
                "provider/model of type %s is not a string: counted as its text",
                type(value).__name__,
            )
        out.append(text)
    return out[0], out[1]


def is_timeout(exc: BaseException) -> bool:
    """Whether an LLM call's error is a timeout (counted in ``timeouts``, not ``errors``)."""
    if isinstance(exc, _TIMEOUT_ERRORS):
        return True
    name = type(exc).__name__
    return name in ("APITimeoutError", "Timeout", "ReadTimeout", "ConnectTimeout")


_UNSET: Final[Any] = object()
_SAFE_USER_CHARS: Final = MAX_USER_ID_BYTES // 4


def _normalize_user(stats: CallStats, context: dict[str, Any]) -> None:
    """The identity rule (``llmtally.identity``) applied once, where the call enters: every
    handler then sees the same ``user_id``. An empty id is no id (an enclosing scope's, else
    ``"anonymous"``); bad input is counted and charged to ``"anonymous"``."""
    value = context["user_id"]
    if isinstance(value, str) and not str.__len__(value):
        del context["user_id"]
        return
    user, bad = charged_user(value)
    if bad:
        stats.bad_input += 1
        logger.warning("user_id is %s: charged to %r", describe(value), user)
    context["user_id"] = user


def _abandon_evicted(call: LLMCall) -> None:
    call._open = False
    call.abandon_soon()


class _OpenCalls:
    """Calls started with :meth:`LLMCall.start` and not ended yet (in the bounded registry the
    integrations use: past ``capacity``, the oldest is ended as abandoned, in the background),
    ended as abandoned at exit."""

    def __init__(self, capacity: int = 100_000) -> None:
        self._runs: _runtime.OpenRuns[int, LLMCall] = _runtime.OpenRuns(
            capacity, "LLM calls", _abandon_evicted
        )
        self._lock = threading.Lock()
        self._exit_hook = False

    def __len__(self) -> int:
        return len(self._runs)

    def add(self, call: LLMCall) -> None:
        if not self._exit_hook:  # the first open call: end the open ones at exit
            with self._lock:
                if not self._exit_hook:
                    _store_module.before_exit(self.abandon_all)
                    self._exit_hook = True
        call._open = True
        self._runs.put(id(call), call)

    def discard(self, call: LLMCall) -> None:
        self._runs.pop(id(call))
        call._open = False

    def abandon_all(self, timeout_s: float) -> None:
        """End every open call as abandoned (at interpreter exit), waiting up to
        ``timeout_s``."""
        calls = self._runs.values()
        if not calls:
            return
        try:
            futures = [_runtime.runner.submit(call.abandon()) for call in calls]
        except RuntimeError:  # no new thread at this point of the exit: this one runs them
            loop = asyncio.new_event_loop()
            try:
                loop.run_until_complete(
                    asyncio.wait_for(
                        asyncio.gather(*(c.abandon() for c in calls), return_exceptions=True),
                        timeout_s,
                    )
                )
            except TimeoutError:
                logger.error("ending %d open LLM call(s) at exit timed out", len(calls))
            finally:
                loop.close()
            return
        _, pending = concurrent.futures.wait(futures, timeout_s)
        if pending:
            logger.error("ending %d open LLM call(s) at exit timed out", len(pending))


_open_calls = _OpenCalls()


def _lookup_found(model: str, provider: str) -> Prices | None:
    """The prices of the model a response names (the core's fast path, when it differs from
    the call's): the same lookup, and miss count, as the general path's."""
    return price_lookup(model, None if provider == "unknown" else provider)


def price_response(
    response: dict[str, Any], provider: str | None, raw: Any = None
) -> Exception | None:
    """Price a normalized response dict from the price table when the provider reported no cost
    (``cost_estimate``, ``cost_pusd``, ``cost_source: "table"``, ``price_version``), with the
    service tier and inference geography the provider's response ``raw`` states when the
    model's prices depend on them; an unknown model keeps ``cost_estimate: None``. Returns the
    error of counts no price can take, else ``None``."""
    if response["cost_estimate"] is not None or "completion_tokens" not in response:
        return None
    model = response["model"]
    if "prompt_tokens" not in response or not model or model == "unknown":
        return None
    prices = price_lookup(model, provider if provider != "unknown" else None)
    if prices is None:
        return None
    service_tier = inference_geo = speed = None
    if raw is not None and prices.has_modifiers:
        service_tier, inference_geo, speed = call_modifiers(raw)
    try:
        pusd = prices.cost_pusd(
            response["prompt_tokens"],
            response["completion_tokens"],
            response["cached_tokens"],
            response["cache_write_tokens"],
            response.get("cache_write_1h_tokens", 0),
            response["reasoning_tokens"],
            service_tier=service_tier,
            inference_geo=inference_geo,
            speed=speed,
        )
    except (ValueError, OverflowError) as exc:
        return exc
    response["cost_estimate"] = pusd_to_usd(pusd)
    response["cost_pusd"] = pusd
    response["cost_source"] = "table"
    if prices.version is not None:
        response["price_version"] = prices.version
    return None


class LLMCall(CallScope):
    """One LLM call in flight; returned by :meth:`CallbackManager.llm_call`.

    Inside the ``async with`` block, :meth:`set_response` hands over the provider's response
    (dict or SDK object) and :meth:`chunk` each streamed chunk. After the block, ``response`` is
    the normalized response dict given to ``on_llm_end``.

    The call's state and its common enter and exit live in the core (``_core.CallScope``:
    ``async with`` returns ready awaitables, no coroutine); this class is the rest, and the
    general path the core hands over to (:meth:`_start_fire`, :meth:`_exit`,
    :meth:`_recorded`).
    """

    # (no ``__slots__``: a caller may tag a call with attributes of its own)

    if TYPE_CHECKING:  # the core's, typed for callers

        async def __aenter__(self) -> LLMCall: ...

        async def __aexit__(
            self,
            exc_type: type[BaseException] | None,
            exc: BaseException | None,
            tb: TracebackType | None,
        ) -> None: ...

    # -- inside the block -------------------------------------------------------------------

    def detach_context(self) -> None:
        """Leave this call open but stop being the current scope of the running task (for a
        call whose end comes later, like a stream handed back to the caller)."""
        token = self._token
        if token is not None:
            _close_context(token)
            self._token = None

    async def chunk(self, chunk: Any, *, usage: Any = None) -> None:
        """Record one streamed chunk (text, or a provider chunk/event) and fire
        ``on_llm_stream_chunk``. The first chunk sets the time to first token. ``usage`` is
        the usage the chunk carries when the chunk itself is only text (a framework's chunk),
        in any shape a response's usage takes (merged like a provider chunk's)."""
        self.record_chunk(chunk, usage=usage)
        targets = self._table.by_event["on_llm_stream_chunk"]
        if targets:
            await self._ctx.dispatcher.fire(targets, "on_llm_stream_chunk", (chunk,), self._kwargs)

    @property
    def wants_chunks(self) -> bool:
        """True when a handler listens to ``on_llm_stream_chunk``; when False, sync code records
        chunks with :meth:`record_chunk` without a trip to an event loop."""
        return bool(self._table.by_event["on_llm_stream_chunk"])

    def _chunk_failed(self, exc: BaseException) -> None:
        """A streamed chunk the core could not read (``record_chunk``): bad input, counted and
        logged, never an error."""
        self._ctx.stats.bad_input += 1
        if isinstance(exc, BadUsage):
            logger.warning("skipped bad usage in stream chunk of %s: %s", self.request_id, exc)
        else:
            logger.warning("unreadable stream chunk in %s: %r", self.request_id, exc)

    # -- lifecycle for callback-shaped code -------------------------------------------------
    #
    # ``async with manager.llm_call(...)`` is the usual way. Code whose start and end arrive in
    # different callbacks (a framework's hooks, a stream handed back to the caller) uses
    # ``await call.start()`` and then exactly one of ``end``, ``fail`` or ``abandon``; whichever
    # comes first fires, the others do nothing. A call started this way and never ended is
    # ended as abandoned at interpreter exit.

    async def start(self, *, stoppable: bool = True) -> LLMCall:
        """Fire ``on_llm_start`` for a call that ends in another callback. The call does not
        become the current scope of the running task.

        ``stoppable=False`` is for a call that will be made whatever the handlers say (a
        framework that ignores what its start hook raises): a refusal is still raised, but the
        call stays open and its end is counted.

        Raises:
            CallbackAbort: a handler refused the call (a budget, a rate limit); unless
                ``stoppable=False``, the call is over and its end methods do nothing.
        """
        if not stoppable:
            self._stoppable = False
        try:
            await self.__aenter__()
        except CallbackAbort:
            if not stoppable:
                _open_calls.add(self)
            raise
        self.detach_context()
        _open_calls.add(self)
        return self

    async def end(self, response: Any = _UNSET) -> dict[str, Any] | None:
        """End the call with ``response`` (as :meth:`set_response`; without one, what the
        stream's chunks said, else an estimate). Returns the normalized response dict."""
        if response is not _UNSET:
            self.set_response(response)
        await self.__aexit__(None, None, None)
        return self.response

    async def fail(self, error: BaseException) -> None:
        """End the call with ``on_llm_error`` (a timeout is counted as such)."""
        await self.__aexit__(type(error), error, error.__traceback__)

    async def abandon(self) -> None:
        """End a call whose result will never come (a stream left mid-way, a client gone):
        ``on_llm_end`` with the usage seen so far, else an estimate, ``estimated: True`` and
        ``finish_reason: "abandoned"``. A call whose response was already set ends with it."""
        if not self._response_set:
            self._abandoned = True
        await self.__aexit__(None, None, None)

    def abandon_soon(self) -> None:
        """:meth:`abandon` in the background, from any thread or a finalizer, without waiting:
        nothing when the call has ended, nor once the interpreter is shutting down (the exit
        hook ended every open call before that)."""
        if self._done:
            return
        coro = self.abandon()
        try:
            _runtime.runner.submit(coro)
        except RuntimeError:  # shutting down: no thread to run it on
            coro.close()

    @property
    def context(self) -> Mapping[str, Any]:
        """The kwargs given to the call's events (``user_id``, ``request_id``, ``run_id``,
        ``trace_id``, ...); read-only."""
        return MappingProxyType(self._kwargs)

    @property
    def ended(self) -> bool:
        """True once the call's end or error fired (or its start was refused)."""
        return self._done

    # -- lifecycle --------------------------------------------------------------------------

    async def _start_fire(
        self, waiting: Awaitable[Any] | None, error: BaseException | None
    ) -> LLMCall:
        """The start, once the core opened the call (ids, run context, clock) and its
        ``on_llm_start`` handlers either left ``waiting`` to finish (one of them waits, or they
        are not all built-in) or raised ``error``."""
        try:
            if error is not None:
                raise error
            if waiting is not None:
                await waiting
        except CallbackAbort as abort:
            self.detach_context()
            if self._stoppable:
                self._done = True
                await self._abort_started(abort)
            raise
        except BaseException as exc:
            # Interrupted while the start's handlers ran (the caller cancelled, a timeout,
            # Ctrl-C): the call never ran, and the handlers that saw its start see it fail.
            await self._interrupted_start(exc)
            raise
        return self

    async def _interrupted_start(self, exc: BaseException) -> None:
        self.detach_context()
        if self._done:
            return
        self._done = True
        if self._open:
            _open_calls.discard(self)
        self._ctx.stats.llm_errors += 1
        if _observed.on:
            _observed.llm_failed(self._kwargs, False)
        targets = self._table.by_event["on_llm_error"]
        if targets:
            duration_ms = (time.perf_counter() - self.started_at) * 1000.0
            kwargs = {**self._kwargs, "duration_ms": duration_ms}
            with contextlib.suppress(CallbackAbort):  # the call is over already
                await self._ctx.dispatcher.fire(targets, "on_llm_error", (exc,), kwargs)

    async def _abort_started(self, abort: CallbackAbort) -> None:
        """A handler refused the call: tell those that already saw the start."""
        completed: list[_Entry] = abort.__dict__.pop("_llmtally_completed", [])
        if not completed:
            return
        kwargs = {**self._kwargs, "duration_ms": 0.0, "aborted": True}
        wanted = {id(e) for e in completed}
        targets = tuple(t for t in self._table.by_event["on_llm_error"] if id(t[0]) in wanted)
        if targets:
            with contextlib.suppress(CallbackAbort):  # already aborting
                await self._ctx.dispatcher.fire(targets, "on_llm_error", (abort,), kwargs)

    async def _exit(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
        declined: bool = False,
        id_fresh: bool = False,
    ) -> None:
        """The end (``__aexit__``) whenever the core's common end does not apply, or
        ``declined`` it (the response is read by the general path); ``id_fresh``: the core
        checked the request id the caller gave and it is new (recorded as seen)."""
        if self._done:
            return None
        self._done = True
        if self._open:
            _open_calls.discard(self)
        if self._token is not None:
            _close_context(self._token)
        if exc is not None and isinstance(exc, GeneratorExit | KeyboardInterrupt | SystemExit):
            # Closed, interrupted or exiting before its result: what was seen so far.
            if not self._response_set:
                self._abandoned = True
            exc = None
        ended = time.perf_counter()
        duration_s = ended - self.started_at
        ctx = self._ctx
        if exc is None:
            group = self._table.end_group
            if (
                group is not None
                and not declined
                and self._response_set
                and not self._id_given
                and self._first_chunk_at is None
                and self._end_recorded(group, duration_s, ended)
            ):
                if self._table.settlers:
                    self._settle_limiters()
                return None
            try:
                self._end(duration_s, id_fresh)
            except Exception as error:  # a response we cannot read never breaks the call
                ctx.stats.bad_input += 1
                logger.error(
                    "response of %s could not be read (%r): usage estimated from the prompt",
                    self.request_id,
                    error,
                )
                self._usage = usage = self._estimate(None)
                self.response = make_response(
                    usage, None, True, None, self.provider, self.model, duration_s,
                    self.request_id,
                )  # fmt: skip
            if _observed.on and not self.duplicate:
                assert self.response is not None
                _observed.llm_end(self._kwargs, self.response)  # never raises
            try:
                await self._fire_end(duration_s)
            finally:
                if self._table.settlers:
                    self._settle_limiters()
            return None
        stats = ctx.stats
        timed_out = is_timeout(exc)
        if timed_out:
            stats.llm_timeouts += 1
        else:
            stats.llm_errors += 1
        if _observed.on:
            _observed.llm_failed(self._kwargs, timed_out)
        targets = self._table.by_event["on_llm_error"]
        if targets:
            kwargs = {**self._kwargs, "duration_ms": duration_s * 1000.0}
            try:
                await ctx.dispatcher.fire(targets, "on_llm_error", (exc,), kwargs)
            except CallbackAbort as abort:
                logger.debug("abort %r during on_llm_error ignored: the call already failed", abort)
        return None

    async def _end_fired(self, duration_s: float) -> None:
        """The end's handlers, once the core built and counted the response (see
        ``CallScope``), then the budget limiters' settlement."""
        try:
            await self._fire_end(duration_s)
        finally:
            if self._table.settlers:
                self._settle_limiters()

    async def _fire_end(self, duration_s: float) -> None:
        table = self._table
        targets = table.limiter_end if self.duplicate else table.by_event["on_llm_end"]
        if not targets:
            return
        response = self.response
        assert response is not None
        # The call's own dict: handlers written in Python get a copy anyway (``**kwargs``), the
        # built-in recorders read it and keep nothing.
        kwargs = self._kwargs
        kwargs["token_count"] = response.get("tokens_used")
        kwargs["cost"] = response["cost_estimate"]
        kwargs["duration_ms"] = duration_s * 1000.0
        if self._first_chunk_at is not None:
            kwargs["ttft_ms"] = (self._first_chunk_at - self.started_at) * 1000.0
        dispatcher = self._ctx.dispatcher
        if table.native_end:
            waiting = dispatcher.fire_fast(targets, "on_llm_end", (response,), kwargs)
            if waiting is not None:
                await waiting
        else:
            await dispatcher.fire(targets, "on_llm_end", (response,), kwargs)

    def _settle_limiters(self) -> None:
        """The call ended and every recorder counted it: the budget limiters let its estimate
        go (and count it when no recorder did). Never raises."""
        table = self._table
        for entry, settle in table.settlers:
            try:
                settle(self, table.meters)
            except Exception as exc:
                self._ctx.dispatcher._failed(entry, "on_llm_end", exc)

    def _end_recorded(self, group: _FastGroup, duration_s: float, ended: float) -> bool:
        """The common metered call, whose end goes only to built-in recorders: read the
        response, price it and record it in one crossing; the response dict is built only if
        someone reads :attr:`response`. False when the core declined (nothing was recorded):
        the general path takes the call from the start."""
        kwargs = self._kwargs
        assert group.recorder is not None
        observed = _observed.on
        if observed:
            before = _Dispatcher._failures(group.members[0][0], group, GROUP)
            t0 = time.perf_counter()
        try:
            model = self.model
            prices = cached_prices(model, self.provider)
            if prices is None and model != "unknown":
                prices = price_lookup(model, None if self.provider == "unknown" else self.provider)
            code, usage, found_model, content, table_cost, message, outcome, flush, rid, reason = (
                group.recorder.finish(
                    self._response,
                    self.provider,
                    model,
                    duration_s,
                    prices,
                    kwargs.get("user_id"),
                    kwargs.get("cycle_start_date"),
                    _id_state.maker,  # the core marks the id counted (handed back: duplicate)
                    self.request_id,
                    _lookup_found,  # ``prices`` is the call model's: unpriced is recorded too
                )
            )
        except Exception:
            return False
        if code != READ_OK or outcome == DECLINED:
            return False
        self._recorded(
            group,
            (usage, found_model, content, table_cost, message, outcome, flush, rid, reason,
             prices, duration_s),
        )  # fmt: skip
        if observed:
            self._ctx.dispatcher._observe(
                group.members[0][0], group, GROUP, time.perf_counter() - t0, before
            )
            cost = table_cost
            if cost is None and usage is not None and usage.cost_usd is not None:
                cost = usd_to_pusd(usage.cost_usd)
            _observed.llm_usage_end(kwargs, found_model, usage, cost)
        return True

    def _recorded(self, group: _FastGroup, finished: tuple[Any, ...]) -> None:
        """The bookkeeping of a call the core recorded (``finished``: what
        ``Recorder.finish`` answered, the prices it was given and the duration): counters,
        warnings, the unpriced count, a refused member, the flusher."""
        usage, found_model, content, table_cost, message, outcome, flush, rid, reason = finished[:9]
        prices, duration_s = finished[9:]
        stats = self._ctx.stats
        stats.llm_calls += 1
        if message is not None:
            stats.usage_warnings += 1
            logger.warning("usage of %s: %s (total kept)", self.request_id, message)
        self._usage = usage
        if found_model is not None and found_model != self.model:
            prices = cached_prices(found_model, self.provider)  # what the core priced it by
        self._parts = (found_model, content, table_cost, duration_s, rid, reason, prices)
        if table_cost is None and usage is not None and usage.cost_usd is None:
            for count_unpriced in group.unpriced:
                count_unpriced(found_model or self.model)
        if outcome != _RECORDED:
            group.refused(self._ctx.dispatcher, "on_llm_end", outcome)
        group.kick(flush)

    def usage_totals(self) -> tuple[int, int]:
        """``(total tokens, cost in pico-USD)`` of the ended call (0 before the end or for an
        unpriced call), without building the response dict."""
        usage = self._usage
        tokens = usage.total_tokens if usage is not None else 0
        parts = self._parts
        if parts is not None and parts[2] is not None:  # the table's cost
            return tokens, int(parts[2])
        if parts is None and self._response_dict is not None:
            cost = self._response_dict.get("cost_estimate")
        else:
            cost = usage.cost_usd if usage is not None else None
        if cost is None or not 0 < cost < 9.2e6:
            return tokens, 0
        return tokens, usd_to_pusd(cost) or 0

    @property
    def response(self) -> dict[str, Any] | None:
        """The normalized response dict given to ``on_llm_end`` (``None`` before the end)."""
        found = self._response_dict
        if found is None and self._parts is not None:
            found_model, content, table_cost, duration_s, rid, reason, prices = self._parts
            found = self._response_dict = make_response(
                self._usage,
                None,
                False,
                content,
                self.provider,
                found_model or self.model,
                duration_s,
                self.request_id,
                None,
                0,
                table_cost,
                rid,
                reason,
                None if table_cost is None or prices is None else prices.version,
            )
            self._parts = None
        return found

    @response.setter
    def response(self, value: dict[str, Any] | None) -> None:
        self._response_dict = value
        self._parts = None

    def _end(self, duration_s: float, id_fresh: bool = False) -> None:
        """Normalize the usage and build the response dict (no await, no I/O)."""
        stats = self._ctx.stats
        request_id = self.request_id
        if (
            self._id_given
            and not id_fresh
            and (
                _id_state.maker.counted(request_id)
                or self._ctx.window.seen(request_id, time.monotonic())
            )
        ):
            self.duplicate = True
            stats.duplicates += 1
            logger.info("duplicate end for request_id %r ignored", self.request_id)
        else:
            stats.llm_calls += 1
            if not self._id_given:
                _id_state.maker.mark(request_id)  # a caller handing it back: a duplicate
        model: Any = self.model
        content: str | None = None
        meta: tuple[Any, Any] = (None, None)
        if self._response_set:
            # The common case in one crossing: read the response, build the dict.
            code, response, message, self._usage = finish_response(
                self._response,
                self.provider,
                self.model,
                duration_s,
                self.request_id,
                cached_prices(self.model, self.provider),
            )
            if code == READ_OK:
                if message is not None:
                    stats.usage_warnings += 1
                    logger.warning("usage of %s: %s (total kept)", self.request_id, message)
                assert response is not None
                if response["cost_estimate"] is None:
                    self._price(response)
                self.response = (
                    response if self._first_chunk_at is None else self._add_stream_fields(response)
                )
                return
            if code == READ_BAD_USAGE:
                stats.bad_input += 1
                logger.warning("usage of %s skipped: %s", self.request_id, message)
                self.response = self._add_stream_fields(response)
                return
            if code == READ_NOT_A_RESPONSE:
                stats.bad_input += 1
                logger.warning(
                    "response of %s is a %s, not a dict or SDK response: usage estimated",
                    self.request_id,
                    type(self._response).__name__,
                )
            else:  # no usage in the response: the stream's, else an estimate
                _, _, content, found_model, _ = read_response(self._response)
                if found_model is not None:
                    model = found_model
                meta = response_meta(self._response)
        usage = self._stream_usage
        if content is None and self._texts:
            content = "".join(self._texts)
        estimated = usage is None or self._abandoned
        if self._abandoned:
            stats.abandoned += 1
            usage = self._usage_so_far(usage, content)
        elif usage is None:
            usage = self._estimate(content)
        elif usage.warning is not None:
            stats.usage_warnings += 1
            logger.warning("usage of %s: %s (total kept)", self.request_id, usage.warning)
        self._usage = usage
        first = self._first_chunk_at
        response = make_response(
            usage,
            None,
            estimated,
            content,
            self.provider,
            model,
            duration_s,
            self.request_id,
            None if first is None else first - self.started_at,
            self._chunks,
            None,
            *meta,
        )
        if self._abandoned:
            response["finish_reason"] = "abandoned"
        self._price(response)
        self.response = response

    def _usage_so_far(self, reported: Usage | None, content: str | None) -> Usage:
        """An abandoned call: what the stream reported, each count at least the estimate of
        what was sent and received (a stream reports its output count at its end)."""
        estimate = self._estimate(content)
        if reported is None:
            return estimate
        prompt = reported.prompt_tokens or estimate.prompt_tokens or 0
        completion = max(reported.completion_tokens or 0, estimate.completion_tokens or 0)
        return Usage(
            total_tokens=prompt + completion,
            prompt_tokens=prompt,
            completion_tokens=completion,
            cached_tokens=min(reported.cached_tokens, prompt),
            cache_write_tokens=min(reported.cache_write_tokens, prompt),
            cache_write_1h_tokens=min(reported.cache_write_1h_tokens, prompt),
            reasoning_tokens=min(reported.reasoning_tokens, completion),
        )

    def _price(self, response: dict[str, Any]) -> None:
        """Cost from the price table when the provider reported none (``cost_source: "table"``);
        an unknown model keeps ``cost_estimate: None``, counted and warned once per model."""
        problem = price_response(response, self.provider, self._response)
        if problem is not None:
            self._ctx.stats.bad_input += 1
            logger.warning("cost of %s not computed: %s", self.request_id, problem)

    def _add_stream_fields(self, response: dict[str, Any] | None) -> dict[str, Any]:
        assert response is not None
        if self._first_chunk_at is not None:
            response["time_to_first_token"] = self._first_chunk_at - self.started_at
            response["chunks"] = self._chunks
            if "content" not in response and self._texts:
                response["content"] = "".join(self._texts)
        return response

    @property
    def usage(self) -> Usage | None:
        """The normalized usage of the ended call (``None`` before the end, or when skipped)."""
        if self._usage is None and self.response is not None and "tokens_used" in self.response:
            self._usage = extract_usage(self.response)
        return self._usage

    def _estimate(self, content: str | None) -> Usage:
        stats = self._ctx.stats
        model = self.model if self.model != "unknown" else None
        prompt = 0
        messages = self.messages
        if messages is not None:
            try:
                prompt = estimate_tokens(messages, model)
            except (TypeError, ValueError) as exc:
                stats.bad_input += 1
                logger.warning("messages of %s could not be estimated: %s", self.request_id, exc)
        try:
            completion = estimate_tokens(content, model) if content else 0
        except (TypeError, ValueError) as exc:
            stats.bad_input += 1
            logger.warning("content of %s could not be estimated: %s", self.request_id, exc)
            completion = 0
        return Usage(
            total_tokens=prompt + completion, prompt_tokens=prompt, completion_tokens=completion
        )


CallScope.configure(
    _globals,
    _id_state,
    _observed,
    _current,
    _NOT_INHERITED,
    _pricing._cache,
    price_lookup,
    _lookup_found,
    _SAFE_USER_CHARS,
    MAX_ID_CHARS,
    time.perf_counter(),
)
