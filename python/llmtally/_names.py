"""Bounded tables of names: how in-process trackers and metrics keep per-provider, per-model and
per-user state without letting client input decide how much memory they take.

Keys are tuples of names (never strings joined by a separator, so no name can forge another's
key). A :class:`KeyTable` keeps at most ``max_keys`` keys apart and at most ``max_bytes`` of them
(the names' own size plus a fixed cost per entry); a key past either cap is counted under its
overflow key (``"<other>"`` in place of the names that made it new), and in ``overflowed``.
Provider and model names longer than :data:`MAX_NAME_CHARS` are ``"<other>"`` too; user ids are
bounded by the identity rule (:mod:`llmtally.identity`).
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable
from typing import Any, Final

from llmtally.errors import ConfigError

__all__ = [
    "MAX_ID_CHARS",
    "MAX_NAME_CHARS",
    "OTHER",
    "KeyTable",
    "check_cap",
    "name",
    "request_key",
]

OTHER: Final = "<other>"
MAX_NAME_CHARS: Final = 256
"""The longest provider or model name kept as its own entry (longer ones are ``"<other>"``)."""
ENTRY_BYTES: Final = 256
"""What one entry costs besides its names (the tuple, the dict slot, the counters), in bytes."""
MAX_OVERFLOW_KEYS: Final = 64
"""Overflow keys kept apart (one per provider); past it, every part is ``"<other>"``."""


def name(value: Any, default: str = "unknown") -> str:
    """A provider or model name as a tracker keeps it: the text (``default`` when empty or
    ``None``), ``"<other>"`` when longer than ``MAX_NAME_CHARS`` or when it has no text."""
    if type(value) is str:
        if 0 < len(value) <= MAX_NAME_CHARS:
            return value
        return OTHER if value else default
    if value is None:
        return default
    try:
        text = str.__str__(value) if isinstance(value, str) else str(value)
    except Exception:
        return OTHER
    if type(text) is not str:
        return OTHER
    return name(text, default)


MAX_ID_CHARS: Final = 256
"""The longest request id kept as given; a longer one is kept as a digest of its text."""


def request_key(value: Any) -> str | None:
    """A request id as in-process windows keep it: its text (``str(value)``), or
    ``"sha256:<hex>"`` of a text longer than ``MAX_ID_CHARS`` or with no UTF-8 form (a lone
    surrogate, as ids decoded with ``surrogateescape`` carry); the same id gives the same key,
    so duplicates are still found. ``None`` when it has no text (its ``str()`` fails)."""
    if type(value) is not str:
        try:
            value = str.__str__(value) if isinstance(value, str) else str(value)
        except Exception:
            return None
        if type(value) is not str:
            return None
    if len(value) <= MAX_ID_CHARS and (value.isascii() or _has_utf8(value)):
        return value
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()
    return f"sha256:{digest}"


def _has_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_cap(what: str, value: Any) -> int:
    """A cap given to a constructor: an int >= 1 (``ConfigError`` otherwise)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what} must be an int >= 1, not {value!r}")
    return int(value)


def _size(key: tuple[str, ...]) -> int:
    return ENTRY_BYTES + sum(sys.getsizeof(part) for part in key)


class KeyTable:
    """Tuple keys -> short slot names (the ledger's keys), bounded in entries and in bytes.

    ``slots`` is read directly on the hot path (the core looks keys up in it); a key that is not
    in it goes through :meth:`admit`, which decides, in one place, whether it gets its own slot.
    """

    __slots__ = (
        "bytes",
        "max_bytes",
        "max_keys",
        "max_others",
        "others",
        "overflow",
        "overflowed",
        "slots",
    )

    def __init__(
        self,
        max_keys: int,
        max_bytes: int,
        overflow: Callable[[tuple[str, ...]], tuple[str, ...]],
        *,
        max_others: int = MAX_OVERFLOW_KEYS,
    ) -> None:
        self.max_keys = max_keys
        self.max_others = max_others
        self.max_bytes = max_bytes
        self.overflow = overflow
        self.slots: dict[tuple[str, ...], str] = {}
        self.bytes = 0
        self.others = 0  # overflow keys made
        #: Keys counted under an overflow key (once per occurrence, not per distinct key).
        self.overflowed = 0

    def __len__(self) -> int:
        return len(self.slots)

    def _new(self, key: tuple[str, ...], size: int) -> str:
        slot = self.slots[key] = f"{len(self.slots):x}"
        self.bytes += size
        return slot

    def admit(self, key: tuple[str, ...]) -> str:
        """The slot of ``key``: its own when there is room, else its overflow key's."""
        found = self.slots.get(key)
        if found is not None:
            return found
        size = _size(key)
        if len(self.slots) < self.max_keys and self.bytes + size <= self.max_bytes:
            return self._new(key, size)
        self.overflowed += 1
        other = self.overflow(key)
        found = self.slots.get(other)
        if found is not None:
            return found
        if self.others >= self.max_others:
            other = (OTHER,) * len(key)
            found = self.slots.get(other)
            if found is not None:
                return found
        self.others += 1
        return self._new(other, _size(other))

    def slot(self, *parts: str) -> str:
        found = self.slots.get(parts)
        return found if found is not None else self.admit(parts)

    def clear(self) -> None:
        self.slots.clear()
        self.bytes = 0
        self.others = 0
