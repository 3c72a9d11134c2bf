"""One background event loop, on a daemon thread started on first use, for the events of code
that is not async: sync SDK clients, LiteLLM's sync hooks, streams garbage-collected unclosed,
calls left open at interpreter exit.

Handlers are async; a sync caller hands them to this loop and waits. The caller's contextvars go
with the coroutine (an enclosing scope's ``user_id`` is inherited as it would be in async code).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import logging
import os
import queue
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from typing import Any, Generic, TypeVar

__all__ = ["HandOff", "OpenRuns", "Runner", "hand_off", "runner"]

logger = logging.getLogger("llmtally")

_T = TypeVar("_T")
_START_TIMEOUT_S = 10.0
_K = TypeVar("_K")
_R = TypeVar("_R")


class Runner:
    """A daemon thread running an event loop."""

    def __init__(self, name: str = "llmtally-events") -> None:
        self._name = name
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def _start(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            loop = self._loop
            if loop is not None and self._thread is not None and self._thread.is_alive():
                return loop
            if sys.is_finalizing():
                # A thread started now never runs (the exit hook already ended open calls).
                raise RuntimeError("the interpreter is shutting down: no new event thread")
            loop = asyncio.new_event_loop()
            ready = threading.Event()

            def run() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                loop.run_forever()

            thread = threading.Thread(target=run, name=self._name, daemon=True)
            thread.start()
            if not ready.wait(_START_TIMEOUT_S):
                loop.close()
                raise RuntimeError("the event thread did not start")
            self._loop, self._thread = loop, thread
            return loop

    def in_loop(self) -> bool:
        """True when called from the runner's own thread (a handler calling sync code)."""
        return self._thread is not None and threading.current_thread() is self._thread

    def submit(
        self, coro: Coroutine[Any, Any, _T], context: contextvars.Context | None = None
    ) -> concurrent.futures.Future[_T]:
        """Start ``coro`` on the loop, in ``context`` (default a copy of the caller's context);
        returns at once. Given a context, what the coroutine sets in it stays there: the
        caller can go on in it with ``context.run`` once the future is done."""
        loop = self._start()
        if context is None:
            context = contextvars.copy_context()
        future: concurrent.futures.Future[_T] = concurrent.futures.Future()

        def create() -> None:
            if not future.set_running_or_notify_cancel():
                coro.close()
                return
            task = loop.create_task(coro, context=context)

            def done(task: asyncio.Task[_T]) -> None:
                if task.cancelled():
                    future.cancel()
                elif (exc := task.exception()) is not None:
                    future.set_exception(exc)
                else:
                    future.set_result(task.result())

            # Not in ``context``: the caller may enter it as soon as the future is done.
            task.add_done_callback(done, context=_EMPTY)

        loop.call_soon_threadsafe(create)
        return future

    def run(
        self,
        coro: Coroutine[Any, Any, _T],
        timeout: float | None = None,
        context: contextvars.Context | None = None,
    ) -> _T | None:
        """Run ``coro`` on the loop and wait for it, raising what it raises (up to ``timeout``
        seconds; past it the coroutine goes on in the background and ``None`` is returned),
        in ``context`` as :meth:`submit` does. From the runner's own thread (sync code inside
        a handler), it runs on a loop of its own in a helper thread."""
        if self.in_loop():
            # Sync code called from a handler on this loop: the loop is blocked by its caller,
            # so the coroutine runs to its end on a loop of its own, in a helper thread.
            return _run_aside(coro, timeout)
        future = self.submit(coro, context)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            logger.warning(
                "llmtally handlers took more than %ss in sync code; not waiting", timeout
            )
            return None


