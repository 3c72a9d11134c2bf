"""Store keys: ``llmtally:{<user_id>}:<YYYY-MM-DD>``, one hash per user and billing cycle.

The one owner of the key layout: usage keys, their patterns, the keys next to them (budget
reservations, rate windows) and the flushers' idempotency markers; and of the billing-cycle
clock (kept in the core, which the hot path reads too).

User ids matching ``[A-Za-z0-9._@+-]{1,256}`` are kept verbatim. Any other id is escaped
reversibly as ``~`` + URL-safe base64 of its UTF-8 bytes: ``~`` is outside the verbatim set, so an
escaped id can never equal a verbatim one, and the escape alphabet has no ``{``, ``}``, ``:``,
``*`` or whitespace, so no id can reach another user's key or hash slot.
"""

from __future__ import annotations

import base64
import datetime as _dt
import logging
import re
from typing import Protocol

from llmtally import identity
from llmtally._native import current_cycle
from llmtally.errors import ConfigError

__all__ = [
    "KEY_PREFIX",
    "MARKER_TTL_S",
    "current_cycle",
    "marker_key",
    "rate_key",
    "reservations_key",
    "usage_pattern",
    "encode_user_id",
    "decode_user_id",
    "parse_key",
    "usage_key",
    "charged_cycle",
    "validate_cycle",
    "validate_user_id",
]

KEY_PREFIX = "llmtally:"
_VERBATIM = re.compile(r"[A-Za-z0-9._@+-]{1,256}")
_KEY = re.compile(r"llmtally:\{([^{}]+)\}:(\d{4}-\d{2}-\d{2})")
MAX_USER_ID_BYTES = identity.MAX_USER_ID_BYTES


def validate_user_id(user_id: object, name: str = "user_id") -> str:
    """Check a user id given by the caller: a non-empty str (``ValueError`` otherwise)."""
    if not isinstance(user_id, str):
        raise ConfigError(f"{name} must be a non-empty str, not {type(user_id).__name__}")
    if not user_id or not user_id.strip():
        raise ConfigError(f"{name} must not be empty")
    if len(user_id.encode("utf-8", "surrogatepass")) > MAX_USER_ID_BYTES:
        raise ConfigError(f"{name} is longer than {MAX_USER_ID_BYTES} bytes")
    return user_id


def encode_user_id(user_id: str) -> str:
    """The id as it appears inside the key's hash tag.

    >>> encode_user_id("alice@example.com")
    'alice@example.com'
    >>> encode_user_id("a}b")
    '~YX1i'
    """
    if _VERBATIM.fullmatch(user_id):
        return user_id
    raw = user_id.encode("utf-8", "surrogatepass")
    return "~" + base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_user_id(encoded: str) -> str:
    """Inverse of :func:`encode_user_id`."""
    if not encoded.startswith("~"):
        return encoded
    body = encoded[1:]
    raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    return raw.decode("utf-8", "surrogatepass")


def validate_cycle(cycle_start_date: object, name: str = "cycle_start_date") -> str:
    """Check a cycle start: a valid ``YYYY-MM-DD`` date (any day; a cycle may start mid-month)."""
    if isinstance(cycle_start_date, _dt.date):
        return cycle_start_date.isoformat()[:10]
    if not isinstance(cycle_start_date, str) or not re.fullmatch(
        r"\d{4}-\d{2}-\d{2}", cycle_start_date
    ):
        raise ConfigError(f"{name} must be a 'YYYY-MM-DD' string, not {cycle_start_date!r}")
    try:
        _dt.date.fromisoformat(cycle_start_date)
    except ValueError:
        raise ConfigError(f"{name}={cycle_start_date!r} is not a valid date") from None
    return cycle_start_date


class _Counted(Protocol):
    bad_input: int


def charged_cycle(value: object, owner: _Counted) -> str:
    """The cycle a call is charged to, in the event path: its ``cycle_start_date`` when valid,
    the current month when none is given (``None`` or empty). A bad one is bad input: counted
    in ``owner.bad_input``, logged, and the call charged to the current month (nothing is lost).
    """
    if value is None or value == "":
        return current_cycle()
    try:
        return validate_cycle(value)
    except ConfigError as exc:
        owner.bad_input += 1
        logging.getLogger("llmtally").warning(
            "%s: %s; charged to the current cycle", type(owner).__name__, exc
        )
        return current_cycle()


def usage_key(user_id: str, cycle_start_date: str) -> str:
    """The store key of one user's usage in one cycle.

    >>> usage_key("alice", "2026-11-01")
    'llmtally:{alice}:2026-11-01'
    """
    return f"{KEY_PREFIX}{{{encode_user_id(user_id)}}}:{cycle_start_date}"


def parse_key(key: str) -> tuple[str, str] | None:
    """``(user_id, cycle_start_date)`` of a usage key, or ``None`` for other keys."""
    m = _KEY.fullmatch(key)
    if m is None:
        return None
    return decode_user_id(m.group(1)), m.group(2)


def usage_pattern(cycle_start_date: str | None = None, *, like: bool = False) -> str:
    """A pattern matching the usage keys of one cycle (or all): a glob for Redis and the memory
    store, a SQL ``LIKE`` pattern with ``like=True``. It matches other keys of the layout too
    (reservations, markers): filter the results with :func:`parse_key`."""
    wild = "%" if like else "*"
    return f"{KEY_PREFIX}{{{wild}}}:{cycle_start_date or wild}"


def scope_key(scope: str, value: str, cycle_start_date: str) -> str:
    """The store key of a budget kept per ``scope`` (a context kwarg such as ``team``) other than
    the user: never a user's usage key (``parse_key`` does not take it), one cluster slot.

    >>> scope_key("team", "acme", "2026-11-01")
    'llmtally:scope:{team=acme}:2026-11-01'
    """
    return (
        f"{KEY_PREFIX}scope:{{{encode_user_id(scope)}={encode_user_id(value)}}}:{cycle_start_date}"
    )


def reservations_key(key: str) -> str:
    """Where the open budget reservations of usage key ``key`` live (same cluster slot)."""
    return key + ":reservations"


def rate_key(user_id: str | None, window: str) -> str:
    """A sliding rate window of ``user_id`` (``None``: the one shared by every user)."""
    # "~" alone is no user's escaped id, and a window name is no cycle date.
    tag = "~" if user_id is None else encode_user_id(user_id)
    return f"{KEY_PREFIX}{{{tag}}}:{window}"


#: How long a flusher's markers outlive its last write (a retry or spool replay must come sooner).
MARKER_TTL_S = 7 * 86_400


def marker_key(flusher_id: str, slot_tag: str | None = None) -> str:
    """The hash recording which units of ``flusher_id``'s batches a backend applied (field: the
    unit, value: the last batch sequence applied). On a cluster there is one per slot
    (``slot_tag`` hashes to it), next to the keys its units write."""
    if slot_tag is None:
        return f"{KEY_PREFIX}flushed:{flusher_id}"
    return f"{KEY_PREFIX}{{{slot_tag}}}:flushed:{flusher_id}"
