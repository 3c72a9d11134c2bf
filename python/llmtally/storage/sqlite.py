"""``sqlite:///path``: the embedded default store (WAL mode, safe from several processes).

One row per (key, field). A batch is one unit: applied in one transaction together with its
flusher's sequence number, so a retried batch is applied once. The batch crosses into SQLite as
one JSON document and is written by a few statements (not one per row), so the flusher thread
needs the GIL a handful of times per batch, however busy the process is. Each thread has its
own connection; the file is checked before every write, so a file deleted or replaced under the
store is noticed and reported, not written into a void.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

from llmtally._native import Batch
from llmtally.errors import StoreError, StoreUnavailable
from llmtally.storage._limits import (
    NO_LIMIT,
    LeaseState,
    RateResult,
    effective_limit,
    lease_grant_both,
    retry_after,
)
from llmtally.storage._limits import (
    now_ms as _now_ms,
)
from llmtally.storage.keys import MARKER_TTL_S, usage_pattern

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

# A batch is applied by one INSERT into `batches`, whose trigger does the rest in the same
# implicit transaction: skip a batch this flusher applied before, refuse the keys a delta cannot
# be added to (the stored value is not an integer, or the sum would leave the signed 64-bit
# range, computed without overflowing: a positive delta against MAX - delta, a negative one
# against MIN - delta), add the rest, record the sequence. One statement, so the flusher thread
# needs the GIL back twice per batch (this and reading the refused keys), however busy the
# process is. `rows` is the batch as JSON `[[key, field, delta], ...]`.
_APPLY_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    flusher TEXT NOT NULL,
    seq INTEGER NOT NULL,
    rows TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS refused (
    flusher TEXT NOT NULL,
    seq INTEGER NOT NULL,
    key TEXT NOT NULL,
    reported INTEGER NOT NULL DEFAULT 0
);
CREATE TRIGGER IF NOT EXISTS apply_batch AFTER INSERT ON batches
BEGIN
    DELETE FROM refused WHERE flusher = NEW.flusher AND seq < NEW.seq;
    INSERT INTO refused (flusher, seq, key)
    SELECT DISTINCT NEW.flusher, NEW.seq, json_extract(r.value, '$[0]')
    FROM json_each(NEW.rows) AS r
    JOIN usage AS u
      ON u.key = json_extract(r.value, '$[0]') AND u.field = json_extract(r.value, '$[1]')
    WHERE NOT EXISTS (SELECT 1 FROM flushers WHERE id = NEW.flusher AND seq >= NEW.seq)
      AND (typeof(u.value) != 'integer'
       OR (json_extract(r.value, '$[2]') > 0
           AND u.value > 9223372036854775807 - json_extract(r.value, '$[2]'))
       OR (json_extract(r.value, '$[2]') < 0
           AND u.value < (-9223372036854775807 - 1) - json_extract(r.value, '$[2]')));
    INSERT INTO usage (key, field, value)
    SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]')
    FROM json_each(NEW.rows)
    WHERE NOT EXISTS (SELECT 1 FROM flushers WHERE id = NEW.flusher AND seq >= NEW.seq)
      AND json_extract(value, '$[0]') NOT IN
          (SELECT key FROM refused WHERE flusher = NEW.flusher AND seq = NEW.seq)
    ON CONFLICT (key, field) DO UPDATE SET value = value + excluded.value;
    INSERT INTO flushers (id, seq, updated) VALUES (NEW.flusher, NEW.seq, NEW.at)
    ON CONFLICT (id) DO UPDATE SET seq = max(seq, excluded.seq), updated = excluded.updated;
    DELETE FROM batches WHERE rowid = NEW.rowid;
END;
"""

_CLEAN_EVERY_S = 3600.0
_BUSY_TIMEOUT_S = 5.0


