"""Settings from the environment, read once, in one place.

``LLMTALLY_<NAME>`` wins over the seed's alias (``CALLBACK_TIMEOUT`` and friends). A value that
does not parse raises :class:`~llmtally.errors.ConfigError` naming the variable.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass

from llmtally.errors import ConfigError

__all__ = ["Settings", "settings", "validate_timeout"]

logger = logging.getLogger("llmtally")

_LEVELS = {"CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG", "NOTSET"}


@dataclass(frozen=True, slots=True)
class Settings:
    """Process-wide defaults taken from the environment."""

    callback_timeout_s: float | None = None
    max_concurrent_callbacks: int | None = None
    log_level: str | None = None


def _lookup(name: str, alias: str) -> tuple[str, str] | None:
    for var in (name, alias):
        value = os.environ.get(var)
        if value is not None and value.strip() != "":
            return var, value.strip()
    return None


def _read() -> Settings:
    timeout: float | None = None
    found = _lookup("LLMTALLY_CALLBACK_TIMEOUT_S", "CALLBACK_TIMEOUT")
    if found:
        var, raw = found
        try:
            timeout = float(raw)
        except ValueError:
            raise ConfigError(f"{var}={raw!r} is not a number of seconds") from None
        if not timeout > 0 or timeout != timeout or timeout == float("inf"):
            raise ConfigError(f"{var}={raw!r} must be a positive, finite number of seconds")
    concurrent: int | None = None
    found = _lookup("LLMTALLY_MAX_CONCURRENT_CALLBACKS", "CALLBACK_MAX_CONCURRENT")
    if found:
        var, raw = found
        try:
            concurrent = int(raw)
        except ValueError:
            raise ConfigError(f"{var}={raw!r} is not an integer") from None
        if concurrent < 1:
            raise ConfigError(f"{var}={raw!r} must be at least 1")
    level: str | None = None
    found = _lookup("LLMTALLY_LOG_LEVEL", "CALLBACK_LOG_LEVEL")
    if found:
        var, raw = found
        level = raw.upper()
        if level not in _LEVELS:
            raise ConfigError(f"{var}={raw!r} is not a log level ({', '.join(sorted(_LEVELS))})")
        logger.setLevel(level)
    return Settings(timeout, concurrent, level)


_lock = threading.Lock()
_cached: Settings | None = None


def settings(*, reload: bool = False) -> Settings:
    """The environment settings, parsed on first use (``reload=True`` reads them again)."""
    global _cached
    cached = _cached
    if cached is not None and not reload:
        return cached
    with _lock:
        if _cached is None or reload:
            _cached = _read()
        return _cached


def validate_timeout(timeout: float | None, name: str = "timeout") -> float | None:
    """Check a timeout argument in seconds: ``None`` or a positive finite number."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise ConfigError(
            f"{name} must be a number of seconds or None, not {type(timeout).__name__}"
        )
    if not (0 < timeout < float("inf")):
        raise ConfigError(f"{name} must be a positive, finite number of seconds, not {timeout!r}")
    return float(timeout)
