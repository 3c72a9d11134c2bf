"""``memory://``: usage hashes in this process only (tests, demos, single-process tools)."""

from __future__ import annotations

import fnmatch
import threading

from llmtally._native import LEDGER_FIELDS as _FIELDS
from llmtally._native import Batch
from llmtally.storage._limits import NO_LIMIT, LeaseState, LocalLimits, RateResult
from llmtally.storage.keys import usage_pattern

__all__ = ["MemoryBackend"]

_I64_MAX = 2**63 - 1


class MemoryBackend:
    """Dict-backed store, one batch a unit (idempotent by its flusher and sequence)."""

    name = "memory"
    blocking = False

    def __init__(self) -> None:
        self.data: dict[str, dict[str, int]] = {}
        self.applied_seq: dict[str, int] = {}
        self.limits = LocalLimits()
        # The flusher thread applies batches while callers read and reserve.
        self._lock = threading.RLock()

    def apply(self, batch: Batch, flusher_id: str) -> list[str]:
        with self._lock:
            if self.applied_seq.get(flusher_id, 0) >= batch.seq:
                return []
            refused = []
            for key, counters in batch.items():
                current = self.data.get(key, {})
                updated = dict(current)
                for field, delta in zip(_FIELDS, counters, strict=True):
                    if delta:
                        value = updated.get(field, 0) + delta
                        if not -_I64_MAX - 1 <= value <= _I64_MAX:
                            refused.append(key)
                            break
                        updated[field] = value
                else:
                    self.data[key] = updated
            self.applied_seq[flusher_id] = batch.seq
            return refused

    def applied(self, key: str, batch: Batch, flusher_id: str) -> tuple[dict[str, int], bool]:
        with self._lock:
            done = self.applied_seq.get(flusher_id, 0) >= batch.seq
            return dict(self.data.get(key, {})), done

    def read(self, key: str) -> dict[str, int]:
        with self._lock:
            return dict(self.data.get(key, {}))

    def set_fields(self, key: str, fields: dict[str, int | None]) -> None:
        with self._lock:
            current = self.data.setdefault(key, {})
            for field, value in fields.items():
                if value is None:
                    current.pop(field, None)
                else:
                    current[field] = value

    def delete(self, key: str) -> None:
        with self._lock:
            self.data.pop(key, None)

    def keys(self, cycle_start_date: str | None = None) -> list[str]:
        pattern = usage_pattern(cycle_start_date)
        with self._lock:
            return sorted(k for k in self.data if fnmatch.fnmatchcase(k, pattern))

    def ping(self) -> None:
        return None

    def close(self) -> None:
        return None

    def after_fork(self) -> None:
        self._lock = threading.RLock()

    # -- limits (see storage/_limits.py for the semantics) ---------------------------------

    def lease(
        self,
        key: str,
        lease_id: str,
        *,
        base: tuple[int, int] = (0, 0),
        want: tuple[int, int] | None = None,
        slice_: tuple[int, int] = (0, 0),
        limits: tuple[int, int] = (NO_LIMIT, NO_LIMIT),
        ttl_ms: int = 0,
        now_ms: int | None = None,
        stored_limit: bool = False,
    ) -> LeaseState:
        with self._lock:
            fields = self.data.get(key, {})
            state = self.limits.lease(
                fields,
                key,
                lease_id,
                base=base,
                want=want,
                slice_=slice_,
                limits=limits,
                ttl_ms=ttl_ms,
                now=now_ms,
                stored_limit=stored_limit,
            )
            if fields:
                self.data[key] = fields
            return state

    def claim_flag(self, key: str, field: str) -> bool:
        with self._lock:
            fields = self.data.setdefault(key, {})
            if fields.get(field):
                return False
            fields[field] = 1
            return True

    def rate_acquire(
        self,
        keys: list[str],
        member: str,
        weights: list[int],
        limits: list[int],
        window_ms: int,
        now_ms: int | None = None,
    ) -> RateResult:
        with self._lock:
            return self.limits.rate_acquire(keys, member, weights, limits, window_ms, now_ms)

    def rate_update(self, key: str, member: str, old_weight: int, weight: int | None) -> None:
        with self._lock:
            self.limits.rate_update(key, member, old_weight, weight)
