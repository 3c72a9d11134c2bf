"""Dispatch: fire events on handlers, isolate their failures, and scope LLM calls and runs.

A handler's exception, hang (past ``timeout``) or slowness never reaches the caller and never
stops the other handlers: it is logged and counted. Only :class:`~llmtally.errors.CallbackAbort`
(``BudgetExceeded``, ``RateLimited``, ...) stops a call, on purpose.

Per-event handler lists are computed when handlers change (copy on write), never per event, so a
handler that does not override an event costs nothing for it and handlers can be added or removed
while events are in flight.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import inspect
import itertools
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from types import MappingProxyType, TracebackType
from typing import Any, Final

from llmtally import _runtime
from llmtally._names import MAX_ID_CHARS, request_key
from llmtally._native import (
    DECLINED,
    READ_BAD_USAGE,
    READ_NOT_A_RESPONSE,
    READ_OK,
    CallUserSink,
    Prices,
    Sink,
    UserKeySink,
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
from llmtally._native import IdMaker as _IdMaker
from llmtally._native import Recorder as _Recorder
from llmtally._observe import state as _observed
from llmtally._observe import stats_for
from llmtally.config import settings, validate_timeout
from llmtally.errors import CallbackAbort, InvalidHandler
from llmtally.events import EVENTS, AsyncCallbackHandler, overridden_events
from llmtally.identity import MAX_USER_ID_BYTES, charged_user, describe
from llmtally.pricing import cached as cached_prices
from llmtally.pricing import lookup as price_lookup
from llmtally.storage import store as _store_module
from llmtally.tokens import estimate_tokens
from llmtally.usage import BadUsage, Usage, extract_text, merge_stream_usage

__all__ = [
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
    "set_global_callbacks",
]

logger = logging.getLogger("llmtally")

# ---------------------------------------------------------------------------------------------
# Ids: a random per-process prefix and a counter (unique across processes, re-seeded after fork).

_id_prefix = os.urandom(6).hex()
_ids = _IdMaker(_id_prefix)
_next_id = _ids.next


def _after_fork() -> None:
    """In a forked child: new ids, and every manager rebuilds its handler tables on its next
    event, so the core's recorders write to the child's store ledgers (a store starts the
    child with a fresh ledger), not to the parent's copy that nothing flushes."""
    global _id_prefix, _ids, _next_id, _global_version
    _id_prefix = os.urandom(6).hex()
    _ids = _IdMaker(_id_prefix)
    _next_id = _ids.next
    _global_version += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


def new_id() -> str:
    """A new request or run id, unique across processes.

    >>> new_id() != new_id()
    True
    """
    return _next_id()


# ---------------------------------------------------------------------------------------------
# Handler entries and per-event tables.

# (entry, callable or _FastGroup, kind)
_Target = tuple["_Entry", Any, int]
_NO_TARGETS: Final[tuple[_Target, ...]] = ()


class _Entry:
    """One registered handler with its failure counters."""

    __slots__ = (
        "errors",
        "events",
        "handler",
        "logged",
        "name",
        "priority",
        "seq",
        "stats",
        "timeouts",
    )

    def __init__(self, handler: object, priority: int, seq: int) -> None:
        if isinstance(handler, type) or handler is None or isinstance(handler, str | bytes | int):
            raise InvalidHandler(f"a callback handler must be a handler instance, not {handler!r}")
        events = overridden_events(handler)
        if not events and not any(hasattr(handler, name) for name in EVENTS):
            raise InvalidHandler(
                f"{type(handler).__name__} is not a callback handler: it has no on_* event methods"
            )
        self.handler = handler
        self.name = type(handler).__name__
        self.stats = stats_for(self.name)  # process-wide, per handler class (metrics)
        self.priority = priority
        self.seq = seq
        self.events = events
        self.errors = 0
        self.timeouts = 0
        self.logged: set[tuple[str, type]] = set()


# How a target is called: an async method, a plain method (whose result may be awaitable), the
# synchronous fast path of a built-in handler, called as ``fn(*args, kwargs)``, or a group of
# built-in handlers recorded in one crossing into the core (see _FastGroup).
ASYNC, SYNC, FAST, GROUP = 0, 1, 2, 3


class _FastGroup:
    """The built-in handlers of one event whose accumulators the core updates in one call.

    The core records the common case; when it declines a call (nothing written), each member's
    own recorder runs instead, with the same result."""

    __slots__ = ("members", "recorder", "stores", "unpriced")

    def __init__(self) -> None:
        self.members: list[tuple[_Entry, Callable[..., Any]]] = []
        self.stores: list[Any] = []
        self.recorder: _Recorder | None = None
        #: The members' counters of unpriced calls (``CostTracker``), given the model.
        self.unpriced: list[Callable[[Any], None]] = []

    def refused(self, dispatcher: _Dispatcher, event: str, index: int) -> None:
        """The core recorded a call but member ``index``'s counters refused it (a 64-bit
        overflow): that member's failure, counted and logged."""
        dispatcher._failed(
            self.members[index][0],
            event,
            OverflowError("a usage counter would overflow: the delta was refused"),
        )

    def kick(self, flush_wanted: bool) -> None:
        """Make sure each written store's flusher runs (see ``Store._kicked``)."""
        for store in self.stores:
            store._kicked(flush_wanted)

    def add(self, entry: _Entry, fn: Callable[..., Any], sink: Sink) -> Sink:
        self.members.append((entry, fn))
        count_unpriced = getattr(entry.handler, "_count_unpriced", None)
        if count_unpriced is not None:
            self.unpriced.append(count_unpriced)
        if isinstance(sink, UserKeySink | CallUserSink) and all(
            sink.store is not s for s in self.stores
        ):
            self.stores.append(sink.store)
        return sink


