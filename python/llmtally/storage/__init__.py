"""Stores: usage deltas kept in process (the Rust ledger) and flushed in the background.

``open_store(url)`` picks a backend by URL: ``memory://``, ``sqlite:///path`` (the embedded
default), ``redis://`` / ``rediss://`` / ``unix://``, ``redis+cluster://``. Handlers add deltas
in O(1) without awaiting anything; a flusher task drains them every ``flush_interval_s`` (or
sooner when many keys are pending) and writes each batch in one round trip, idempotent by batch
sequence, so a batch retried after a lost reply is applied once. A backend outage loses nothing:
the batch is retried with backoff while new deltas keep merging per key. Reads see the backend
plus this process's unflushed deltas.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import math
import os
import random
import threading
import time
import weakref
from asyncio import _get_running_loop
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote, urlsplit

from llmtally._core import LEDGER_FIELDS, Batch, Ledger
from llmtally._observe import state as _observed
from llmtally.errors import ConfigError, StoreError, StoreUnavailable
from llmtally.storage.base import Backend
from llmtally.storage.keys import parse_key

__all__ = [
    "Store",
    "StoreError",
    "StoreUnavailable",
    "default_store",
    "open_store",
    "resolve_store",
]

logger = logging.getLogger("llmtally")

EARLY_FLUSH_KEYS = _EARLY_FLUSH_KEYS = 20_000
_LOOP_CHECK_S = 0.01
_ACLOSE_TIMEOUT_S = 10.0
_MAX_BACKOFF_S = 30.0


class Store:
    """Usage hashes behind an in-process ledger and a background flusher.

    Build one with :func:`open_store`. Use it as ``async with open_store(url) as store:`` or
    call ``await store.aclose()`` (idempotent) to flush what is pending; interpreter exit flushes
    too.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        url: str,
        flush_interval_s: float = 0.05,
        max_pending: int = 1_000_000,
    ) -> None:
        if isinstance(flush_interval_s, bool) or not isinstance(flush_interval_s, int | float):
            raise ConfigError("flush_interval_s must be a number of seconds")
        if not (0 < flush_interval_s < math.inf):
            raise ConfigError(
                f"flush_interval_s must be positive and finite, not {flush_interval_s}"
            )
        if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
            raise ConfigError(f"max_pending must be an int >= 1, not {max_pending!r}")
        self.backend = backend
        self.url = url
        self.flush_interval_s = float(flush_interval_s)
        self.max_pending = max_pending
        self.ledger = Ledger()
        self._flusher_id = os.urandom(8).hex()
        self._seq = 0
        self._retry: tuple[Batch, int] | None = None
        self._task: asyncio.Task[None] | None = None
        self._alive = False
        self._loop_checked_at = 0.0
        self._task_loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        self._flush_lock = threading.Lock()
        self._closing = False
        self.closed = False
        self.flush_failures = 0
        self.batches_written = 0
        _observed.stores.add(self)
        self.refused_writes = 0
        self._consecutive_failures = 0
        self._last_ok: float | None = None
        self._last_error: str | None = None
        self._warned_pending = False
        _live_stores.add(self)

    # -- adding deltas (hot path: no await, no I/O) --------------------------------------------

    def add(
        self,
        key: str,
        total_tokens: int = 0,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        cached_tokens: int = 0,
        cache_write_tokens: int = 0,
        reasoning_tokens: int = 0,
        cost_pusd: int = 0,
        calls: int = 0,
        errors: int = 0,
        timeouts: int = 0,
    ) -> None:
        """Add one delta to ``key``; it reaches the backend with the next flush.

        Raises ``OverflowError`` (and counts it) when a counter would pass the 64-bit range.
        """
        self.ledger.add(
            key,
            total_tokens,
            prompt_tokens,
            completion_tokens,
            cached_tokens,
            cache_write_tokens,
            reasoning_tokens,
            cost_pusd,
            calls,
            errors,
            timeouts,
        )
        self._kick()

    def _kick(self) -> None:
        """Make sure a flusher runs in this loop (cheap when it does)."""
        self._kicked(self.ledger.pending >= _EARLY_FLUSH_KEYS, time.perf_counter())

    def _kicked(self, flush_wanted: bool, now: float) -> None:
        """After a write: make sure a flusher runs, in this loop, and wake it when the ledger
        reached the early-flush size (``flush_wanted``). ``now`` is ``time.perf_counter()``.

        Which loop is running costs a ``getpid()`` system call in asyncio, so a live flusher's
        loop is checked at most every 10 ms (a loop closed without cancelling its tasks leaves
        its flusher looking alive: a closed loop is seen at once, another thread's live loop at
        the next check)."""
        loop = self._task_loop
        if not self._alive or loop is None or loop.is_closed():
            self._start()
        elif now >= self._loop_checked_at:
            self._loop_checked_at = now + _LOOP_CHECK_S
            if loop is not _get_running_loop():
                self._start()
                return
        if flush_wanted and self._wakeup is not None:
            self._wakeup.set()

    def _start(self) -> None:
        """Start the flusher in the running loop (no-op outside one: flush() or aclose() will
        write what is pending)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._closing = False
        self.closed = False
        self._wakeup = asyncio.Event()
        self._task_loop = loop
        self._task = loop.create_task(self._run(), name=f"llmtally-flusher {self.backend.name}")
        self._alive = True
        self._task.add_done_callback(self._flusher_done)

    def _flusher_done(self, task: asyncio.Task[None]) -> None:
        if task is self._task:
            self._alive = False
        if not task.cancelled() and task.exception() is not None:
            logger.error("the flusher of %s stopped: %r", self.backend.name, task.exception())

    async def _run(self) -> None:
        wakeup = self._wakeup
        assert wakeup is not None
        while not self._closing:
            failures = self._consecutive_failures
            delay = self.flush_interval_s
            if failures:
                delay = min(_MAX_BACKOFF_S, delay * 2**failures) * random.uniform(0.5, 1.0)
            try:
                async with asyncio.timeout(delay):
                    await wakeup.wait()
            except TimeoutError:
                pass
            wakeup.clear()
            if self._closing:
                return
            await self.flush()

    # -- flushing ----------------------------------------------------------------------------

    async def flush(self) -> bool:
        """Write everything pending now. Returns False (and keeps the deltas for a retry) when the
        backend fails; never raises for a backend error."""
        # One flush at a time across every loop and thread using this store: batches must reach
        # the backend in sequence order (a later sequence marks the earlier ones as applied).
        lock = self._flush_lock
        while not lock.acquire(blocking=False):  # noqa: ASYNC110 (held across threads and loops)
            await asyncio.sleep(0.001)
        try:
            try:
                if self._retry is not None:
                    batch, seq = self._retry
                    await self._apply(batch, seq)
                    self._retry = None
                batch = self.ledger.drain()
                if len(batch):
                    self._seq += 1
                    self._retry = (batch, self._seq)
                    await self._apply(batch, self._seq)
                    self._retry = None
            except StoreError as exc:
                self._failed(exc)
                return False
            except Exception as exc:  # an unexpected backend failure is still only a failed flush
                self._failed(StoreError(f"unexpected error while flushing: {exc!r}"))
                logger.debug("flush failure detail", exc_info=exc)
                return False
            self._consecutive_failures = 0
            self._last_ok = time.monotonic()
            self._last_error = None
            return True
        finally:
            lock.release()

    async def _apply(self, batch: Batch, seq: int) -> None:
        refused = await self.backend.apply(batch, self._flusher_id, seq)
        self.batches_written += 1
        _observed.flushed(self.backend.name, True)
        if refused:
            self.refused_writes += len(refused)
            logger.error(
                "store %s refused the deltas of %d key(s) because a counter would pass the "
                "64-bit range (about 9.2M USD of cost_pusd): %s",
                self.backend.name,
                len(refused),
                ", ".join(refused[:5]),
            )

    def _failed(self, exc: StoreError) -> None:
        self.flush_failures += 1
        _observed.flushed(self.backend.name, False)
        self._consecutive_failures += 1
        first = self._last_error is None
        self._last_error = str(exc)
        level = logging.WARNING if first else logging.DEBUG
        logger.log(
            level,
            "flush to %s failed (%d in a row; deltas kept and retried): %s",
            self.backend.name,
            self._consecutive_failures,
            exc,
        )
        pending = self.ledger.pending
        if pending > self.max_pending and not self._warned_pending:
            self._warned_pending = True
            logger.error(
                "%d keys are waiting for %s (max_pending=%d); deltas keep merging per key and "
                "none is dropped",
                pending,
                self.backend.name,
                self.max_pending,
            )

    # -- reads ---------------------------------------------------------------------------------

    def local(self, key: str) -> dict[str, int]:
        """This process's unflushed deltas of ``key`` (including a batch awaiting retry)."""
        counters = list(self.ledger.get(key))
        retry = self._retry
        if retry is not None:
            for i, v in enumerate(retry[0].get(key)):
                counters[i] += v
        return {f: v for f, v in zip(LEDGER_FIELDS, counters, strict=True) if v}

    async def read(self, key: str) -> dict[str, int]:
        """The backend's fields of ``key`` plus this process's unflushed deltas.

        Raises:
            StoreUnavailable: when the backend cannot be reached.
        """
        stored = await self.backend.read(key)
        for field, value in self.local(key).items():
            stored[field] = stored.get(field, 0) + value
        return stored

    async def set_fields(self, key: str, fields: dict[str, int | None]) -> None:
        """Set plain fields (like ``limit``) now, bypassing the ledger."""
        await self.backend.set_fields(key, fields)

    async def delete(self, key: str) -> None:
        """Remove ``key`` from the backend (pending deltas are flushed first, so they go too)."""
        await self.flush()
        await self.backend.delete(key)

    async def usage_keys(self, cycle_start_date: str | None = None) -> list[str]:
        """Usage keys in the backend and in this process, of one cycle or all."""
        found = set(await self.backend.keys(cycle_start_date))
        for key in self.ledger.keys():  # noqa: SIM118 (a method of the ledger)
            if cycle_start_date is None or key.endswith(":" + cycle_start_date):
                found.add(key)
        return sorted(k for k in found if parse_key(k) is not None)

    # -- lifecycle -----------------------------------------------------------------------------

    async def health(self) -> dict[str, Any]:
        """``status``, ``ok``, ``backend``, ``pending_deltas``, ``last_flush_s_ago``,
        ``flush_failures``, ``errors``, ``timeouts`` and more."""
        ok = True
        error = self._last_error
        try:
            async with asyncio.timeout(2.0):
                await self.backend.ping()
        except (StoreError, TimeoutError) as exc:
            ok = False
            error = str(exc) or type(exc).__name__
        pending = self.ledger.pending + (len(self._retry[0]) if self._retry else 0)
        last = None if self._last_ok is None else time.monotonic() - self._last_ok
        return {
            "status": "healthy" if ok else "unhealthy",
            "ok": ok,
            "backend": self.backend.name,
            "url": _redact(self.url),
            "pending_deltas": pending,
            "last_flush_s_ago": last,
            "flush_failures": self.flush_failures,
            "errors": self.flush_failures,
            "timeouts": 0,
            "batches_written": self.batches_written,
            "refused_writes": self.refused_writes,
            "overflows": self.ledger.overflows,
            "last_error": error,
        }

    async def aclose(self, timeout_s: float = _ACLOSE_TIMEOUT_S) -> bool:
        """Stop the flusher and write everything pending (retrying until ``timeout_s``), then
        close the backend. Idempotent. Returns False when deltas could not be written."""
        if self.closed:
            return True
        self._closing = True
        task = self._task
        if task is not None and not task.done() and self._task_loop is asyncio.get_running_loop():
            if self._wakeup is not None:
                self._wakeup.set()
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout=max(0.1, timeout_s / 2))
            except TimeoutError:
                task.cancel()
        self._task = None
        self._alive = False
        deadline = time.monotonic() + timeout_s
        delay = 0.05
        ok = await self.flush()
        while not ok and time.monotonic() < deadline:
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 1.0)
            ok = await self.flush()
        if not ok:
            pending = self.ledger.pending + (len(self._retry[0]) if self._retry else 0)
            logger.error(
                "closing %s with %d key(s) of usage not written: %s",
                _redact(self.url),
                pending,
                self._last_error,
            )
        await self.backend.aclose()
        self.closed = True
        return ok

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.shield(self.aclose())

    def _at_fork(self) -> None:
        # The child must not flush the parent's deltas a second time.
        self.ledger = Ledger()
        self._flusher_id = os.urandom(8).hex()
        self._seq = 0
        self._retry = None
        self._task = None
        self._alive = False
        self._task_loop = None
        self._wakeup = None
        self._flush_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<Store {self.backend.name} {_redact(self.url)} pending={self.ledger.pending}>"


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return parts._replace(netloc=netloc).geturl()
    return url


