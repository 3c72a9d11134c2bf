"""Which user a call is charged to: one rule, used by every handler, tracker, limiter, metric,
the store and the CLI.

- a ``str`` user id is used as given (an empty one is ``"anonymous"``);
- an ``int`` (not ``bool``) is its decimal string;
- ``None`` is ``"anonymous"``;
- anything else, or a str over ``MAX_USER_ID_BYTES`` in UTF-8, is bad input: counted, logged,
  and charged to ``"anonymous"``.
"""

from __future__ import annotations

import logging
from typing import Any, Final

__all__ = ["ANONYMOUS", "MAX_USER_ID_BYTES", "charged_user", "describe", "join_key", "split_key"]

logger = logging.getLogger("llmtally")

ANONYMOUS: Final = "anonymous"
MAX_USER_ID_BYTES: Final = 64 * 1024
"""The longest user id, in UTF-8 bytes (the constructors' limit, and the call path's)."""
# A str of at most this many characters is within the byte limit whatever it holds (UTF-8 takes
# at most 4 bytes a character), so the common case costs one length check.
_SAFE_CHARS: Final = MAX_USER_ID_BYTES // 4


def charged_user(value: Any) -> tuple[str, bool]:
    """``(user, bad)``: the user a call with ``user_id=value`` is charged to, and whether the
    value was bad input."""
    if type(value) is str:
        if 0 < len(value) <= _SAFE_CHARS:
            return value, False
        if not value:
            return ANONYMOUS, False
        if len(value.encode("utf-8", "surrogatepass")) > MAX_USER_ID_BYTES:
            return ANONYMOUS, True
        return value, False
    if value is None:
        return ANONYMOUS, False
    if isinstance(value, bool):
        return ANONYMOUS, True
    if isinstance(value, int):
        return str(int(value)), False
    if isinstance(value, str):  # a str subclass: its text
        return charged_user(str.__str__(value))
    return ANONYMOUS, True


def describe(value: Any) -> str:
    """A short, safe description of a bad user id for a log line."""
    if isinstance(value, str):
        return f"a str of {len(value.encode('utf-8', 'surrogatepass'))} bytes"
    return f"a {type(value).__name__}"


# In-process tracker keys are (provider, model, user) joined into one str for the Rust ledger.
# Each part is escaped so no name can forge another's key: \x1e -> \x1e0, \x1f -> \x1e1, then
# the parts are joined with \x1f (the core's recorder escapes the same way).
_SEP: Final = "\x1f"
_ESC: Final = "\x1e"


def _escape(part: str) -> str:
    if _ESC in part or _SEP in part:
        return part.replace(_ESC, _ESC + "0").replace(_SEP, _ESC + "1")
    return part


def _unescape(part: str) -> str:
    if _ESC not in part:
        return part
    out, i = [], 0
    while i < len(part):
        ch = part[i]
        if ch == _ESC and i + 1 < len(part):
            out.append(_ESC if part[i + 1] == "0" else _SEP)
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def join_key(*parts: str) -> str:
    """One ledger key from its parts; :func:`split_key` gives them back, whatever they hold."""
    return _SEP.join(_escape(p) for p in parts)


def split_key(key: str) -> list[str]:
    return [_unescape(p) for p in key.split(_SEP)]
