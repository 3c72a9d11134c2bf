"""``memory://``: usage hashes in this process only (tests, demos, single-process tools)."""

from __future__ import annotations

import fnmatch

from llmtally._core import LEDGER_FIELDS as _FIELDS
from llmtally._core import Batch
from llmtally.storage._limits import NO_LIMIT, BudgetState, LocalLimits, RateResult

__all__ = ["MemoryBackend"]

_I64_MAX = 2**63 - 1


class MemoryBackend:
    """Dict-backed store with the same batch semantics as Redis (idempotent by batch seq)."""

    name = "memory"

    def __init__(self) -> None:
        self.data: dict[str, dict[str, int]] = {}
        self.applied: dict[str, int] = {}
        self.limits = LocalLimits()

    async def apply(self, batch: Batch, flusher_id: str, seq: int) -> list[str]:
        if self.applied.get(flusher_id, -1) >= seq:
            return []
        refused = []
        for key, counters in batch.items():
            current = self.data.setdefault(key, {})
            updated = dict(current)
            for field, delta in zip(_FIELDS, counters, strict=True):
                if delta:
                    value = updated.get(field, 0) + delta
                    if not -_I64_MAX <= value <= _I64_MAX:
                        refused.append(key)
                        break
                    updated[field] = value
            else:
                self.data[key] = updated
        self.applied[flusher_id] = seq
        return refused

    async def read(self, key: str) -> dict[str, int]:
        return dict(self.data.get(key, {}))

    async def set_fields(self, key: str, fields: dict[str, int | None]) -> None:
        current = self.data.setdefault(key, {})
        for field, value in fields.items():
            if value is None:
                current.pop(field, None)
            else:
                current[field] = value

    async def delete(self, key: str) -> None:
        self.data.pop(key, None)

    async def keys(self, cycle_start_date: str | None = None) -> list[str]:
        pattern = f"llmtally:{{*}}:{cycle_start_date or '*'}"
        return sorted(k for k in self.data if fnmatch.fnmatchcase(k, pattern))

    async def ping(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    # -- limits (see storage/_limits.py for the semantics) ---------------------------------

    async def budget(
        self,
        key: str,
        *,
        reserve: tuple[str, int, int, int] | None = None,
        settle: tuple[str, int, int, int] | None = None,
        release: list[str] | None = None,
        limits: tuple[int, int] = (NO_LIMIT, NO_LIMIT),
        adjust: tuple[int, int] = (0, 0),
        now_ms: int | None = None,
    ) -> BudgetState:
        fields = self.data.get(key, {})
        state = self.limits.budget(
            fields,
            key,
            reserve=reserve,
            settle=settle,
            release=release,
            limits=limits,
            adjust=adjust,
            now=now_ms,
        )
        if fields:
            self.data[key] = fields
        return state

    async def claim_flag(self, key: str, field: str) -> bool:
        fields = self.data.setdefault(key, {})
        if fields.get(field):
            return False
        fields[field] = 1
        return True

    async def rate_acquire(
        self,
        keys: list[str],
        member: str,
        weights: list[int],
        limits: list[int],
        window_ms: int,
        now_ms: int | None = None,
    ) -> RateResult:
        return self.limits.rate_acquire(keys, member, weights, limits, window_ms, now_ms)

    async def rate_update(self, key: str, member: str, old_weight: int, weight: int | None) -> None:
        self.limits.rate_update(key, member, old_weight, weight)
