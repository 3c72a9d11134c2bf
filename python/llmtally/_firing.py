"""Firing an event on a table's targets: one loop, with failures isolated and aborts passed on.

A handler's exception, hang (past ``timeout``) or slowness never reaches the caller and never
stops the other handlers: it is logged and counted. Only :class:`~llmtally.errors.CallbackAbort`
(``BudgetExceeded``, ``RateLimited``, ...) stops a call, on purpose.

:meth:`_Dispatcher.fire` is the loop. How one handler is called is its strategy: inline in the
common case (no timeout, metrics off: no coroutine per handler), through :meth:`_invoke` with a
timeout or while metrics time every handler, concurrently (the same :meth:`_invoke` under
``gather``) in parallel mode. :meth:`_Dispatcher.fire_fast` is the loop's synchronous start for
built-in handlers: no coroutine at all unless one of them has to wait.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable
from typing import Any

from llmtally import _ids
from llmtally._native import DECLINED
from llmtally._native import RECORDED as _RECORDED
from llmtally._observe import state as _observed
from llmtally._tables import ASYNC, FAST, GROUP, _Entry, _FastGroup, _Target
from llmtally.errors import CallbackAbort

__all__ = ["_Dispatcher"]

logger = logging.getLogger("llmtally")


def _raise_abort(abort: CallbackAbort, completed: list[_Entry]) -> None:
    abort.__dict__["_llmtally_completed"] = completed
    raise abort


class _Dispatcher:
    """Runs one event over a tuple of targets with isolation, timeout and abort handling."""

    __slots__ = ("_semaphore", "parallel", "timeout")

    def __init__(self, timeout: float | None, parallel: bool, max_concurrent: int | None) -> None:
        self.timeout = timeout
        self.parallel = parallel
        self._semaphore = asyncio.Semaphore(max_concurrent) if parallel and max_concurrent else None
        _ids.start()  # built-in recorders tell this process's ids from given ones

    # -- outcomes -------------------------------------------------------------------------------

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

    # -- one target -----------------------------------------------------------------------------

    def _group(
        self, group: _FastGroup, event: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        """Record an end event for every member of ``group`` in one crossing (or, when the core
        declines the call, through each member's own recorder, isolated)."""
        assert group.recorder is not None
        try:
            code, flush = group.recorder.end(args[0], kwargs, _ids.state.prefix)
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

    async def _invoke(
        self,
        entry: _Entry,
        fn: Any,
        kind: int,
        event: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        observed: bool,
    ) -> CallbackAbort | None:
        """Run one target with the strategies the loop leaves out of its inline case: the
        per-handler timeout and the metrics' timing. Returns the abort it raised, if any;
        never raises ``Exception``."""
        if observed:
            before = self._failures(entry, fn, kind)
            t0 = time.perf_counter()
        timeout = self.timeout
        try:
            if kind == FAST:
                slow = fn(*args, kwargs)
                if slow is not None:  # a built-in handler that needs to wait (a limiter)
                    await slow
            elif kind == GROUP:
                self._group(fn, event, args, kwargs)
            elif timeout is None:
                result = fn(*args, **kwargs)
                if kind == ASYNC or inspect.isawaitable(result):
                    await result
            else:
                scope = asyncio.timeout(timeout)
                try:
                    async with scope:
                        result = fn(*args, **kwargs)
                        if kind == ASYNC or inspect.isawaitable(result):
                            await result
                except TimeoutError:
                    if not scope.expired():
                        raise
                    self._timed_out(entry, event)
        except CallbackAbort as abort:
            return abort
        except Exception as exc:
            self._failed(entry, event, exc)
        finally:
            if observed:
                self._observe(entry, fn, kind, time.perf_counter() - t0, before)
        return None

    # -- the loop -------------------------------------------------------------------------------

    async def fire(
        self,
        targets: tuple[_Target, ...],
        event: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        stop_on_abort: bool = False,
        _done: tuple[_Target, ...] = (),
        _abort: CallbackAbort | None = None,
    ) -> None:
        """Fire ``event`` on every target; raise the first ``CallbackAbort`` after the others ran
        (or at once with ``stop_on_abort``, then with ``.completed`` naming who ran before).

        ``_done`` and ``_abort``: the targets :meth:`fire_fast` already ran before it handed
        the rest over, and the first abort they raised (the rest then runs in order)."""
        if self.parallel and len(targets) > 1 and not _done:
            await self._fire_parallel(targets, event, args, kwargs, stop_on_abort)
            return
        inline = self.timeout is None and not _observed.on
        abort = _abort
        found: CallbackAbort | None
        for index, (entry, fn, kind) in enumerate(targets):
            if inline:  # the common case, kept tight: no coroutine per handler
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
                    continue
                except CallbackAbort as exc:
                    found = exc
                except Exception as exc:
                    self._failed(entry, event, exc)
                    continue
            else:
                found = await self._invoke(entry, fn, kind, event, args, kwargs, _observed.on)
                if found is None:
                    continue
            if stop_on_abort:
                _raise_abort(found, [t[0] for t in (*_done, *targets[:index])])
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
        """:meth:`fire` for built-in handlers only (every target ``FAST`` or ``GROUP``, fired
        in order), without a coroutine while none of them needs to wait. Returns ``None`` when
        the event was handled, else an awaitable that finishes it in :meth:`fire` (the same
        loop: same isolation and aborts; with metrics on, where each handler is timed)."""
        if _observed.on:
            return self.fire(targets, event, args, kwargs, stop_on_abort=stop_on_abort)
        abort: CallbackAbort | None = None
        for index, (entry, fn, kind) in enumerate(targets):
            try:
                if kind == GROUP:
                    self._group(fn, event, args, kwargs)
                    continue
                slow = fn(*args, kwargs)
                if slow is None:
                    continue
            except CallbackAbort as exc:
                if stop_on_abort:
                    _raise_abort(exc, [t[0] for t in targets[:index]])
                if abort is None:
                    abort = exc
                continue
            except Exception as exc:
                self._failed(entry, event, exc)
                continue
            return self._after_wait(slow, targets, index, event, args, kwargs, stop_on_abort, abort)
        if abort is not None:
            raise abort
        return None

    async def _after_wait(
        self,
        slow: Awaitable[Any],
        targets: tuple[_Target, ...],
        index: int,
        event: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        stop_on_abort: bool,
        abort: CallbackAbort | None,
    ) -> None:
        """:meth:`fire_fast` once ``targets[index]`` returned ``slow``: wait for it, then the
        loop goes on with the targets after it."""
        try:
            await slow
        except CallbackAbort as exc:
            if stop_on_abort:
                _raise_abort(exc, [t[0] for t in targets[:index]])
            if abort is None:
                abort = exc
        except Exception as exc:
            self._failed(targets[index][0], event, exc)
        index += 1
        rest = targets[index:]
        if rest:
            await self.fire(
                rest,
                event,
                args,
                kwargs,
                stop_on_abort=stop_on_abort,
                _done=targets[:index],
                _abort=abort,
            )
        elif abort is not None:
            raise abort

    async def _fire_parallel(
        self,
        targets: tuple[_Target, ...],
        event: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        stop_on_abort: bool,
    ) -> None:
        """The parallel strategy: every target at once through :meth:`_invoke` (Python
        handlers bounded by ``LLMTALLY_MAX_CONCURRENT_CALLBACKS``)."""
        semaphore = self._semaphore
        invoke = self._invoke
        observed = _observed.on

        async def bounded(target: _Target, semaphore: asyncio.Semaphore) -> CallbackAbort | None:
            async with semaphore:
                return await invoke(*target, event, args, kwargs, observed)

        results = await asyncio.gather(
            *(
                invoke(*t, event, args, kwargs, observed)
                if semaphore is None or t[2] >= FAST
                else bounded(t, semaphore)
                for t in targets
            )
        )
        aborts = [(t[0], r) for t, r in zip(targets, results, strict=True) if r is not None]
        if aborts:
            aborters = {id(e) for e, _ in aborts}
            completed = [t[0] for t in targets if id(t[0]) not in aborters]
            _raise_abort(aborts[0][1], completed if stop_on_abort else [])
