"""What the framework integrations share: the registry of runs a start hook opened and an end
hook will close, and the guard that counts and logs an integration's own failures."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["FailureGuard", "OpenRuns"]

logger = logging.getLogger("llmtally")

_R = TypeVar("_R")


class OpenRuns(Generic[_R]):
    """Runs waiting for their end hook, by key; thread-safe and bounded. Past ``capacity``
    the oldest is handed to ``evict`` (an LLM call is ended as abandoned there, never silently
    dropped) and counted in ``evicted``; the first eviction is logged."""

    def __init__(self, capacity: int, what: str, evict: Callable[[_R], object]) -> None:
        self.capacity = capacity
        self.evicted = 0
        self._what = what
        self._evict = evict
        self._runs: OrderedDict[str, _R] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._runs)

    def __contains__(self, key: str) -> bool:
        return key in self._runs

    def put(self, key: str, run: _R) -> None:
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

    def get(self, key: str) -> _R | None:
        return self._runs.get(key)

    def pop(self, key: str) -> _R | None:
        with self._lock:
            return self._runs.pop(key, None)


class FailureGuard:
    """An integration's own failures (its hooks never raise into the framework): counted in
    ``errors``; the first of each (event, exception type) logged with its traceback, the
    others at DEBUG."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.errors = 0
        self._logged: set[tuple[str, type]] = set()

    def __call__(self, event: str, exc: BaseException) -> None:
        self.errors += 1
        key = (event, type(exc))
        if key in self._logged:
            logger.debug("%s.%s failed again: %r", self.owner, event, exc)
            return
        self._logged.add(key)
        logger.error(
            "%s.%s failed (isolated; further %s are logged at DEBUG): %r",
            self.owner,
            event,
            type(exc).__name__,
            exc,
            exc_info=exc,
        )