class _ForkGate:
    """No thread of this process is inside SQLite while it forks: SQLite's own mutexes (its
    allocator's, its file-lock tables) are process-wide, and a child forked while another thread
    held one would hang on it forever. Every call into SQLite holds the gate shared; a fork
    waits for them to leave (a busy timeout at most) and holds new ones back until it is done."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active = 0
        self._forking = 0

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._forking:
                self._cond.wait()
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                if not self._active:
                    self._cond.notify_all()

    def block(self) -> None:
        with self._cond:
            self._forking += 1
            self._cond.wait_for(lambda: not self._active, timeout=2 * _BUSY_TIMEOUT_S)

    def unblock(self) -> None:
        with self._cond:
            self._forking -= 1
            self._cond.notify_all()


_gate = _ForkGate()


def _before_fork() -> None:
    _gate.block()


def _after_fork_in_parent() -> None:
    _gate.unblock()


def _after_fork_in_child() -> None:
    global _gate
    _gate = _ForkGate()


_gate_hooked = False
_gate_lock = threading.Lock()


def _hook_forks() -> None:
    """Register the gate's fork hooks, once, with the first SQLite backend (not at import)."""
    global _gate_hooked
    with _gate_lock:
        if _gate_hooked:
            return
        _gate_hooked = True
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(
                before=_before_fork,
                after_in_parent=_after_fork_in_parent,
                after_in_child=_after_fork_in_child,
            )


def _rollback(conn: sqlite3.Connection) -> None:
    """Roll back whatever is open; SQLite may have rolled back already (disk full, I/O error),
    and that must not hide the error that caused it."""
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


