"""What the framework integrations share: the registry of runs a start hook opened and an end
hook will close, and the guard that counts and logs an integration's own failures."""

from __future__ import annotations

import logging

from llmtally._runtime import OpenRuns

__all__ = ["FailureGuard", "OpenRuns"]

logger = logging.getLogger("llmtally")


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
