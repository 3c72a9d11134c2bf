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