# ---------------------------------------------------------------------------------------------
# Opening stores.


def _default_url() -> str:
    url = os.environ.get("LLMTALLY_STORE", "").strip()
    if url:
        return url
    host = os.environ.get("REDIS_HOST", "").strip()
    if host:
        port = os.environ.get("REDIS_PORT", "6379").strip() or "6379"
        db = os.environ.get("REDIS_DB", "0").strip() or "0"
        password = os.environ.get("REDIS_PASSWORD", "")
        auth = f":{quote(password, safe='')}@" if password else ""
        return f"redis://{auth}{host}:{port}/{db}"
    data_home = os.environ.get("XDG_DATA_HOME", "").strip() or str(Path.home() / ".local" / "share")
    return "sqlite:///" + str(Path(data_home) / "llmtally" / "usage.db")


def _backend_for(url: str) -> Backend:
    if not isinstance(url, str) or "://" not in url:
        raise ConfigError(
            f"store URL {url!r} has no scheme; use memory://, sqlite:///path, redis://host:port, "
            "rediss://, unix:///path or redis+cluster://host:port"
        )
    scheme = url.split("://", 1)[0].lower()
    if scheme == "memory":
        from llmtally.storage.memory import MemoryBackend

        return MemoryBackend()
    if scheme == "sqlite":
        from llmtally.storage.sqlite import SQLiteBackend

        rest = url[len("sqlite://") :]
        if rest in ("", "/", "/:memory:"):
            return SQLiteBackend(":memory:")
        if not rest.startswith("/"):
            raise ConfigError(f"SQLite URL {url!r} must be sqlite:///relative or sqlite:////abs")
        path = rest[1:]  # sqlite:///rel -> "rel"; sqlite:////abs -> "/abs"
        return SQLiteBackend(path)
    if scheme in ("redis", "rediss", "unix", "redis+cluster"):
        from llmtally.storage.redis import RedisBackend

        return RedisBackend(url)
    raise ConfigError(f"unknown store URL scheme {scheme!r} in {url!r}")


