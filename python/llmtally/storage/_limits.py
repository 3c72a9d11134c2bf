"""Budget reservations and sliding rate windows kept in this process (internal).

The reference semantics of the limit operations: the memory backend and the local
``RateLimiter`` use them as they are; the SQLite and Redis backends implement the same rules in
SQL and Lua.

Reservations: each open reservation is a record ``(expires_ms, tokens, pusd)`` of one usage key.
Every operation first drops expired records and recomputes the ``reserved_tokens`` and
``reserved_pusd`` fields of the usage hash from the records that are left, so a reservation whose
process died is gone after its TTL and the fields can never drift.

Rate windows: a log of ``(at_ms, weight)`` entries per window key; an entry counts while
``at_ms > now_ms - window_ms``.
"""

from __future__ import annotations

import time
from typing import NamedTuple

__all__ = ["BudgetState", "LocalLimits", "RateResult", "check_budget", "now_ms"]

#: ``limit`` value meaning "no limit on this unit".
NO_LIMIT = -1


class BudgetState(NamedTuple):
    """What a budget operation saw: whether it was allowed, the stored usage and the open
    reservations (after dropping expired ones), in tokens and pico-USD."""

    ok: bool
    used_tokens: int
    reserved_tokens: int
    used_pusd: int
    reserved_pusd: int


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

    def budget(
        self,
        fields: dict[str, int],
        key: str,
        *,
        reserve: tuple[str, int, int, int] | None = None,
        settle: tuple[str, int, int, int] | None = None,
        release: list[str] | None = None,
        limits: tuple[int, int] = (NO_LIMIT, NO_LIMIT),
        adjust: tuple[int, int] = (0, 0),
        now: int | None = None,
    ) -> BudgetState:
        """One budget operation on ``key`` whose usage hash is ``fields`` (updated in place).

        ``reserve``/``settle`` are ``(id, tokens, pusd, ttl_ms)``: a reservation is added only when
        it fits under ``limits`` (with ``adjust`` added to the used amounts); a settle replaces the
        record of ``id`` unconditionally. ``release`` drops records by id.
        """
        now = now_ms() if now is None else now
        records, rt, rp = self._open(key, now)
        for rid in release or ():
            rec = records.pop(rid, None)
            if rec is not None:
                rt -= rec[1]
                rp -= rec[2]
        if settle is not None:
            rid, tokens, pusd, ttl = settle
            old = records.pop(rid, None)
            if old is not None:
                rt -= old[1]
                rp -= old[2]
            records[rid] = (now + ttl, tokens, pusd)
            rt += tokens
            rp += pusd
        used_t = fields.get("total_tokens", 0)
        used_p = fields.get("cost_pusd", 0)
        ok = True
        if reserve is not None:
            rid, tokens, pusd, ttl = reserve
            ok = check_budget(used_t, rt, adjust[0], tokens, limits[0]) and check_budget(
                used_p, rp, adjust[1], pusd, limits[1]
            )
            if ok:
                records[rid] = (now + ttl, tokens, pusd)
                rt += tokens
                rp += pusd
        if records:
            self.reservations[key] = records
        else:
            self.reservations.pop(key, None)
        for field, value in (("reserved_tokens", rt), ("reserved_pusd", rp)):
            if value or field in fields:
                fields[field] = value
        return BudgetState(ok, used_t, rt, used_p, rp)

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
