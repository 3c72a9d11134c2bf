"""The flusher: one per store, the only writer of its usage deltas (internal).

Modelled on the OpenTelemetry SDK's ``BatchProcessor``: a daemon thread that owns the write
path, wakes every ``flush_interval_s`` (or at once when the ledger holds many keys), drains the
ledger and writes the batch; ``flush()`` does the same from any thread, under the same lock, so
one drain and write runs at a time. Nothing here depends on an event loop, so sync code,
threads, several loops and interpreter exit all work the same.

Batches are written in the order the ledger numbered them: a batch that fails stays the *retry
batch* (or, past ``max_pending`` with a spool, waits in its spool file) and is written again, with
the same number, before anything newer; the backend skips the units of it already applied, so
each unit is applied once. New deltas keep merging per key in the ledger meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from llmtally._native import LEDGER_FIELDS, Batch, Ledger
from llmtally._observe import state as _observed
from llmtally.errors import StoreError, StoreUnavailable
from llmtally.storage.base import Backend
from llmtally.storage.keys import parse_key
from llmtally.storage.spool import Spool

__all__ = ["EARLY_FLUSH_KEYS", "OPEN", "Flusher"]

logger = logging.getLogger("llmtally")

#: Pending keys at which the flusher is woken before its interval.
EARLY_FLUSH_KEYS = 20_000
_MAX_BACKOFF_S = 30.0
#: How often a store with a spool looks for files a dead process left.
_ORPHAN_SCAN_S = 60.0

T = TypeVar("T")
_TOKENS = LEDGER_FIELDS.index("total_tokens")
_PUSD = LEDGER_FIELDS.index("cost_pusd")


class WriteListener(Protocol):
    """Told of a batch of the flusher's own deltas once the backend applied it (``refused``:
    the keys it refused), before the batch leaves :meth:`Flusher.local`."""

    def draining(self) -> None:
        """The ledger is about to be drained into a batch (under the flusher's locks)."""
        ...

    def written(self, batch: Batch, refused: list[str], caught_up: bool) -> None:
        """``caught_up``: no batch drained before this one waits to be written any more."""
        ...

    def tick(self) -> None:
        """After each successful flush (the flusher's thread, no write under way)."""
        ...

    def store_closing(self) -> None:
        """The store is closing and its deltas are written: give back what is held in it."""
        ...


#: Flushers that may hold deltas: written at interpreter exit and on exit signals.
OPEN: set[Flusher] = set()


class Flusher:
    """Drains a ledger into a backend, from its own thread and on request."""

    def __init__(
        self,
        backend: Backend,
        *,
        flush_interval_s: float,
        max_pending: int,
        label: str,
        spool: Spool | None = None,
    ) -> None:
        self.backend = backend
        self.spool = spool
        self.flush_interval_s = flush_interval_s
        self.max_pending = max_pending
        self.label = label
        self.flush_failures = 0
        self.batches_written = 0
        self.refused_writes = 0
        self.replayed_batches = 0
        self._lock_fd: int | None = None
        # Told of each batch of this flusher's own deltas once it is written (limiters: their
        # quota leases shrink by the usage that reached the store), under the write lock.
        self.listeners: weakref.WeakSet[WriteListener] = weakref.WeakSet()
        self._reinit()
        OPEN.add(self)

    def _reinit(self) -> None:
        """A fresh writer: at construction, and in a forked child (whose copy of the parent's
        deltas is the parent's to write)."""
        self.ledger = Ledger()
        self.flusher_id = os.urandom(8).hex()
        self.retry: Batch | None = None
        # Batches waiting in their spool files (past max_pending during an outage), oldest first:
        # (path, keys, since).
        self.spilled: deque[tuple[Path, int, float]] = deque()
        self.closed = False
        self.running = False
        self.consecutive_failures = 0
        self.last_ok: float | None = None
        self.last_attempt_ok: bool | None = None
        self.last_error: str | None = None
        self._warned_pending = False
        self._shutdown = False
        self._closing = False
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # one drain and write at a time; reads take it too
        # Guards moving deltas between the ledger, the retry batch and the spool (no I/O under
        # it), so `pending` and `local` never see them in two places or in none.
        self._moving = threading.Lock()
        self._start_lock = threading.Lock()
        self._close_lock = threading.Lock()
        self._wake = threading.Event()
        self._next_orphan_scan = 0.0
        self._replaying: set[int] = set()  # lock descriptors of a dead flusher being replayed
        if self.spool is not None:
            self._lock_fd = self.spool.claim(self.flusher_id)
            self.ledger.journal(self.spool.path, self.flusher_id, self.spool.tag)

    # -- the worker ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker thread (a no-op when it runs, or while a close is under way). A
        closed flusher that gets new deltas opens again."""
        with self._start_lock:
            if self.running or self._closing:
                return
            if self.spool is not None and self._lock_fd is None:  # opened again after close
                self._lock_fd = self.spool.claim(self.flusher_id)
            OPEN.add(self)
            self._shutdown = False
            self.closed = False
            self.running = True
            self._thread = threading.Thread(
                target=self._worker, name=f"llmtally-flusher {self.label}", daemon=True
            )
            self._thread.start()

    def wake(self) -> None:
        """Write now rather than at the end of the interval."""
        self._wake.set()

    def _delay(self) -> float:
        failures = self.consecutive_failures
        if not failures:
            return self.flush_interval_s
        backoff = min(_MAX_BACKOFF_S, self.flush_interval_s * 2 ** min(failures, 20))
        return float(backoff * random.uniform(0.5, 1.0))

    def _worker(self) -> None:
        # Writes start every interval (not an interval after the previous write ended), so a
        # slow write under load does not stretch the time deltas wait.
        next_at = time.monotonic() + self.flush_interval_s
        try:
            try:  # connect now, not in the first write (a busy process pays for each step)
                self.backend.ping()
            except StoreError as exc:
                logger.debug("%s: not reachable yet: %s", self.label, exc)
            while not self._shutdown:
                self._wake.wait(max(0.0, next_at - time.monotonic()))
                self._wake.clear()
                if self._shutdown:
                    break
                started = time.monotonic()
                self.flush()
                next_at = max(started + self._delay(), time.monotonic())
        finally:
            self.running = False

    # -- writing -------------------------------------------------------------------------------

    def flush(self, timeout_s: float | None = None) -> bool:
        """Write everything pending now, in the calling thread. False (deltas kept for a retry)
        when the backend failed or the lock was not had within ``timeout_s``; never raises for
        a backend error."""
        if not self._lock.acquire(timeout=-1 if timeout_s is None else max(0.0, timeout_s)):
            return False
        try:
            return self._flush_locked()
        finally:
            self._lock.release()

    def _flush_locked(self) -> bool:
        try:
            if self.spool is not None and time.monotonic() >= self._next_orphan_scan:
                self._replay_orphans()
                self._next_orphan_scan = time.monotonic() + _ORPHAN_SCAN_S
            if self.retry is not None:
                self._write(self.retry)
                with self._moving:
                    self.retry = None
            while self.spilled:
                self._write_spilled(self.spilled[0][0])
                with self._moving:
                    self.spilled.popleft()
            with self._moving:
                for listener in list(self.listeners):
                    try:
                        listener.draining()
                    except Exception as exc:  # a listener never fails a flush
                        logger.error("%s: a write listener failed: %r", self.label, exc)
                batch = self.ledger.drain()
                if len(batch):
                    self.retry = batch
            if len(batch):
                self._write(batch)
                with self._moving:
                    self.retry = None
        except StoreError as exc:
            self._failed(exc)
            return False
        except Exception as exc:  # an unexpected failure is still only a failed flush
            self._failed(StoreError(f"unexpected error while flushing: {exc!r}"))
            logger.debug("flush failure detail", exc_info=exc)
            return False
        self.consecutive_failures = 0
        self.last_ok = time.monotonic()
        self.last_attempt_ok = True
        self.last_error = None
        for listener in list(self.listeners):
            try:
                listener.tick()
            except Exception as exc:  # a listener never fails a flush
                logger.debug("%s: a write listener failed: %r", self.label, exc)
        return True

    def locked(self, fn: Callable[[], T], timeout_s: float) -> T:
        """``fn()`` while no batch is being written (so what it reads of the backend and of
        :meth:`local` agree). Raises ``StoreUnavailable`` when a write holds the lock past
        ``timeout_s`` (a backend that hangs)."""
        if not self._lock.acquire(timeout=max(0.0, timeout_s)):
            raise StoreUnavailable(f"{self.label}: a write is still under way")
        try:
            return fn()
        finally:
            self._lock.release()

    def _write(self, batch: Batch, flusher_id: str | None = None) -> None:
        refused = self.backend.apply(batch, flusher_id or self.flusher_id)
        if flusher_id is None or flusher_id == self.flusher_id:
            # Caught up when no batch drained earlier is still to be written (the spilled
            # ones are written before anything drained after them).
            caught_up = not self.spilled
            for listener in list(self.listeners):
                try:
                    listener.written(batch, refused, caught_up)
                except Exception as exc:  # a listener never fails a write
                    logger.error("%s: a write listener failed: %r", self.label, exc)
        batch.discard_journal()  # in the store now: its spool file has served
        self.batches_written += 1
        _observed.flushed(self.backend.name, True)
        if refused:
            self.refused_writes += len(refused)
            users = []
            for key in refused[:5]:
                parsed = parse_key(key)
                users.append(repr(parsed[0]) if parsed else repr(key))
            logger.error(
                "store %s refused the usage of %d key(s) (bad input: a counter would leave the "
                "signed 64-bit range, about 9.2M USD of cost_pusd, or the stored field is not an "
                "integer); the other keys were written: users %s",
                self.label,
                len(refused),
                ", ".join(users),
            )

    def _read_spool_file(self, path: Path) -> Batch | None:
        """A spool file's batch; ``None`` (after saying why) when it is gone or unreadable."""
        try:
            return Batch.from_journal(path)[0]
        except FileNotFoundError:
            logger.warning("spool file %s is gone (written by another store?)", path)
        except (OSError, ValueError) as exc:
            logger.error("spool file %s is unreadable, set aside: %s", path, exc)
            with contextlib.suppress(OSError):
                os.replace(path, path.with_suffix(".unreadable"))
        return None

    def _write_spilled(self, path: Path) -> None:
        batch = self._read_spool_file(path)
        if batch is not None and len(batch):
            self._write(batch)

    def _failed(self, exc: StoreError) -> None:
        self.flush_failures += 1
        _observed.flushed(self.backend.name, False)
        self.consecutive_failures += 1
        first = self.last_attempt_ok is not False
        self.last_attempt_ok = False
        self.last_error = str(exc)
        logger.log(
            logging.WARNING if first else logging.DEBUG,
            "flush to %s failed (%d in a row; deltas kept and retried): %s",
            self.label,
            self.consecutive_failures,
            exc,
        )
        retry = self.retry
        held = self.ledger.pending + (len(retry) if retry is not None else 0)
        if self.spool is not None and held > self.max_pending and self._spill():
            return
        pending = self.pending
        if pending > self.max_pending and not self._warned_pending:
            self._warned_pending = True
            logger.error(
                "%d keys are waiting for %s (max_pending=%d); deltas keep merging per key and "
                "none is dropped%s",
                pending,
                self.label,
                self.max_pending,
                "" if self.spool is not None else " (a spool would keep them out of memory)",
            )

    def _spill(self) -> bool:
        """Past max_pending during an outage: drop from memory the batches whose deltas are all
        in their spool files, to be written from there, in order, when the store is back.
        False when a spool file lacks deltas (a journal write failed): those stay in memory."""
        with self._moving:
            retry = self.retry
            if retry is not None:
                if not retry.journal_complete or retry.journal_path is None:
                    return False
                self.spilled.appendleft((retry.journal_path, len(retry), time.monotonic()))
                self.retry = None
            if self.ledger.journal_incomplete:
                return False
            spill = self.ledger.drain()
            if len(spill) and spill.journal_path is not None:
                self.spilled.append((spill.journal_path, len(spill), time.monotonic()))
        logger.warning(
            "%s: %d keys wait in the spool, not in memory, until the store is back",
            self.label,
            self.pending,
        )
        return True

    def _replay_orphans(self) -> None:
        """Write the spool files of flushers whose process died, as those flushers (so a batch
        written before the crash is skipped). Raises ``StoreError`` to be retried later."""
        assert self.spool is not None
        for flusher_id, fd in self.spool.orphans(self.flusher_id):
            self._replaying.add(fd)
            try:
                for path in self.spool.journals(flusher_id):
                    try:
                        batch, tag, records, torn = Batch.from_journal(path)
                    except (OSError, ValueError):
                        self._read_spool_file(path)  # says why, sets it aside
                        continue
                    if tag != self.spool.tag:
                        continue  # another store's: its own store will write it
                    if torn:
                        logger.warning(
                            "spool file %s ends in a record cut short by the crash (%d whole "
                            "records kept; the cut one was never accepted)",
                            path,
                            records,
                        )
                    if len(batch):
                        self._write(batch, flusher_id)
                        self.replayed_batches += 1
                    else:  # nothing to write, and no marker to leave
                        batch.discard_journal()
            finally:
                self._replaying.discard(fd)
                self.spool.done(flusher_id, fd)

    # -- reading -------------------------------------------------------------------------------

    def _spilled_batches(self) -> list[Batch]:
        batches = []
        for path, _, _ in list(self.spilled):
            batch = self._read_spool_file(path)
            if batch is not None:
                batches.append(batch)
        return batches

    def read(self, key: str) -> dict[str, int]:
        """The backend's fields of ``key`` plus this process's deltas not in it yet.

        Taken while no write is in flight: the ledger holds what no batch has; of the retry
        batch and the spilled ones, the unit holding ``key`` is added only when the backend has
        not applied it (both read in one atomic step)."""
        with self._lock:
            counters = list(self.ledger.get(key))
            waiting = [b for b in (self.retry, *self._spilled_batches()) if b is not None]
            stored: dict[str, int] | None = None
            for batch in waiting:
                delta = batch.get(key)
                if not any(delta):
                    continue
                stored, applied = self.backend.applied(key, batch, self.flusher_id)
                if not applied:
                    for i, v in enumerate(delta):
                        counters[i] += v
            if stored is None:
                stored = self.backend.read(key)
        for field, value in zip(LEDGER_FIELDS, counters, strict=True):
            if value:
                stored[field] = stored.get(field, 0) + value
        return stored

    def local(self, key: str) -> dict[str, int]:
        """This process's deltas of ``key`` not yet written (the retry and spilled batches
        included)."""
        with self._moving:
            counters = list(self.ledger.get(key))
            waiting = [self.retry] if self.retry is not None else []
            paths = [p for p, _, _ in self.spilled]
        for path in paths:
            batch = self._read_spool_file(path)
            if batch is not None:
                waiting.append(batch)
        for batch in waiting:
            for i, v in enumerate(batch.get(key)):
                counters[i] += v
        return {f: v for f, v in zip(LEDGER_FIELDS, counters, strict=True) if v}

    def local_totals(self, key: str) -> tuple[int, int]:
        """``(total_tokens, cost_pusd)`` of :meth:`local` (what limiters read per call)."""
        with self._moving:
            counters = self.ledger.get(key)
            tokens, pusd = counters[_TOKENS], counters[_PUSD]
            retry = self.retry
            if retry is not None:
                counters = retry.get(key)
                tokens += counters[_TOKENS]
                pusd += counters[_PUSD]
            spilled = bool(self.spilled)
        if spilled:
            found = self.local(key)
            return found.get("total_tokens", 0), found.get("cost_pusd", 0)
        return tokens, pusd

    @property
    def pending(self) -> int:
        """Keys with deltas not yet written (a key counted once per batch holding it)."""
        with self._moving:
            retry = self.retry
            spilled = sum(n for _, n, _ in self.spilled)
            return self.ledger.pending + (len(retry) if retry is not None else 0) + spilled

    def oldest_pending_s(self) -> float | None:
        """Age of the oldest delta not yet written."""
        with self._moving:
            ages = [self.ledger.oldest_pending_s]
            retry = self.retry
            if retry is not None:
                ages.append(retry.oldest_s_ago)
            if self.spilled:
                ages.append(time.monotonic() - self.spilled[0][2])
        known = [a for a in ages if a is not None]
        return max(known) if known else None

    def status(self) -> dict[str, Any]:
        """The write path's state for ``health()``."""
        last = None if self.last_ok is None else time.monotonic() - self.last_ok
        spool_errors, spool_error = self.ledger.journal_errors
        return {
            "flush_ok": self.last_attempt_ok is not False and not spool_errors,
            "pending_deltas": self.pending,
            "oldest_pending_s": self.oldest_pending_s(),
            "last_flush_s_ago": last,
            "flush_failures": self.flush_failures,
            "batches_written": self.batches_written,
            "refused_writes": self.refused_writes,
            "overflows": self.ledger.overflows,
            "last_error": self.last_error or (spool_error and f"spool: {spool_error}"),
            "spool": None if self.spool is None else str(self.spool.path),
            "spool_errors": spool_errors,
            "spilled_batches": len(self.spilled),
            "replayed_batches": self.replayed_batches,
        }

    # -- lifecycle -----------------------------------------------------------------------------

    def close(self, timeout_s: float) -> bool:
        """Stop the worker and write everything pending, retrying until ``timeout_s`` is spent,
        then close the backend. True once everything is written (closing again is then a
        no-op); False when deltas could not be written: they stay, with the spool's lock, and
        are tried again by the next close, interpreter exit, or the next store on the spool
        once this process is gone. Safe from several threads at once; never raises."""
        deadline = time.monotonic() + timeout_s
        if not self._close_lock.acquire(timeout=max(0.0, timeout_s)):
            return False
        try:
            if self.closed:
                return True
            return self._close(deadline)
        except Exception as exc:  # closing must not stop the closing of other stores
            logger.error("closing %s failed: %r", self.label, exc)
            return False
        finally:
            self._close_lock.release()

    def _close(self, deadline: float) -> bool:
        with self._start_lock:
            self._closing = True
            self._shutdown = True
            self._wake.set()
            thread = self._thread
        ok = False
        try:
            if thread is not None and thread is not threading.current_thread():
                thread.join(max(0.0, (deadline - time.monotonic()) / 2))
            delay = 0.05
            ok = self.flush(timeout_s=deadline - time.monotonic())
            while not ok and time.monotonic() < deadline:
                time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
                delay = min(delay * 2, 1.0)
                ok = self.flush(timeout_s=deadline - time.monotonic())
            # Connections are closed only with no write in flight (one closed under a thread
            # still inside it can crash the process).
            if self._lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
                try:
                    self.backend.close()
                except Exception as exc:  # what was written stays written
                    logger.error("closing the connection of %s failed: %r", self.label, exc)
                finally:
                    self._lock.release()
            else:
                logger.error("closing %s: a write is still in flight; left to it", self.label)
            if not ok:
                logger.error(
                    "closing %s with %d key(s) of usage not written: %s",
                    self.label,
                    self.pending,
                    self.last_error or "a write was still in flight",
                )
            elif self.spool is not None and self._lock_fd is not None:
                self._release_spool()
        finally:
            with self._start_lock:
                self._closing = False
                self.closed = ok
                if ok:
                    OPEN.discard(self)
        if self.ledger.pending:  # deltas added while closing: the store is in use again
            self.start()
        return ok

    def _release_spool(self) -> None:
        """Everything is written: remove this flusher's empty spool files and its lock."""
        assert self.spool is not None and self._lock_fd is not None
        self.ledger.close_journal()
        for path in self.spool.journals(self.flusher_id):
            try:
                if Batch.from_journal(path)[2] == 0:
                    path.unlink(missing_ok=True)
            except (OSError, ValueError) as exc:
                logger.warning("spool file %s left in place: %s", path, exc)
        self.spool.done(self.flusher_id, self._lock_fd)
        self._lock_fd = None

    def after_fork(self) -> None:
        """In a forked child: an empty ledger, a new identity, no thread, no inherited lock."""
        for fd in [self._lock_fd, *self._replaying]:  # the parent's locks stay the parent's
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._lock_fd = None
        closed = self.closed
        self._reinit()
        self.closed = closed
        self.backend.after_fork()
