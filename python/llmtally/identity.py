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
from typing import Any, Final, Protocol

__all__ = ["ANONYMOUS", "MAX_USER_ID_BYTES", "charged_user", "describe", "user_of"]

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
        text = _decimal(value)
        return (ANONYMOUS, True) if text is None else (text, False)
    if isinstance(value, str):  # a str subclass: its text
        return charged_user(str.__str__(value))
    return ANONYMOUS, True


_CHUNK: Final = 10**1000


def _decimal(value: int) -> str | None:
    """An int's decimal string (whatever ``sys.set_int_max_str_digits`` says, and without
    calling a subclass's methods), or ``None`` when it is longer than ``MAX_USER_ID_BYTES``."""
    value = int.__int__(value)  # the plain int: no method of a subclass is called below
    if value.bit_length() <= 3000:  # under 1,000 digits: within any str conversion limit
        return int.__repr__(value)
    if value.bit_length() > MAX_USER_ID_BYTES * 3.33:  # over 64 Ki digits
        return None
    n = -value if value < 0 else value
    chunks = []
    while n:
        n, rest = divmod(n, _CHUNK)
        chunks.append(rest)
    text = ("-" if value < 0 else "") + int.__repr__(chunks.pop())
    text += "".join(f"{c:01000d}" for c in reversed(chunks))
    return text if len(text) <= MAX_USER_ID_BYTES else None


def describe(value: Any) -> str:
    """A short, safe description of a bad user id for a log line."""
    if isinstance(value, str):
        return f"a str of {len(value.encode('utf-8', 'surrogatepass'))} bytes"
    return f"a {type(value).__name__}"


class _Counted(Protocol):
    bad_input: int


def user_of(value: Any, owner: _Counted) -> str:
    """The user a handler charges for ``user_id=value``; bad input is counted in
    ``owner.bad_input`` and logged (a handler called directly; through a manager the id is
    already normalized where the call entered, so this is one type check and one length check).
    """
    if type(value) is str and 0 < len(value) <= _SAFE_CHARS:
        return value
    user, bad = charged_user(value)
    if bad:
        owner.bad_input += 1
        logger.warning("user_id is %s: charged to %r", describe(value), user)
    return user
