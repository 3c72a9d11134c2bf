"""Handler tables: who is fired for each event, and how.

A manager's handlers (its own, by priority then registration, and the global ones) are turned
into an immutable :class:`_Table` of per-event targets when they change (copy on write), never
per event: a handler that does not override an event costs nothing for it, and handlers can be
added or removed while events are in flight (those keep their snapshot). Built-in metering
handlers become ``FAST`` targets (a synchronous recorder) or one ``GROUP`` recorded by the core
in one crossing.
"""

from __future__ import annotations

import inspect
import itertools
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Final

from llmtally._native import CallUserSink, Sink, UserKeySink
from llmtally._native import Recorder as _Recorder
from llmtally._observe import stats_for
from llmtally.errors import InvalidHandler
from llmtally.events import EVENTS, overridden_events

if TYPE_CHECKING:
    from llmtally._firing import _Dispatcher

__all__ = [
    "ASYNC",
    "FAST",
    "GROUP",
    "SYNC",
    "Handlers",
    "get_global_callbacks",
    "globals_state",
    "set_global_callbacks",
]


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


# ---------------------------------------------------------------------------------------------
# Global callbacks, and the registry of a manager's handlers.


class _Globals:
    """The handlers every manager also fires, and a version that moves when they change (or
    the process forks: tables are rebuilt so the core's recorders write to the child's
    ledgers)."""

    __slots__ = ("handlers", "lock", "version")

    def __init__(self) -> None:
        self.handlers: tuple[object, ...] = ()
        self.lock = threading.Lock()
        self.version = 0


globals_state = _Globals()
_fork_hook = False


def _after_fork_in_child() -> None:
    globals_state.lock = threading.Lock()
    globals_state.version += 1


def set_global_callbacks(callbacks: Iterable[object] | None) -> None:
    """Handlers every :class:`CallbackManager` also fires, after its own of the same priority."""
    handlers = tuple(callbacks or ())
    for handler in handlers:
        _Entry(handler, 0, 0)  # validate
    with globals_state.lock:
        globals_state.handlers = handlers
        globals_state.version += 1


def get_global_callbacks() -> list[object]:
    """The handlers set by :func:`set_global_callbacks`."""
    return list(globals_state.handlers)


class Handlers:
    """One manager's handlers: its own (by priority, then registration) and the global ones,
    with the table built from them, rebuilt when they change. ``table`` is current while
    ``version`` equals ``globals_state.version`` (else :meth:`current` rebuilds it)."""

    __slots__ = ("_globals", "_lock", "_own", "_seq", "table", "version")

    def __init__(self, handlers: Iterable[object]) -> None:
        global _fork_hook
        if not _fork_hook and hasattr(os, "register_at_fork"):
            with globals_state.lock:
                if not _fork_hook:
                    os.register_at_fork(after_in_child=_after_fork_in_child)
                    _fork_hook = True
        self._lock = threading.Lock()
        self._seq = itertools.count()
        self._own: list[_Entry] = [_Entry(handler, 0, next(self._seq)) for handler in handlers]
        self._globals: dict[int, _Entry] = {}
        self.table = _EMPTY_TABLE
        self.version = -1
        self._rebuild()

    def current(self) -> _Table:
        """The current table (rebuilt when the global handlers changed)."""
        if self.version != globals_state.version:
            self._rebuild()
        return self.table

    def add(self, handler: object, priority: int) -> None:
        entry = _Entry(handler, priority, 0)
        with self._lock:
            entry.seq = next(self._seq)
            self._own.append(entry)
            self._rebuild_locked()

    def remove(self, handler: object) -> None:
        with self._lock:
            self._own = [entry for entry in self._own if entry.handler is not handler]
            self._rebuild_locked()

    def _rebuild(self) -> None:
        with self._lock:
            self._rebuild_locked()

    def _rebuild_locked(self) -> None:
        version = globals_state.version
        own_ids = {id(entry.handler) for entry in self._own}
        globals_now: dict[int, _Entry] = {}
        for handler in globals_state.handlers:
            key = id(handler)
            if key in own_ids or key in globals_now:
                continue
            entry = self._globals.get(key)
            if entry is None or entry.handler is not handler:
                entry = _Entry(handler, 0, 0)
            globals_now[key] = entry
        self._globals = globals_now
        # Own handlers first (by priority, then registration); globals after those of equal
        # priority, in the order they were set.
        ordered = sorted(self._own, key=lambda e: (-e.priority, e.seq))
        combined = ordered + list(globals_now.values())
        combined.sort(key=lambda e: -e.priority)  # stable: keeps the order above within a level
        self.table = _Table(combined)
        self.version = version
