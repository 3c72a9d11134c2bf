"""Budget reservations and sliding rate windows kept in this process (internal).

The reference semantics of the limit operations: the memory backend and the local
``RateLimiter`` use them as they are; the SQLite and Redis backends implement the same rules in
SQL and Lua.

Quota leases: each process (each limiter) holds at most one record ``(expires_ms, tokens, pusd)``
per usage key: the part of the user's budget it may spend without asking the store (its calls in
flight, its usage not yet flushed, and a slice for the calls to come). One operation,
:meth:`LocalLimits.lease`, drops expired records, replaces the caller's record and recomputes the
``reserved_tokens`` and ``reserved_pusd`` fields of the usage hash from the records that are
left, so a lease whose process died is gone after its TTL and the fields can never drift.

Rate windows: a log of ``(at_ms, weight)`` entries per window key; an entry counts while
``at_ms > now_ms - window_ms``.
"""

from __future__ import annotations

import time
from typing import NamedTuple

__all__ = [
    "LeaseState",
    "LocalLimits",
    "RateResult",
    "check_budget",
    "effective_limit",
    "lease_grant",
    "lease_grant_both",
    "now_ms",
]

#: ``limit`` value meaning "no limit on this unit".
NO_LIMIT = -1


class LeaseState(NamedTuple):
    """What a lease operation saw and did, in tokens and pico-USD: whether the wanted amount
    was granted, the stored usage, the records of the others (after dropping expired ones) and
    the caller's record after the operation."""

    ok: bool
    used_tokens: int
    used_pusd: int
    others_tokens: int
    others_pusd: int
    held_tokens: int
    held_pusd: int
    #: The token limit applied (``NO_LIMIT``: none): the one given, or the stored ``limit``
    #: field when asked for and lower (or the only one).
    limit_tokens: int = NO_LIMIT


class RateResult(NamedTuple):
    """A rate window decision: allowed, else the wait (ms) and which window refused."""

    ok: bool
    retry_after_ms: int
    refused: int


def now_ms() -> int:
    """Wall-clock milliseconds (shared by processes on one machine)."""
    return int(time.time() * 1000)


def check_budget(used: int, reserved: int, adjust: int, amount: int, limit: int) -> bool:
    """Whether ``amount`` more fits under ``limit`` (``NO_LIMIT``: always). A zero amount is
    refused once the budget is used up."""
    if limit < 0:
        return True
    committed = used + reserved + adjust
    if amount == 0:
        return committed < limit
    return committed + amount <= limit


def effective_limit(given: int, stored: int | None) -> int:
    """The token limit of a lease operation: ``given`` (``NO_LIMIT``: none) and the stored
    ``limit`` field (``None``: not used or not set), whichever is lower."""
    if stored is None:
        return given
    return stored if given < 0 else min(given, stored)


def lease_grant(
    used: int, others: int, base: int, want: int | None, slice_: int, limit: int
) -> tuple[bool, int]:
    """One unit of a lease: ``(fits, amount)``. ``base`` (what the caller holds already: its
    calls in flight and unflushed usage) is always kept; ``want`` (a call's estimate, ``None``
    for a plain renewal) only when it fits; then up to ``slice_`` more, as much as is left."""
    if want is None:
        return True, base
    if not check_budget(used, others, base, want, limit):
        return False, base
    need = base + want
    if limit < 0:
        return True, need + slice_
    return True, need + max(0, min(slice_, limit - used - others - need))


def lease_grant_both(
    used: tuple[int, int],
    others: tuple[int, int],
    base: tuple[int, int],
    want: tuple[int, int] | None,
    slice_: tuple[int, int],
    limits: tuple[int, int],
) -> tuple[bool, tuple[int, int]]:
    """:func:`lease_grant` for tokens and pusd together: ``(fits, held)``; when either unit
    does not fit, neither is granted and ``base`` is kept."""
    ok_t, held_t = lease_grant(
        used[0], others[0], base[0], None if want is None else want[0], slice_[0], limits[0]
    )
    ok_p, held_p = lease_grant(
        used[1], others[1], base[1], None if want is None else want[1], slice_[1], limits[1]
    )
    ok = ok_t and ok_p
    return ok, (held_t, held_p) if ok else base


def retry_after(
    entries: list[tuple[int, int]], weight: int, limit: int, window_ms: int, now: int
) -> int:
    """Milliseconds until ``weight`` more fits in a window holding ``entries`` (sorted by time):
    the moment enough of the oldest entries have left it. A weight above the limit never fits:
    one whole window."""
    if weight > limit:
        return window_ms
    total = sum(w for _, w in entries)
    for at, w in entries:
        total -= w
        if total + weight <= limit:
            return max(1, at + window_ms - now)
    return window_ms


