"""What every storage backend provides to the store (internal).

Backends are synchronous and thread-safe: the store's flusher thread writes batches, and
the store runs every other operation on its own I/O threads (or, for the memory backend, in the
caller's thread), so no backend depends on the caller's event loop.
"""

from __future__ import annotations

from typing import Protocol

from llmtally._native import Batch
from llmtally.storage._limits import LeaseState, RateResult

__all__ = ["Backend", "LimitsBackend", "SET_FIELDS"]

#: Fields written with a plain set (configuration), never incremented by the flusher.
SET_FIELDS = ("limit",)


class Backend(Protocol):
    """A place where usage hashes live. All methods may raise ``StoreError``."""

    name: str
    #: Whether operations block on I/O (run on the store's I/O threads) or return at once.
    blocking: bool

    def apply(self, batch: Batch, flusher_id: str) -> list[str]:
        """Apply ``batch`` (numbered ``batch.seq`` by ``flusher_id``'s ledger) exactly once per
        unit that can fail alone: a unit already applied is skipped, so a batch retried after a
        failure or a lost reply is written once. A key whose delta would take a stored field
        past the signed 64-bit range (or whose stored field is not an integer) is refused
        before any write of its unit; the other keys are written. Returns the refused keys.

        Raises ``StoreError`` when a unit failed (the units that succeeded stay applied) or the
        reply was not the one expected."""
        ...

    def applied(self, key: str, batch: Batch, flusher_id: str) -> tuple[dict[str, int], bool]:
        """The fields of ``key`` and whether the unit of ``batch`` holding ``key`` is applied,
        read in one atomic step (so a read never counts an in-flight batch twice or not at
        all)."""
        ...

    def read(self, key: str) -> dict[str, int]:
        """All integer fields of ``key`` (empty when absent)."""
        ...

    def set_fields(self, key: str, fields: dict[str, int | None]) -> None:
        """Set (or, for ``None``, delete) plain fields of ``key``."""
        ...

    def delete(self, key: str) -> None:
        """Remove ``key`` entirely."""
        ...

    def keys(self, cycle_start_date: str | None = None) -> list[str]:
        """Keys matching the usage pattern of one cycle or all (callers filter with
        ``parse_key``)."""
        ...

    def ping(self) -> None:
        """Raise when the backend cannot be reached or cannot be written."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...

    def after_fork(self) -> None:
        """In a forked child: forget the parent's connections without closing them."""
        ...


class LimitsBackend(Backend, Protocol):
    """A backend that also keeps quota leases and rate windows (all three built-in ones).

    Each method is one atomic step across processes sharing the backend; the reference
    semantics are in ``storage/_limits.py``. ``now_ms`` is the caller's clock (tests); ``None``
    means the backend's own (Redis: the server's ``TIME``).
    """

    def lease(
        self,
        key: str,
        lease_id: str,
        *,
        base: tuple[int, int] = (0, 0),
        want: tuple[int, int] | None = None,
        slice_: tuple[int, int] = (0, 0),
        limits: tuple[int, int] = (-1, -1),
        ttl_ms: int = 0,
        now_ms: int | None = None,
        stored_limit: bool = False,
    ) -> LeaseState:
        """Drop expired records of ``key`` and the caller's (``lease_id``; ``""``: read only),
        then write the caller's record: ``base`` always, plus ``want`` and up to ``slice_``
        when ``want`` fits under ``limits`` (-1: no limit) next to ``total_tokens`` /
        ``cost_pusd`` and the others' records (see ``_limits.lease_grant``); write
        ``reserved_tokens`` / ``reserved_pusd``; return what it saw and did."""
        ...

    def claim_flag(self, key: str, field: str) -> bool:
        """Set ``field`` of ``key`` to 1 unless set; True for the one caller that set it."""
        ...

    def rate_acquire(
        self,
        keys: list[str],
        member: str,
        weights: list[int],
        limits: list[int],
        window_ms: int,
        now_ms: int | None = None,
    ) -> RateResult:
        """Add ``member`` (weight ``weights[i]``) to every sliding window ``keys[i]`` when each
        stays within ``limits[i]``; else add nothing and say how long to wait."""
        ...

    def rate_update(self, key: str, member: str, old_weight: int, weight: int | None) -> None:
        """Change the weight of ``member`` (now ``old_weight``) in window ``key`` (``None``
        removes it)."""
        ...