def _owner(handler: object) -> type | None:
    """The built-in class that declares ``handler``'s fast path."""
    for cls in type(handler).__mro__:
        if "_llmtally_fast" in cls.__dict__:
            return cls
    return None


def _overrides(handler: object, name: str) -> bool:
    """Whether a subclass replaced the built-in ``name`` of ``handler``."""
    owner = _owner(handler)
    return owner is not None and getattr(type(handler), name, None) is not getattr(
        owner, name, None
    )


def _fast_map(handler: object) -> dict[str, str | None] | None:
    """The events a built-in handler records synchronously, less those a subclass overrides
    (a subclass's own ``on_llm_end`` is awaited like any handler's)."""
    fast: dict[str, str | None] | None = getattr(handler, "_llmtally_fast", None)
    if fast is None:
        return None
    overridden = [event for event in fast if _overrides(handler, event)]
    if not overridden:
        return fast
    return {event: name for event, name in fast.items() if event not in overridden}


def _targets(entries: Iterable[_Entry], event: str) -> tuple[_Target, ...]:
    found: list[_Target] = []
    group: _FastGroup | None = None
    sinks: list[Sink] = []
    for entry in entries:
        if event not in entry.events:
            continue
        fast = _fast_map(entry.handler)
        if fast is not None and event in fast:
            # A built-in handler: the manager calls its synchronous recorder directly (same
            # behaviour as its async method, without a coroutine), or nothing at all.
            name = fast[event]
            if name is None:
                continue
            fn = getattr(entry.handler, name)
            sink_of = getattr(entry.handler, "_llmtally_sink", None)
            sink = None
            if (
                event == "on_llm_end"
                and sink_of is not None
                and not _overrides(entry.handler, name)
            ):
                sink = sink_of()
            if sink is None:
                found.append((entry, fn, FAST))
                continue
            if group is None:
                group = _FastGroup()
                found.append((entry, group, GROUP))  # at the first member's place
            sinks.append(group.add(entry, fn, sink))
            continue
        fn = getattr(entry.handler, event)
        found.append((entry, fn, ASYNC if inspect.iscoroutinefunction(fn) else SYNC))
    if group is not None:
        from llmtally.storage import EARLY_FLUSH_KEYS

        group.recorder = _Recorder(sinks, EARLY_FLUSH_KEYS)
    if event == "on_llm_end":
        # Limiters settle after the recorders counted the call (a limiter counts the usage
        # itself only when no recorder did; see limits.py).
        found.sort(key=lambda target: _is_limiter(target[0].handler))
    return tuple(found) if found else _NO_TARGETS


def _is_limiter(handler: object) -> bool:
    return getattr(handler, "_llmtally_limiter", False) is True


class _Table:
    """Immutable per-event handler lists."""

    __slots__ = (
        "_limits_only",
        "by_event",
        "end_group",
        "entries",
        "fast_start",
        "limiter_end",
        "meters",
        "native_end",
        "settlers",
    )

    def __init__(self, entries: Sequence[_Entry]) -> None:
        self.entries = tuple(entries)
        self.by_event: dict[str, tuple[_Target, ...]] = {
            event: _targets(self.entries, event) for event in EVENTS
        }
        end_targets = self.by_event["on_llm_end"]
        #: The limiters' end targets (fired for a duplicate end too).
        self.limiter_end = tuple(t for t in end_targets if _is_limiter(t[0].handler))
        #: Built-in meters that record ends: a budget limiter counts a call none of them did.
        self.meters = tuple(
            e.handler
            for e in self.entries
            if "on_llm_end" in e.events and hasattr(e.handler, "_llmtally_counted")
        )
        #: Budget limiters, settled by the call itself once the end was recorded and fired
        #: (synchronously, after every recorder).
        self.settlers = tuple(
            (e, e.handler._llmtally_settle)
            for e in self.entries
            if _is_limiter(e.handler)
            and hasattr(e.handler, "_llmtally_settle")
            and not _overrides(e.handler, "on_llm_end")
        )
        self._limits_only: _Table | None = None

        def native(event: str) -> bool:
            return all(kind >= FAST for _, _, kind in self.by_event[event])

        #: Only built-in handlers at the start: fired without a coroutine unless one waits.
        self.fast_start = all(kind == FAST for _, _, kind in self.by_event["on_llm_start"])

        # Only built-in recorders at the end: fired without a coroutine.
        self.native_end = native("on_llm_end")
        # The end is one group of built-in recorders: the call hands it its parts directly.
        end = self.by_event["on_llm_end"]
        self.end_group: _FastGroup | None = (
            end[0][1] if len(end) == 1 and end[0][2] == GROUP else None
        )

    @property
    def limits_only(self) -> _Table:
        """The table of a call whose request id was already counted: its limiters only (the
        call still runs, so it is still limited; nothing else sees it)."""
        found = self._limits_only
        if found is None:
            limiters = [e for e in self.entries if _is_limiter(e.handler)]
            found = _Table(limiters) if limiters else _EMPTY_TABLE
            self._limits_only = found
        return found