class LocalLimits:
    """Reservations and rate windows in this process's memory."""

    def __init__(self) -> None:
        self.reservations: dict[str, dict[str, tuple[int, int, int]]] = {}
        self.windows: dict[str, dict[str, tuple[int, int]]] = {}

    # -- reservations ---------------------------------------------------------------------------

    def _open(self, key: str, now: int) -> tuple[dict[str, tuple[int, int, int]], int, int]:
        records = self.reservations.get(key)
        if records is None:
            return {}, 0, 0
        for rid in [rid for rid, rec in records.items() if rec[0] <= now]:
            del records[rid]
        if not records:
            del self.reservations[key]
        return records, sum(r[1] for r in records.values()), sum(r[2] for r in records.values())

    def lease(
        self,
        fields: dict[str, int],
        key: str,
        lease_id: str,
        *,
        base: tuple[int, int] = (0, 0),
        want: tuple[int, int] | None = None,
        slice_: tuple[int, int] = (0, 0),
        limits: tuple[int, int] = (NO_LIMIT, NO_LIMIT),
        ttl_ms: int = 0,
        now: int | None = None,
        stored_limit: bool = False,
    ) -> LeaseState:
        """One lease operation on ``key`` whose usage hash is ``fields`` (updated in place).

        Drops expired records and the caller's (``lease_id``; ``""`` reads only), then writes
        the caller's new record: ``base`` always, plus ``want`` and up to ``slice_`` when
        ``want`` fits under ``limits`` (``NO_LIMIT``: no limit; with ``stored_limit``, the
        hash's ``limit`` field caps the tokens too) next to ``total_tokens`` / ``cost_pusd``
        and the others' records. A record of zero is deleted."""
        now = now_ms() if now is None else now
        stored = fields.get("limit") if stored_limit else None
        limits = (effective_limit(limits[0], stored), limits[1])
        records, rt, rp = self._open(key, now)
        mine = records.pop(lease_id, None) if lease_id else None
        if mine is not None:
            rt -= mine[1]
            rp -= mine[2]
        used_t = fields.get("total_tokens", 0)
        used_p = fields.get("cost_pusd", 0)
        ok = True
        held = (0, 0)
        if lease_id:
            ok, held = lease_grant_both((used_t, used_p), (rt, rp), base, want, slice_, limits)
            if held[0] or held[1]:
                records[lease_id] = (now + ttl_ms, held[0], held[1])
        if records:
            self.reservations[key] = records
        else:
            self.reservations.pop(key, None)
        total_t, total_p = rt + held[0], rp + held[1]
        for field, value in (("reserved_tokens", total_t), ("reserved_pusd", total_p)):
            if value or field in fields:
                fields[field] = value
        return LeaseState(ok, used_t, used_p, rt, rp, held[0], held[1], limits[0])

    # -- rate windows ---------------------------------------------------------------------------

    def _entries(self, key: str, cutoff: int) -> dict[str, tuple[int, int]]:
        log = self.windows.get(key)
        if log is None:
            log = self.windows[key] = {}
        for member in [m for m, (at, _) in log.items() if at <= cutoff]:
            del log[member]
        return log

    def rate_acquire(
        self,
        keys: list[str],
        member: str,
        weights: list[int],
        limits: list[int],
        window_ms: int,
        now: int | None = None,
    ) -> RateResult:
        """Add ``member`` with ``weights[i]`` to each window ``keys[i]`` when every one has room
        under ``limits[i]``; else nothing is added and the longest wait is returned."""
        now = now_ms() if now is None else now
        logs = [self._entries(key, now - window_ms) for key in keys]
        wait, refused = 0, -1
        for i, log in enumerate(logs):
            total = sum(w for _, w in log.values())
            if total + weights[i] > limits[i]:
                ms = retry_after(sorted(log.values()), weights[i], limits[i], window_ms, now)
                if ms > wait:
                    wait, refused = ms, i
        if refused >= 0:
            return RateResult(False, wait, refused)
        for i, log in enumerate(logs):
            log[member] = (now, weights[i])
        return RateResult(True, 0, -1)

    def rate_update(self, key: str, member: str, old_weight: int, weight: int | None) -> None:
        """Set the weight of ``member`` (now ``old_weight``) in window ``key`` (``None``: remove
        it)."""
        log = self.windows.get(key)
        if log is None or member not in log:
            return
        if weight is None:
            del log[member]
        else:
            log[member] = (log[member][0], weight)
