"""``sqlite:///path``: the embedded default store (WAL mode, safe from several processes).

One row per (key, field); a batch is applied in one transaction together with the flusher's
sequence number, so a retried batch is applied once.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, TypeVar

from llmtally._core import LEDGER_FIELDS, Batch
from llmtally.errors import StoreError, StoreUnavailable
from llmtally.storage._limits import (
    NO_LIMIT,
    BudgetState,
    RateResult,
    check_budget,
    retry_after,
)
from llmtally.storage._limits import (
    now_ms as _now_ms,
)

__all__ = ["SQLiteBackend"]

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    key TEXT NOT NULL,
    field TEXT NOT NULL,
    value INTEGER NOT NULL,
    PRIMARY KEY (key, field)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS flushers (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS reservations (
    key TEXT NOT NULL,
    id TEXT NOT NULL,
    expires_ms INTEGER NOT NULL,
    tokens INTEGER NOT NULL,
    pusd INTEGER NOT NULL,
    PRIMARY KEY (key, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rate_log (
    key TEXT NOT NULL,
    member TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    weight INTEGER NOT NULL,
    PRIMARY KEY (key, member)
) WITHOUT ROWID;
"""
_I64_MAX = 2**63 - 1
_FLUSHER_TTL_S = 7 * 86_400


class SQLiteBackend:
    """Usage hashes in a SQLite file; blocking calls run in a worker thread."""

    name = "sqlite"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            try:
                if str(self.path) != ":memory:":
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(
                    str(self.path), timeout=30.0, isolation_level=None, check_same_thread=False
                )
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.executescript(_SCHEMA)
            except (sqlite3.Error, OSError) as exc:
                raise StoreUnavailable(f"cannot open SQLite store {self.path}: {exc}") from exc
            self._conn = conn
        return self._conn

    async def _run(self, fn: Any, *args: Any) -> Any:
        def call() -> Any:
            with self._lock:
                conn = self._connect()
                try:
                    return fn(conn, *args)
                except sqlite3.OperationalError as exc:
                    raise StoreUnavailable(f"SQLite store {self.path}: {exc}") from exc
                except sqlite3.Error as exc:
                    raise StoreError(f"SQLite store {self.path}: {exc}") from exc

        return await asyncio.to_thread(call)

    async def apply(self, batch: Batch, flusher_id: str, seq: int) -> list[str]:
        items = batch.items()
        return list(await self._run(_apply, items, flusher_id, seq))

    async def read(self, key: str) -> dict[str, int]:
        rows = await self._run(
            lambda c, k: c.execute("SELECT field, value FROM usage WHERE key = ?", (k,)).fetchall(),
            key,
        )
        return {field: int(value) for field, value in rows}

    async def set_fields(self, key: str, fields: dict[str, int | None]) -> None:
        def write(conn: sqlite3.Connection) -> None:
            conn.execute("BEGIN IMMEDIATE")
            try:
                for field, value in fields.items():
                    if value is None:
                        conn.execute("DELETE FROM usage WHERE key = ? AND field = ?", (key, field))
                    else:
                        conn.execute(
                            "INSERT INTO usage (key, field, value) VALUES (?, ?, ?) "
                            "ON CONFLICT (key, field) DO UPDATE SET value = excluded.value",
                            (key, field, value),
                        )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

        await self._run(write)

    async def delete(self, key: str) -> None:
        await self._run(lambda c: c.execute("DELETE FROM usage WHERE key = ?", (key,)))

    async def keys(self, cycle_start_date: str | None = None) -> list[str]:
        pattern = f"llmtally:{{%}}:{cycle_start_date or '%'}"
        rows = await self._run(
            lambda c: c.execute(
                "SELECT DISTINCT key FROM usage WHERE key LIKE ? ORDER BY key", (pattern,)
            ).fetchall()
        )
        return [row[0] for row in rows]

    async def ping(self) -> None:
        await self._run(lambda c: c.execute("SELECT 1").fetchone())

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
        now = _now_ms() if now_ms is None else now_ms
        state: BudgetState = await self._run(
            _budget, key, reserve, settle, release or [], limits, adjust, now
        )
        return state

    async def claim_flag(self, key: str, field: str) -> bool:
        def claim(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "INSERT INTO usage (key, field, value) VALUES (?, ?, 1) "
                "ON CONFLICT (key, field) DO UPDATE SET value = 1 WHERE value = 0",
                (key, field),
            )
            return cur.rowcount == 1

        return bool(await self._run(claim))

    async def rate_acquire(
        self,
        keys: list[str],
        member: str,
        weights: list[int],
        limits: list[int],
        window_ms: int,
        now_ms: int | None = None,
    ) -> RateResult:
        now = _now_ms() if now_ms is None else now_ms
        result: RateResult = await self._run(
            _rate_acquire, keys, member, weights, limits, window_ms, now
        )
        return result

    async def rate_update(self, key: str, member: str, old_weight: int, weight: int | None) -> None:
        def update(conn: sqlite3.Connection) -> None:
            if weight is None:
                conn.execute("DELETE FROM rate_log WHERE key = ? AND member = ?", (key, member))
            else:
                conn.execute(
                    "UPDATE rate_log SET weight = ? WHERE key = ? AND member = ?",
                    (weight, key, member),
                )

        await self._run(update)

    async def aclose(self) -> None:
        def close() -> None:
            with self._lock:
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None

        await asyncio.to_thread(close)