_EMPTY_TABLE = _Table(())


class _Stats:
    __slots__ = (
        "abandoned",
        "bad_input",
        "duplicates",
        "llm_calls",
        "llm_errors",
        "llm_timeouts",
        "usage_warnings",
    )

    def __init__(self) -> None:
        self.abandoned = 0
        self.bad_input = 0
        self.duplicates = 0
        self.llm_calls = 0
        self.llm_errors = 0
        self.llm_timeouts = 0
        self.usage_warnings = 0


class _Dispatcher:
    """Runs one event over a tuple of targets with isolation, timeout and abort handling."""

    __slots__ = ("_semaphore", "parallel", "timeout")

    def __init__(self, timeout: float | None, parallel: bool, max_concurrent: int | None) -> None:
        self.timeout = timeout
        self.parallel = parallel
        self._semaphore = asyncio.Semaphore(max_concurrent) if parallel and max_concurrent else None

    def _failed(self, entry: _Entry, event: str, exc: BaseException) -> None:
        entry.errors += 1
        entry.stats.failed(exc)
        key = (event, type(exc))
        if key in entry.logged:
            logger.debug("callback %s.%s failed again: %r", entry.name, event, exc)
            return
        entry.logged.add(key)
        logger.error(
            "callback %s.%s failed (isolated; further %s from it are logged at DEBUG): %r",
            entry.name,
            event,
            type(exc).__name__,
            exc,
            exc_info=exc,
        )

    def _timed_out(self, entry: _Entry, event: str) -> None:
        entry.timeouts += 1
        entry.stats.timeouts += 1
        key = (event, TimeoutError)
        level = logging.DEBUG if key in entry.logged else logging.WARNING
        entry.logged.add(key)
        logger.log(level, "callback %s.%s timed out after %ss", entry.name, event, self.timeout)

    def _group(
        self, group: _FastGroup, event: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        """Record an end event for every member of ``group`` in one crossing (or, when the core
        declines the call, through each member's own recorder, isolated)."""
        assert group.recorder is not None
        try:
            code, flush = group.recorder.end(args[0], kwargs, _id_prefix)
        except Exception as exc:  # nothing was written: the members' own path decides
            logger.debug("core recorder declined %s: %r", event, exc)
            code, flush = DECLINED, False
        if code == DECLINED:
            for entry, fn in group.members:
                try:
                    fn(*args, kwargs)
                except Exception as exc:
                    self._failed(entry, event, exc)
            return
        if code != _RECORDED:
            group.refused(self, event, code)
        group.kick(flush)

    @staticmethod
    def _failures(entry: _Entry, fn: Any, kind: int) -> Any:
        """Failure counts before a handler call (a group: each member's), for _observe."""
        if kind == GROUP:
            return tuple(m.errors + m.timeouts for m, _ in fn.members)
        return entry.errors + entry.timeouts

    @staticmethod
    def _observe(entry: _Entry, fn: Any, kind: int, seconds: float, before: Any) -> None:
        """Count one execution, its outcome (a success when the handler's failure counts did
        not move since ``before``) and its duration (metrics on); a group's members share its
        one crossing evenly."""
        if kind == GROUP:
            members = fn.members
            share = seconds / len(members)
            for (member, _), was in zip(members, before, strict=True):
                stats = member.stats
                stats.executions += 1
                if member.errors + member.timeouts == was:
                    stats.successes += 1
                stats.durations.record(share)
            return
        stats = entry.stats
        stats.executions += 1
        if entry.errors + entry.timeouts == before:
            stats.successes += 1
        stats.durations.record(seconds)

    async def _fire_observed(
        self,
        targets: tuple[_Target, ...],
        event: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        stop_on_abort: bool,
    ) -> None:
        """:meth:`fire` while metrics are on: every handler call timed and counted."""
        if self.parallel and len(targets) > 1:
            await self._fire_parallel(targets, event, args, kwargs, stop_on_abort, observed=True)
            return
        clock = time.perf_counter
        observe = self._observe
        abort: CallbackAbort | None = None
        for index, (entry, fn, kind) in enumerate(targets):
            before = self._failures(entry, fn, kind)
            t0 = clock()
            found = await self._call(entry, fn, kind, event, args, kwargs)
            observe(entry, fn, kind, clock() - t0, before)
            if found is not None:
                if stop_on_abort:
                    _raise_abort(found, [t[0] for t in targets[:index]])
                if abort is None:
                    abort = found
        if abort is not None:
            raise abort

    def fire_native(
        self,
        targets: tuple[_Target, ...],
        event: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        """:meth:`fire` for targets that are all built-in recorders (synchronous: no coroutine,
        nothing to time out); same isolation and abort rules."""
        abort: CallbackAbort | None = None
        observed = _observed.on
        for entry, fn, kind in targets:
            if observed:
                before = self._failures(entry, fn, kind)
                t0 = time.perf_counter()
            try:
                if kind == FAST:
                    fn(*args, kwargs)
                else:
                    self._group(fn, event, args, kwargs)
            except CallbackAbort as exc:
                if abort is None:
                    abort = exc
            except Exception as exc:
                self._failed(entry, event, exc)
            if observed:
                self._observe(entry, fn, kind, time.perf_counter() - t0, before)
        if abort is not None:
            raise abort

    async def _call(
        self,
        entry: _Entry,
        fn: Any,
        kind: int,
        event: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> CallbackAbort | None:
        """Run one handler; returns the abort it raised, if any. Never raises ``Exception``."""
        timeout = self.timeout
        try:
            if kind == FAST:
                slow = fn(*args, kwargs)
                if slow is not None:  # a built-in handler that needs to wait (a limiter)
                    await slow
            elif kind == GROUP:
                self._group(fn, event, args, kwargs)
            elif timeout is None:
                if kind == ASYNC:
                    await fn(*args, **kwargs)
                else:
                    result = fn(*args, **kwargs)
                    if inspect.isawaitable(result):
                        await result
            else:
                scope = asyncio.timeout(timeout)
                try:
                    async with scope:
                        result = fn(*args, **kwargs)
                        if kind == ASYNC or inspect.isawaitable(result):
                            await result
                except TimeoutError:
                    if scope.expired():
                        self._timed_out(entry, event)
                        return None
                    raise
        except CallbackAbort as abort:
            return abort
        except Exception as exc:
            self._failed(entry, event, exc)
        return None

    async def fire(
        self,
        targets: tuple[_Target, ...],
        event: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        stop_on_abort: bool = False,
    ) -> None:
        """Fire ``event`` on every target; raise the first ``CallbackAbort`` after the others ran
        (or at once with ``stop_on_abort``, then with ``.completed`` naming who ran before)."""
        if _observed.on:
            await self._fire_observed(targets, event, args, kwargs, stop_on_abort)
            return
        if self.parallel and len(targets) > 1:
            await self._fire_parallel(targets, event, args, kwargs, stop_on_abort)
            return
        abort: CallbackAbort | None = None
        if self.timeout is None:
            # The common case, kept tight: no per-handler coroutine wrapper.
            for index, (entry, fn, kind) in enumerate(targets):
                try:
                    if kind == FAST:
                        slow = fn(*args, kwargs)
                        if slow is not None:  # a built-in handler that needs to wait
                            await slow
                    elif kind == GROUP:
                        self._group(fn, event, args, kwargs)
                    elif kind == ASYNC:
                        await fn(*args, **kwargs)
                    else:
                        result = fn(*args, **kwargs)
                        if inspect.isawaitable(result):
                            await result
                except CallbackAbort as exc:
                    if stop_on_abort:
                        _raise_abort(exc, [t[0] for t in targets[:index]])
                    if abort is None:
                        abort = exc
                except Exception as exc:
                    self._failed(entry, event, exc)
        else:
            for index, (entry, fn, kind) in enumerate(targets):
                found = await self._call(entry, fn, kind, event, args, kwargs)
                if found is not None:
                    if stop_on_abort:
                        _raise_abort(found, [t[0] for t in targets[:index]])
                    if abort is None:
                        abort = found
        if abort is not None:
            raise abort

    def fire_fast(
        self,
        targets: tuple[_Target, ...],
        event: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        stop_on_abort: bool = False,
    ) -> Awaitable[None] | None:
        """:meth:`fire` for built-in handlers only (every target ``FAST``), no timeout and no
        observer: no coroutine while none of them needs to wait. Returns ``None`` when the
        event was handled, else an awaitable that finishes it (same isolation and aborts)."""
        abort: CallbackAbort | None = None
        for index, (entry, fn, _) in enumerate(targets):
            try:
                slow = fn(*args, kwargs)
            except CallbackAbort as exc:
                if stop_on_abort:
                    _raise_abort(exc, [t[0] for t in targets[:index]])
                if abort is None:
                    abort = exc
                continue
            except Exception as exc:
                self._failed(entry, event, exc)
                continue
            if slow is not None:
                return self._fast_rest(
                    slow, targets, index, event, args, kwargs, stop_on_abort, abort
                )
        if abort is not None:
            raise abort
        return None

    async def _fast_rest(
        self,
        slow: Awaitable[None],
        targets: tuple[_Target, ...],
        index: int,
        event: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        stop_on_abort: bool,
        abort: CallbackAbort | None,
    ) -> None:
        """The rest of :meth:`fire_fast` once ``targets[index]`` returned ``slow``."""
        while True:
            try:
                await slow
            except CallbackAbort as exc:
                if stop_on_abort:
                    _raise_abort(exc, [t[0] for t in targets[:index]])
                if abort is None:
                    abort = exc
            except Exception as exc:
                self._failed(targets[index][0], event, exc)
            while True:
                index += 1
                if index == len(targets):
                    if abort is not None:
                        raise abort
                    return
                entry, fn, _ = targets[index]
                try:
                    found = fn(*args, kwargs)
                except CallbackAbort as exc:
                    if stop_on_abort:
                        _raise_abort(exc, [t[0] for t in targets[:index]])
                    if abort is None:
                        abort = exc
                    continue
                except Exception as exc:
                    self._failed(entry, event, exc)
                    continue
                if found is not None:
                    slow = found
                    break

    async def _fire_parallel(
        self,
        targets: tuple[_Target, ...],
        event: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        stop_on_abort: bool,
        observed: bool = False,
    ) -> None:
        semaphore = self._semaphore
        clock = time.perf_counter

        async def call(target: _Target) -> CallbackAbort | None:
            entry, fn, kind = target
            if semaphore is None or kind >= FAST:
                return await self._call(entry, fn, kind, event, args, kwargs)
            async with semaphore:
                return await self._call(entry, fn, kind, event, args, kwargs)

        async def timed(target: _Target) -> CallbackAbort | None:
            before = self._failures(*target)
            t0 = clock()
            try:
                return await call(target)
            finally:
                self._observe(target[0], target[1], target[2], clock() - t0, before)

        run = timed if observed else call

        results = await asyncio.gather(*(run(t) for t in targets))
        aborts = [(t[0], r) for t, r in zip(targets, results, strict=True) if r is not None]
        if aborts:
            aborters = {id(e) for e, _ in aborts}
            completed = [t[0] for t in targets if id(t[0]) not in aborters]
            _raise_abort(aborts[0][1], completed if stop_on_abort else [])


def _raise_abort(abort: CallbackAbort, completed: list[_Entry]) -> None:
    abort.__dict__["_llmtally_completed"] = completed
    raise abort


# ---------------------------------------------------------------------------------------------
# Global callbacks.

_global_lock = threading.Lock()
_global_handlers: tuple[object, ...] = ()
_global_version = 0


def set_global_callbacks(callbacks: Iterable[object] | None) -> None:
    """Handlers every :class:`CallbackManager` also fires, after its own of the same priority."""
    global _global_handlers, _global_version
    handlers = tuple(callbacks or ())
    for handler in handlers:
        _Entry(handler, 0, 0)  # validate
    with _global_lock:
        _global_handlers = handlers
        _global_version += 1


def get_global_callbacks() -> list[object]:
    """The handlers set by :func:`set_global_callbacks`."""
    return list(_global_handlers)


# ---------------------------------------------------------------------------------------------
# Run context (nesting through contextvars).


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


# ---------------------------------------------------------------------------------------------
# Dedupe of given request ids.


class RequestWindow:
    """Request ids whose end was counted: the last ``capacity`` ids or ``ttl_s``, whichever is
    smaller. Ids llmtally generates are unique by construction and never enter it."""

    __slots__ = ("_ids", "capacity", "ttl_s")

    def __init__(self, capacity: int = 1_000_000, ttl_s: float = 86_400.0) -> None:
        self.capacity = capacity
        self.ttl_s = ttl_s
        self._ids: OrderedDict[str, float] = OrderedDict()

    def seen(self, request_id: str, now: float | None = None) -> bool:
        """Record ``request_id``; True when it was already recorded inside the window."""
        if now is None:
            now = time.monotonic()
        ids = self._ids
        horizon = now - self.ttl_s
        while ids and next(iter(ids.values())) < horizon:
            ids.popitem(last=False)
        if request_id in ids:
            return True
        if len(ids) >= self.capacity:
            ids.popitem(last=False)
        ids[request_id] = now
        return False

    def __contains__(self, request_id: object) -> bool:
        """Whether ``request_id`` was recorded within the window (nothing is recorded)."""
        at = self._ids.get(request_id) if type(request_id) is str else None
        return at is not None and at >= time.monotonic() - self.ttl_s

    def __len__(self) -> int:
        return len(self._ids)


# ---------------------------------------------------------------------------------------------
# The manager.


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
        self._dispatcher = _Dispatcher(timeout, parallel, env.max_concurrent_callbacks)
        self._lock = threading.Lock()
        self._seq = itertools.count()
        self._own: list[_Entry] = [
            _Entry(handler, 0, next(self._seq)) for handler in (callbacks or ())
        ]
        self._global_entries: dict[int, _Entry] = {}
        self._table = _Table(())
        self._table_version = -1
        self._stats = _Stats()
        self._window = RequestWindow()
        self._rebuild()
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
        entry = _Entry(handler, int(priority), 0)
        with self._lock:
            entry.seq = next(self._seq)
            self._own.append(entry)
            self._rebuild_locked()

    def remove_handler(self, handler: object) -> None:
        """Unregister ``handler`` (no-op when it is not registered)."""
        with self._lock:
            self._own = [entry for entry in self._own if entry.handler is not handler]
            self._rebuild_locked()

    def _rebuild(self) -> None:
        with self._lock:
            self._rebuild_locked()

    def _rebuild_locked(self) -> None:
        version = _global_version
        own_ids = {id(entry.handler) for entry in self._own}
        globals_now: dict[int, _Entry] = {}
        for handler in _global_handlers:
            key = id(handler)
            if key in own_ids or key in globals_now:
                continue
            entry = self._global_entries.get(key)
            if entry is None or entry.handler is not handler:
                entry = _Entry(handler, 0, 0)
            globals_now[key] = entry
        self._global_entries = globals_now
        # Own handlers first (by priority, then registration); globals after those of equal
        # priority, in the order they were set.
        ordered = sorted(self._own, key=lambda e: (-e.priority, e.seq))
        combined = ordered + list(globals_now.values())
        combined.sort(key=lambda e: -e.priority)  # stable: keeps the order above within a level
        self._table = _Table(combined)
        self._table_version = version

    def _current_table(self) -> _Table:
        if self._table_version != _global_version:
            self._rebuild()
        return self._table

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
        return LLMCall(self, messages, provider, model, context)

    def agent_run(self, goal: Any = None, **context: Any) -> AgentRun:
        """Scope an agent run: ``on_agent_start``, ``await run.step(...)``, end or error."""
        return AgentRun(self, (goal,), context)

    def tool_call(self, tool_name: str, args: Any = None, **context: Any) -> ToolCall:
        """Scope a tool call: ``on_tool_start(tool_name, args)``, then end or error."""
        return ToolCall(self, (tool_name, args), context)

    def chain_run(self, chain_name: str, **context: Any) -> ChainRun:
        """Scope a chain run: ``on_chain_start(chain_name)``, then end or error."""
        return ChainRun(self, (chain_name,), context)

    def retrieval(self, query: Any = None, **context: Any) -> Retrieval:
        """Scope a retrieval: ``on_retrieval_start(query)``, then end (documents) or error."""
        return Retrieval(self, (query,), context)

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
# Scopes.


_TIMEOUT_ERRORS: tuple[type[BaseException], ...] = (TimeoutError,)


def _names(manager: CallbackManager, provider: Any, model: Any) -> tuple[str, str]:
    """A provider or model given as something else than a string (an enum, a list by mistake)
    is counted under its text, never raised into the call; anything but an enum is bad input."""
    out = []
    for value in (provider, model):
        if value is None or type(value) is str:
            out.append(value or "")
            continue
        text = getattr(value, "value", None)
        if not isinstance(text, str):
            manager._stats.bad_input += 1
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


def _normalize_user(manager: CallbackManager, context: dict[str, Any]) -> None:
    """The identity rule (``llmtally.identity``) applied once, where the call enters: every
    handler then sees the same ``user_id``. An empty id is no id (an enclosing scope's, else
    ``"anonymous"``); bad input is counted and charged to ``"anonymous"``."""
    value = context["user_id"]
    if isinstance(value, str) and not str.__len__(value):
        del context["user_id"]
        return
    user, bad = charged_user(value)
    if bad:
        manager._stats.bad_input += 1
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

    def __len__(self) -> int:
        return len(self._runs)

    def add(self, call: LLMCall) -> None:
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
_store_module.before_exit(_open_calls.abandon_all)


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


class LLMCall:
    """One LLM call in flight; returned by :meth:`CallbackManager.llm_call`.

    Inside the ``async with`` block, :meth:`set_response` hands over the provider's response
    (dict or SDK object) and :meth:`chunk` each streamed chunk. After the block, ``response`` is
    the normalized response dict given to ``on_llm_end``.
    """

    # Defaults on the class: a call sets only what it uses (cheaper than filling every slot).
    _response: Any = None
    _response_set = False
    _texts: list[str] | None = None
    _chunks = 0
    _first_chunk_at: float | None = None
    _stream_usage: Usage | None = None
    _usage: Usage | None = None
    _token: contextvars.Token[Any] | None = None
    _table: _Table
    _response_dict: dict[str, Any] | None = None
    # The parts of a response recorded by the core and not built yet (see ``response``).
    _parts: tuple[Any, ...] | None = None
    duplicate = False
    run_id = ""
    started_at = 0.0
    _done = False  # an end, error or abandon fired (or the start was aborted)
    _stoppable = True
    _abandoned = False
    _open = False  # in the registry of calls that outlive their scope

    def __init__(
        self,
        manager: CallbackManager,
        messages: Any,
        provider: str | None,
        model: str | None,
        context: dict[str, Any],
    ) -> None:
        self._manager = manager
        self.messages = messages
        user = context.get("user_id")
        if user is not None and (type(user) is not str or not 0 < len(user) <= _SAFE_USER_CHARS):
            _normalize_user(manager, context)
        if type(provider) is not str or type(model) is not str:
            provider, model = _names(manager, provider, model)
        self.provider = provider = provider or "unknown"
        self.model = model = model or "unknown"
        given = context.get("request_id")
        if given is not None and (
            type(given) is not str or len(given) > MAX_ID_CHARS or not given.isascii()
        ):
            # Its text (a digest past MAX_ID_CHARS, so the windows of ids stay small in bytes,
            # or when it has no UTF-8 form).
            given = request_key(given)
            if given is None:  # an id whose str() fails: bad input, one is made
                manager._stats.bad_input += 1
                logger.warning("request_id could not be read: a new one is used")
                del context["request_id"]
            else:
                context["request_id"] = given
        self._id_given = given is not None
        self.request_id: str = given if given is not None else ""
        context["provider"] = provider
        context["model"] = model
        self._kwargs = context

    # -- inside the block -------------------------------------------------------------------

    def detach_context(self) -> None:
        """Leave this call open but stop being the current scope of the running task (for a
        call whose end comes later, like a stream handed back to the caller)."""
        token = self._token
        if token is not None:
            _close_context(token)
            self._token = None

    def set_response(self, response: Any) -> None:
        """Hand over the provider's response: a dict (llmtally's response dict or the provider's
        JSON body) or an SDK object (OpenAI, Anthropic). Usage is normalized when the call ends."""
        self._response = response
        self._response_set = True

    async def chunk(self, chunk: Any, *, usage: Any = None) -> None:
        """Record one streamed chunk (text, or a provider chunk/event) and fire
        ``on_llm_stream_chunk``. The first chunk sets the time to first token. ``usage`` is
        the usage the chunk carries when the chunk itself is only text (a framework's chunk),
        in any shape a response's usage takes (merged like a provider chunk's)."""
        self.record_chunk(chunk, usage=usage)
        targets = self._table.by_event["on_llm_stream_chunk"]
        if targets:
            await self._manager._dispatcher.fire(
                targets, "on_llm_stream_chunk", (chunk,), self._kwargs
            )

    @property
    def wants_chunks(self) -> bool:
        """True when a handler listens to ``on_llm_stream_chunk``; when False, sync code records
        chunks with :meth:`record_chunk` without a trip to an event loop."""
        return bool(self._table.by_event["on_llm_stream_chunk"])

    def record_chunk(self, chunk: Any, *, usage: Any = None) -> None:
        """Record one streamed chunk (its text and usage, see :meth:`chunk`) without firing
        any event."""
        if self._first_chunk_at is None:
            self._first_chunk_at = time.perf_counter()
        self._chunks += 1
        try:
            text = extract_text(chunk)
            if text:
                if self._texts is None:
                    self._texts = [text]
                else:
                    self._texts.append(text)
            if type(chunk) is not str:
                self._stream_usage = merge_stream_usage(self._stream_usage, chunk)
            if usage is not None:
                self._stream_usage = merge_stream_usage(self._stream_usage, usage)
        except BadUsage as exc:
            self._manager._stats.bad_input += 1
            logger.warning("skipped bad usage in stream chunk of %s: %s", self.request_id, exc)
        except Exception as exc:  # a chunk we cannot read is bad input, never an error
            self._manager._stats.bad_input += 1
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

    async def __aenter__(self) -> LLMCall:
        manager = self._manager
        if manager._table_version == _global_version:
            self._table = manager._table
        else:
            self._table = manager._current_table()
        if self._id_given and (self.request_id in manager._window or _ids.counted(self.request_id)):
            # Already counted (a request id handed back): no handler counts it again, but the
            # call still runs, so the limiters still see it.
            self._table = self._table.limits_only
        given_run = self._kwargs.get("run_id")
        if self._id_given:
            self.run_id = given_run if isinstance(given_run, str) and given_run else _next_id()
        else:
            # A generated request id is unique, so it doubles as the run id.
            self.request_id = self._kwargs["request_id"] = _next_id()
            self.run_id = given_run if isinstance(given_run, str) and given_run else self.request_id
        self._kwargs, self._token = _open_context(self._kwargs, self.run_id)
        targets = self._table.by_event["on_llm_start"]
        self.started_at = time.perf_counter()
        if targets:
            dispatcher = manager._dispatcher
            try:
                if (
                    self._table.fast_start
                    and dispatcher.timeout is None
                    and not _observed.on
                    and (len(targets) == 1 or not dispatcher.parallel)
                ):
                    waiting = dispatcher.fire_fast(
                        targets, "on_llm_start", (self.messages,), self._kwargs, stop_on_abort=True
                    )
                    if waiting is not None:
                        await waiting
                else:
                    await dispatcher.fire(
                        targets, "on_llm_start", (self.messages,), self._kwargs, stop_on_abort=True
                    )
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
        self._manager._stats.llm_errors += 1
        if _observed.on:
            _observed.llm_failed(self._kwargs, False)
        targets = self._table.by_event["on_llm_error"]
        if targets:
            duration_ms = (time.perf_counter() - self.started_at) * 1000.0
            kwargs = {**self._kwargs, "duration_ms": duration_ms}
            with contextlib.suppress(CallbackAbort):  # the call is over already
                await self._manager._dispatcher.fire(targets, "on_llm_error", (exc,), kwargs)

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
                await self._manager._dispatcher.fire(targets, "on_llm_error", (abort,), kwargs)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
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
        manager = self._manager
        if exc is None:
            group = self._table.end_group
            if (
                group is not None
                and self._response_set
                and not self._id_given
                and self._first_chunk_at is None
                and self._end_recorded(group, duration_s, ended)
            ):
                if self._table.settlers:
                    self._settle_limiters()
                return None
            try:
                self._end(duration_s)
            except Exception as error:  # a response we cannot read never breaks the call
                manager._stats.bad_input += 1
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
        stats = manager._stats
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
                await manager._dispatcher.fire(targets, "on_llm_error", (exc,), kwargs)
            except CallbackAbort as abort:
                logger.debug("abort %r during on_llm_error ignored: the call already failed", abort)
        return None

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
        dispatcher = self._manager._dispatcher
        if table.native_end:
            dispatcher.fire_native(targets, "on_llm_end", (response,), kwargs)
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
                self._manager._dispatcher._failed(entry, "on_llm_end", exc)

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
                    _ids,  # the core marks the id counted (a caller handing it back: duplicate)
                    self.request_id,
                    _lookup_found,  # ``prices`` is the call model's: unpriced is recorded too
                )
            )
        except Exception:
            return False
        if code != READ_OK or outcome == DECLINED:
            return False
        stats = self._manager._stats
        stats.llm_calls += 1
        if message is not None:
            stats.usage_warnings += 1
            logger.warning("usage of %s: %s (total kept)", self.request_id, message)
        self._usage = usage
        if found_model is not None and found_model != model:
            prices = cached_prices(found_model, self.provider)  # what the core priced it by
        self._parts = (found_model, content, table_cost, duration_s, rid, reason, prices)
        if table_cost is None and usage is not None and usage.cost_usd is None:
            for count_unpriced in group.unpriced:
                count_unpriced(found_model or model)
        if outcome != _RECORDED:
            group.refused(self._manager._dispatcher, "on_llm_end", outcome)
        group.kick(flush)
        if observed:
            self._manager._dispatcher._observe(
                group.members[0][0], group, GROUP, time.perf_counter() - t0, before
            )
            cost = table_cost
            if cost is None and usage is not None and usage.cost_usd is not None:
                cost = usd_to_pusd(usage.cost_usd)
            _observed.llm_usage_end(kwargs, found_model, usage, cost)
        return True

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

    def _end(self, duration_s: float) -> None:
        """Normalize the usage and build the response dict (no await, no I/O)."""
        stats = self._manager._stats
        request_id = self.request_id
        if self._id_given and (
            _ids.counted(request_id) or self._manager._window.seen(request_id, time.monotonic())
        ):
            self.duplicate = True
            stats.duplicates += 1
            logger.info("duplicate end for request_id %r ignored", self.request_id)
        else:
            stats.llm_calls += 1
            if not self._id_given:
                _ids.mark(request_id)  # a caller handing this id back is a duplicate
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
            self._manager._stats.bad_input += 1
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
        stats = self._manager._stats
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


class _Scope:
    """Agent, tool, chain and retrieval scopes: start on entry, end with the result set by
    :meth:`set_result`, or error (re-raised)."""

    __slots__ = ("_args", "_kwargs", "_manager", "_result", "_table", "_token", "run_id")

    START: str
    END: str
    ERROR: str
    #: How many of the start arguments are repeated before the result/error (tool_name).
    PREFIX = 0

    def __init__(
        self, manager: CallbackManager, args: tuple[Any, ...], context: dict[str, Any]
    ) -> None:
        self._manager = manager
        self._args = args
        user = context.get("user_id")
        if user is not None and (type(user) is not str or not 0 < len(user) <= _SAFE_USER_CHARS):
            _normalize_user(manager, context)
        self._kwargs = context
        self._result: Any = None
        self.run_id = ""

    def set_result(self, result: Any) -> None:
        """The scope's result, passed to the end event."""
        self._result = result

    async def __aenter__(self) -> Any:
        manager = self._manager
        self._table = manager._current_table()
        self.run_id = _next_id()
        self._kwargs, self._token = _open_context(self._kwargs, self.run_id)
        targets = self._table.by_event[self.START]
        if targets:
            try:
                await manager._dispatcher.fire(
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
                await self._manager._dispatcher.fire(
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
                await self._manager._dispatcher.fire(
                    targets, self.END, (*prefix, self._result), self._kwargs
                )
            return None
        if isinstance(exc, GeneratorExit | KeyboardInterrupt | SystemExit):
            return None
        targets = self._table.by_event[self.ERROR]
        if targets:
            try:
                await self._manager._dispatcher.fire(
                    targets, self.ERROR, (*prefix, exc), self._kwargs
                )
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
            await self._manager._dispatcher.fire(targets, "on_agent_step", (step,), self._kwargs)


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
