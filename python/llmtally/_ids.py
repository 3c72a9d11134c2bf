"""Request and run ids: made here (unique across processes, forked ones included), and the
window of ids given by callers whose end was counted.

The id maker is made when first needed (the first manager, or the first :func:`new_id`), with
a random per-process prefix; a fork hook, registered at that moment, gives a forked child a
maker of its own. Nothing happens at import, so a process that imports llmtally and then forks
workers gives each worker its own prefix.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict

from llmtally._native import IdMaker

__all__ = ["RequestWindow", "new_id", "start", "state"]


class _State:
    """This process's id maker, unset until first needed (:func:`start`) so the hot path reads
    it without a check, and ``prefix``: every id made here starts with it (before the first
    id, a random prefix no id was made with)."""

    __slots__ = ("maker", "prefix")

    maker: IdMaker

    def __init__(self) -> None:
        self.prefix = os.urandom(6).hex()


state = _State()
_lock = threading.Lock()
_fork_hook = False


def _make() -> IdMaker:
    prefix = os.urandom(6).hex()
    state.maker = maker = IdMaker(prefix)
    state.prefix = prefix
    return maker


def _after_fork_in_child() -> None:
    """A forked child makes ids of its own (the parent's counter would repeat them)."""
    global _lock
    _lock = threading.Lock()
    if hasattr(state, "maker"):
        _make()


def start() -> IdMaker:
    """This process's id maker, made (and the fork hook registered) on first use."""
    global _fork_hook
    try:
        return state.maker
    except AttributeError:
        pass
    with _lock:
        if hasattr(state, "maker"):
            return state.maker
        if not _fork_hook and hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=_after_fork_in_child)
            _fork_hook = True
        return _make()


def new_id() -> str:
    """A new request or run id, unique across processes.

    >>> new_id() != new_id()
    True
    """
    try:
        maker = state.maker
    except AttributeError:
        maker = start()
    return maker.next()


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