def _apply(
    conn: sqlite3.Connection,
    items: list[tuple[str, tuple[int, ...]]],
    flusher_id: str,
    seq: int,
) -> list[str]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        row = conn.execute("SELECT seq FROM flushers WHERE id = ?", (flusher_id,)).fetchone()
        if row is not None and row[0] >= seq:
            conn.execute("ROLLBACK")
            return []
        refused: list[str] = []
        rows: list[tuple[str, str, int]] = []
        for key, counters in items:
            deltas = [(f, v) for f, v in zip(LEDGER_FIELDS, counters, strict=True) if v]
            cost = dict(deltas).get("cost_pusd")
            if cost:
                current = conn.execute(
                    "SELECT value FROM usage WHERE key = ? AND field = 'cost_pusd'", (key,)
                ).fetchone()
                if current is not None and abs(current[0] + cost) > _I64_MAX:
                    refused.append(key)
                    continue
            rows.extend((key, f, v) for f, v in deltas)
        conn.executemany(
            "INSERT INTO usage (key, field, value) VALUES (?, ?, ?) "
            "ON CONFLICT (key, field) DO UPDATE SET value = value + excluded.value",
            rows,
        )
        now = time.time()
        conn.execute(
            "INSERT INTO flushers (id, seq, updated) VALUES (?, ?, ?) "
            "ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, updated = excluded.updated",
            (flusher_id, seq, now),
        )
        conn.execute("DELETE FROM flushers WHERE updated < ?", (now - _FLUSHER_TTL_S,))
        conn.execute("COMMIT")
        return refused
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _budget(
    conn: sqlite3.Connection,
    key: str,
    reserve: tuple[str, int, int, int] | None,
    settle: tuple[str, int, int, int] | None,
    release: list[str],
    limits: tuple[int, int],
    adjust: tuple[int, int],
    now: int,
) -> BudgetState:
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("DELETE FROM reservations WHERE key = ? AND expires_ms <= ?", (key, now))
        conn.executemany(
            "DELETE FROM reservations WHERE key = ? AND id = ?", [(key, rid) for rid in release]
        )
        put = (
            "INSERT INTO reservations (key, id, expires_ms, tokens, pusd) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (key, id) DO UPDATE SET expires_ms = excluded.expires_ms, "
            "tokens = excluded.tokens, pusd = excluded.pusd"
        )
        if settle is not None:
            rid, tokens, pusd, ttl = settle
            conn.execute(put, (key, rid, now + ttl, tokens, pusd))
        rt, rp = conn.execute(
            "SELECT COALESCE(SUM(tokens), 0), COALESCE(SUM(pusd), 0) FROM reservations "
            "WHERE key = ?",
            (key,),
        ).fetchone()
        fields = dict(
            conn.execute(
                "SELECT field, value FROM usage WHERE key = ? AND field IN "
                "('total_tokens', 'cost_pusd', 'reserved_tokens', 'reserved_pusd')",
                (key,),
            ).fetchall()
        )
        used_t = int(fields.get("total_tokens", 0))
        used_p = int(fields.get("cost_pusd", 0))
        ok = True
        if reserve is not None:
            rid, tokens, pusd, ttl = reserve
            ok = check_budget(used_t, rt, adjust[0], tokens, limits[0]) and check_budget(
                used_p, rp, adjust[1], pusd, limits[1]
            )
            if ok:
                conn.execute(put, (key, rid, now + ttl, tokens, pusd))
                rt += tokens
                rp += pusd
        for field, value in (("reserved_tokens", rt), ("reserved_pusd", rp)):
            if value or field in fields:
                conn.execute(
                    "INSERT INTO usage (key, field, value) VALUES (?, ?, ?) "
                    "ON CONFLICT (key, field) DO UPDATE SET value = excluded.value",
                    (key, field, value),
                )
        conn.execute("COMMIT")
        return BudgetState(ok, used_t, int(rt), used_p, int(rp))
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _rate_acquire(
    conn: sqlite3.Connection,
    keys: list[str],
    member: str,
    weights: list[int],
    limits: list[int],
    window_ms: int,
    now: int,
) -> RateResult:
    conn.execute("BEGIN IMMEDIATE")
    try:
        wait, refused = 0, -1
        for i, key in enumerate(keys):
            conn.execute(
                "DELETE FROM rate_log WHERE key = ? AND at_ms <= ?", (key, now - window_ms)
            )
            entries = conn.execute(
                "SELECT at_ms, weight FROM rate_log WHERE key = ? ORDER BY at_ms", (key,)
            ).fetchall()
            total = sum(w for _, w in entries)
            if total + weights[i] > limits[i]:
                ms = retry_after(
                    [(int(a), int(w)) for a, w in entries], weights[i], limits[i], window_ms, now
                )
                if ms > wait:
                    wait, refused = ms, i
        if refused >= 0:
            conn.execute("COMMIT")
            return RateResult(False, wait, refused)
        conn.executemany(
            "INSERT INTO rate_log (key, member, at_ms, weight) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (key, member) DO UPDATE SET at_ms = excluded.at_ms, "
            "weight = excluded.weight",
            [(key, member, now, weights[i]) for i, key in enumerate(keys)],
        )
        conn.execute("COMMIT")
        return RateResult(True, 0, -1)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