class SQLiteBackend:
    """Usage hashes in a SQLite file (blocking; the store calls it from its own threads)."""

    name = "sqlite"
    blocking = True

    def __init__(self, path: str | Path) -> None:
        if not _gate_hooked:
            _hook_forks()
        self.path = Path(path)
        self._memory = str(self.path) == ":memory:"
        self._local = threading.local()
        self._lock = threading.Lock()
        # Calls inside SQLite now: close() waits for them (closing a connection another thread
        # is using crashes the interpreter).
        self._busy = 0
        self._idle = threading.Condition(self._lock)
        self._open_lock = threading.Lock()
        self._conns: list[sqlite3.Connection] = []
        self._generation = 0
        self._identity: tuple[int, int] | None = None
        self._cleaned = 0.0
        self._abandoned: list[sqlite3.Connection] = []
        # A :memory: database lives in one connection: every thread shares it, one at a time.
        self._serial = threading.Lock() if self._memory else None
        self._shared = SimpleNamespace(conn=None, generation=0)

    # -- connections ---------------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        # One connection set up at a time in this process: switching a new file to WAL and
        # creating the schema take locks SQLite does not wait for (two at once: "locked").
        with self._open_lock:
            deadline = time.monotonic() + _BUSY_TIMEOUT_S
            while True:
                try:
                    conn = self._connect()
                    break
                except sqlite3.OperationalError as exc:
                    # Another process is setting the same file up: wait for it, as for a lock.
                    if "locked" not in str(exc) or time.monotonic() > deadline:
                        raise StoreUnavailable(
                            f"cannot open SQLite store {self.path}: {exc}"
                        ) from exc
                    time.sleep(0.01)
                except (sqlite3.Error, OSError) as exc:
                    raise StoreUnavailable(f"cannot open SQLite store {self.path}: {exc}") from exc
        with self._lock:
            self._conns.append(conn)
            if not self._memory and self._identity is None:
                st = os.stat(self.path)
                self._identity = (st.st_dev, st.st_ino)
        return conn

    def _connect(self) -> sqlite3.Connection:
        if self._memory:
            conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                str(self.path),
                timeout=_BUSY_TIMEOUT_S,
                isolation_level=None,
                check_same_thread=False,
            )
        try:
            if not self._memory:
                if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                    conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(_SCHEMA + _APPLY_SCHEMA)
        except BaseException:
            conn.close()
            raise
        return conn

    def _conn(self) -> sqlite3.Connection:
        """This thread's connection, after checking the file is still the one opened."""
        self._check_file()
        local: Any = self._shared if self._memory else self._local
        conn: sqlite3.Connection | None = getattr(local, "conn", None)
        if conn is None or local.generation != self._generation:
            if conn is not None:
                self._drop(conn)
            local.conn = conn = self._open()
            local.generation = self._generation
        return conn

    def _drop(self, conn: sqlite3.Connection) -> None:
        with self._lock:
            if conn not in self._conns:
                return  # close() took it, and closes it
            self._conns.remove(conn)
        with contextlib.suppress(sqlite3.Error):
            conn.close()

    def _check_file(self) -> None:
        if self._memory or self._identity is None:
            return
        try:
            st = os.stat(self.path)
            what = None if (st.st_dev, st.st_ino) == self._identity else "replaced"
        except FileNotFoundError:
            what = "deleted"
        except OSError as exc:
            raise StoreUnavailable(f"SQLite store {self.path}: {exc}") from exc
        if what is None:
            return
        with self._lock:
            if self._identity is None:
                return  # another thread noticed first
            self._identity = None
            self._generation += 1
        raise StoreError(
            f"SQLite store {self.path}: the file was {what} while the store had it open; the "
            "next write opens the file at that path (usage written to the old file is not in it)"
        )

    def _run(self, fn: Callable[..., T], *args: Any) -> T:
        with _gate.shared():
            with self._lock:
                self._busy += 1
            try:
                if self._serial is not None:
                    with self._serial:
                        return self._call(fn, *args)
                return self._call(fn, *args)
            finally:
                with self._lock:
                    self._busy -= 1
                    if not self._busy:
                        self._idle.notify_all()

    def _call(self, fn: Callable[..., T], *args: Any) -> T:
        conn = self._conn()
        try:
            return fn(conn, *args)
        except sqlite3.OperationalError as exc:
            raise StoreUnavailable(f"SQLite store {self.path}: {exc}") from exc
        except sqlite3.Error as exc:
            raise StoreError(f"SQLite store {self.path}: {exc}") from exc

    # -- usage ---------------------------------------------------------------------------------

    def apply(self, batch: Batch, flusher_id: str) -> list[str]:
        rows = batch.sql_rows()
        clean = time.monotonic() - self._cleaned > _CLEAN_EVERY_S
        refused = self._run(_apply, rows, flusher_id, batch.seq, clean)
        if clean:
            self._cleaned = time.monotonic()
        return refused

    def applied(self, key: str, batch: Batch, flusher_id: str) -> tuple[dict[str, int], bool]:
        def read(conn: sqlite3.Connection) -> tuple[dict[str, int], bool]:
            conn.execute("BEGIN")  # one snapshot for both reads
            try:
                rows = conn.execute("SELECT field, value FROM usage WHERE key = ?", (key,))
                fields = _ints(rows.fetchall())
                row = conn.execute(
                    "SELECT seq FROM flushers WHERE id = ?", (flusher_id,)
                ).fetchone()
            finally:
                _rollback(conn)
            return fields, row is not None and row[0] >= batch.seq

        return self._run(read)

    def read(self, key: str) -> dict[str, int]:
        return self._run(
            lambda c: _ints(
                c.execute("SELECT field, value FROM usage WHERE key = ?", (key,)).fetchall()
            )
        )

    def set_fields(self, key: str, fields: dict[str, int | None]) -> None:
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
                _rollback(conn)
                raise

        self._run(write)

    def delete(self, key: str) -> None:
        self._run(lambda c: c.execute("DELETE FROM usage WHERE key = ?", (key,)))

    def keys(self, cycle_start_date: str | None = None) -> list[str]:
        pattern = usage_pattern(cycle_start_date, like=True)
        rows = self._run(
            lambda c: c.execute(
                "SELECT DISTINCT key FROM usage WHERE key LIKE ? ORDER BY key", (pattern,)
            ).fetchall()
        )
        return [row[0] for row in rows]

    def ping(self) -> None:
        self._run(lambda c: c.execute("SELECT 1").fetchone())

    def close(self) -> None:
        with self._lock:
            # Never close a connection under a call another thread is making (that crashes
            # the interpreter): wait for them; past that, each thread closes its own when it
            # next finds the generation moved.
            if self._idle.wait_for(lambda: not self._busy, timeout=2 * _BUSY_TIMEOUT_S):
                conns, self._conns = self._conns, []
            else:
                conns = []
            self._generation += 1
        with _gate.shared():
            for conn in conns:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()

    def after_fork(self) -> None:
        # The parent's connections must never be used, nor closed, here: closing one could
        # checkpoint or remove the WAL the parent is using. Keep them referenced, untouched.
        self._abandoned.extend(self._conns)
        self._conns = []
        self._local = threading.local()
        self._shared = SimpleNamespace(conn=None, generation=0)
        self._lock = threading.Lock()
        self._busy = 0
        self._idle = threading.Condition(self._lock)
        self._open_lock = threading.Lock()
        self._serial = threading.Lock() if self._memory else None
        self._generation += 1

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
        now = _now_ms() if now_ms is None else now_ms
        return self._run(
            _lease, key, lease_id, base, want, slice_, limits, ttl_ms, now, stored_limit
        )

    def claim_flag(self, key: str, field: str) -> bool:
        def claim(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "INSERT INTO usage (key, field, value) VALUES (?, ?, 1) "
                "ON CONFLICT (key, field) DO UPDATE SET value = 1 WHERE value = 0",
                (key, field),
            )
            return cur.rowcount == 1

        return self._run(claim)

    def rate_acquire(
        self,
        keys: list[str],
        member: str,
        weights: list[int],
        limits: list[int],
        window_ms: int,
        now_ms: int | None = None,
    ) -> RateResult:
        now = _now_ms() if now_ms is None else now_ms
        return self._run(_rate_acquire, keys, member, weights, limits, window_ms, now)

    def rate_update(self, key: str, member: str, old_weight: int, weight: int | None) -> None:
        def update(conn: sqlite3.Connection) -> None:
            if weight is None:
                conn.execute("DELETE FROM rate_log WHERE key = ? AND member = ?", (key, member))
            else:
                conn.execute(
                    "UPDATE rate_log SET weight = ? WHERE key = ? AND member = ?",
                    (weight, key, member),
                )

        self._run(update)