def _run_aside(coro: Coroutine[Any, Any, _T], timeout: float | None) -> _T | None:
    context = contextvars.copy_context()
    outcome: list[Any] = []

    def target() -> None:
        try:
            outcome.append((True, context.run(asyncio.run, coro)))
        except BaseException as exc:  # handed to the waiting caller
            outcome.append((False, exc))

    thread = threading.Thread(target=target, name="llmtally-events-aside", daemon=True)
    thread.start()
    thread.join(timeout)
    if not outcome:
        logger.warning("llmtally handlers took more than %ss in sync code; not waiting", timeout)
        return None
    ok, value = outcome[0]
    if not ok:
        raise value
    return value  # type: ignore[no-any-return, unused-ignore]


class OpenRuns(Generic[_K, _R]):
    """Runs waiting for their end hook, by key; thread-safe and bounded. Past ``capacity``
    the oldest is handed to ``evict`` (an LLM call is ended as abandoned there, never silently
    dropped) and counted in ``evicted``; the first eviction is logged."""

    def __init__(self, capacity: int, what: str, evict: Callable[[_R], object]) -> None:
        self.capacity = capacity
        self.evicted = 0
        self._what = what
        self._evict = evict
        self._runs: OrderedDict[_K, _R] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._runs)

    def __contains__(self, key: _K) -> bool:
        return key in self._runs

    def put(self, key: _K, run: _R) -> None:
        evicted: list[_R] = []
        with self._lock:
            runs = self._runs
            while len(runs) >= self.capacity:
                evicted.append(runs.popitem(last=False)[1])
            runs[key] = run
            self.evicted += len(evicted)
            first = bool(evicted) and self.evicted == len(evicted)
        if first:
            logger.warning(
                "more than %d %s open at once: the oldest are ended as abandoned",
                self.capacity,
                self._what,
            )
        for old in evicted:
            try:
                self._evict(old)
            except Exception as exc:
                logger.error("ending an evicted %s failed: %r", self._what, exc)

    def get(self, key: _K) -> _R | None:
        return self._runs.get(key)

    def pop(self, key: _K) -> _R | None:
        with self._lock:
            return self._runs.pop(key, None)

    def values(self) -> list[_R]:
        """The open runs now (a copy)."""
        with self._lock:
            return list(self._runs.values())


_EMPTY = contextvars.Context()

runner = Runner()


class HandOff:
    """Work that a garbage collector's finalizer starts (a dropped store or limiter cleaning
    up), run on a daemon thread of its own.

    A finalizer may run at any allocation, also while its own thread holds a lock that
    ``ThreadPoolExecutor.submit`` or ``Thread.start`` takes (a GC pass inside ``submit``): it
    must take no lock. :meth:`put` only appends to a ``queue.SimpleQueue`` (reentrant by
    design, for ``__del__`` and weakref callbacks); the thread that runs the work is started by
    :meth:`prepare`, called where a finalizer is registered (never in one), again in a forked
    child."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Callable[[], object]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._fork_hook = False

    def prepare(self) -> None:
        """Make sure the thread runs (from ordinary code, never from a finalizer)."""
        thread = self._thread
        if thread is not None and thread.is_alive():
            return
        with self._lock:
            thread = self._thread
            if thread is not None and thread.is_alive():
                return
            if not self._fork_hook and hasattr(os, "register_at_fork"):
                os.register_at_fork(after_in_child=self._after_fork)
                self._fork_hook = True
            self._thread = threading.Thread(target=self._run, name="llmtally-handoff", daemon=True)
            self._thread.start()

    def put(self, fn: Callable[[], object]) -> None:
        """Run ``fn()`` on the hand-off thread (safe in a finalizer: takes no lock). Work handed
        off while the thread is not running waits for the next :meth:`prepare`."""
        self._queue.put(fn)

    def _after_fork(self) -> None:
        self._thread = None
        self._lock = threading.Lock()
        if not self._queue.empty():
            self.prepare()

    def _run(self) -> None:
        while True:
            fn = self._queue.get()
            try:
                fn()
            except Exception as exc:
                logger.debug("a background clean-up failed: %r", exc)


hand_off = HandOff()