def open_store(
    url: str | None = None, *, flush_interval_s: float = 0.05, max_pending: int = 1_000_000
) -> Store:
    """Open a store by URL (``None``: ``LLMTALLY_STORE``, else Redis from ``REDIS_HOST``, else
    SQLite at ``$XDG_DATA_HOME/llmtally/usage.db``).

    Raises:
        ConfigError: for a bad URL or argument.
    """
    if url is None:
        url = _default_url()
    return Store(
        _backend_for(url), url=url, flush_interval_s=flush_interval_s, max_pending=max_pending
    )


_registry_lock = threading.Lock()
_registry: dict[str, Store] = {}
_default: Store | None = None
_live_stores: weakref.WeakSet[Store] = weakref.WeakSet()


def default_store() -> Store:
    """The process-wide store from the environment (opened on first use)."""
    global _default
    store = _default
    if store is None:
        with _registry_lock:
            if _default is None:
                _default = open_store()
            store = _default
    return store


def resolve_store(store: Store | str | None) -> Store:
    """A ``store=`` argument: a :class:`Store`, a URL (one shared store per URL), or ``None``
    for the default store."""
    if store is None:
        return default_store()
    if isinstance(store, Store):
        return store
    if isinstance(store, str):
        with _registry_lock:
            found = _registry.get(store)
            if found is None or found.closed:
                found = _registry[store] = open_store(store)
            return found
    raise ConfigError(f"store must be a Store, a URL or None, not {type(store).__name__}")


def _reset_after_fork() -> None:
    global _default
    for store in list(_live_stores):
        store._at_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


@atexit.register
def _flush_at_exit() -> None:
    """Write what is pending in every open store before the interpreter goes."""
    stores = [s for s in list(_live_stores) if not s.closed and (s.ledger.pending or s._retry)]
    if not stores:
        return

    async def close_all() -> None:
        await asyncio.gather(*(s.aclose(timeout_s=5.0) for s in stores))

    try:
        asyncio.run(close_all())
    except Exception as exc:
        logger.error("flushing usage at exit failed: %r", exc)