def _ints(rows: list[tuple[str, Any]]) -> dict[str, int]:
    return {field: value for field, value in rows if type(value) is int}


def _apply(
    conn: sqlite3.Connection, rows: str, flusher_id: str, seq: int, clean: bool
) -> list[str]:
    now = time.time()
    conn.execute(
        "INSERT INTO batches (flusher, seq, rows, at) VALUES (?, ?, ?, ?)",
        (flusher_id, seq, rows, now),
    )
    # The refused keys of this batch not reported yet (a retry of a batch applied before
    # reports nothing again).
    refused = conn.execute(
        "SELECT key FROM refused WHERE flusher = ? AND seq = ? AND reported = 0", (flusher_id, seq)
    ).fetchall()
    if refused:
        conn.execute(
            "UPDATE refused SET reported = 1 WHERE flusher = ? AND seq = ?", (flusher_id, seq)
        )
    if clean:
        conn.execute("DELETE FROM flushers WHERE updated < ?", (now - MARKER_TTL_S,))
        conn.execute("DELETE FROM refused WHERE flusher NOT IN (SELECT id FROM flushers)")
    return [key for (key,) in refused]


def _lease(
    conn: sqlite3.Connection,
    key: str,
    lease_id: str,
    base: tuple[int, int],
    want: tuple[int, int] | None,
    slice_: tuple[int, int],
    limits: tuple[int, int],
    ttl_ms: int,
    now: int,
    stored_limit: bool,
) -> LeaseState:
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("DELETE FROM reservations WHERE key = ? AND expires_ms <= ?", (key, now))
        if lease_id:
            conn.execute("DELETE FROM reservations WHERE key = ? AND id = ?", (key, lease_id))
        rt, rp = conn.execute(
            "SELECT COALESCE(SUM(tokens), 0), COALESCE(SUM(pusd), 0) FROM reservations "
            "WHERE key = ?",
            (key,),
        ).fetchone()
        rt, rp = int(rt), int(rp)
        fields = dict(
            conn.execute(
                "SELECT field, value FROM usage WHERE key = ? AND field IN "
                "('total_tokens', 'cost_pusd', 'reserved_tokens', 'reserved_pusd', 'limit')",
                (key,),
            ).fetchall()
        )
        used_t = int(fields.get("total_tokens", 0))
        used_p = int(fields.get("cost_pusd", 0))
        stored = fields.get("limit") if stored_limit else None
        limits = (effective_limit(limits[0], None if stored is None else int(stored)), limits[1])
        ok = True
        held = (0, 0)
        if lease_id:
            ok, held = lease_grant_both((used_t, used_p), (rt, rp), base, want, slice_, limits)
            if held[0] or held[1]:
                conn.execute(
                    "INSERT INTO reservations (key, id, expires_ms, tokens, pusd) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (key, lease_id, now + ttl_ms, held[0], held[1]),
                )
        for field, value in (("reserved_tokens", rt + held[0]), ("reserved_pusd", rp + held[1])):
            if value or field in fields:
                conn.execute(
                    "INSERT INTO usage (key, field, value) VALUES (?, ?, ?) "
                    "ON CONFLICT (key, field) DO UPDATE SET value = excluded.value",
                    (key, field, value),
                )
        conn.execute("COMMIT")
        return LeaseState(ok, used_t, used_p, rt, rp, held[0], held[1], limits[0])
    except BaseException:
        _rollback(conn)
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
        _rollback(conn)
        raise
