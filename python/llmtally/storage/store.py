"""The store: usage deltas kept in process (the Rust ledger), written by its flusher.

Handlers add deltas in O(1) without awaiting anything. The store's :class:`Flusher` thread
writes them in batches; backend operations called from async code run on the store's own I/O
threads (the memory backend's in the caller's thread), so nothing here is tied to an event loop
and no backend I/O ever runs on one.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import functools
import logging
import math
import os
import signal
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from types import FrameType, TracebackType
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

from llmtally import _runtime, metrics
from llmtally._observe import state as _observed
from llmtally.errors import ConfigError, StoreError, StoreUnavailable
from llmtally.storage._limits import LeaseState, RateResult
from llmtally.storage.base import Backend, LimitsBackend
from llmtally.storage.flusher import EARLY_FLUSH_KEYS, OPEN, Flusher, WriteListener
from llmtally.storage.keys import parse_key
from llmtally.storage.spool import Spool

__all__ = [
    "AsyncBackend",
    "Store",
    "default_store",
    "flush_on_exit_signals",
    "open_store",
    "resolve_store",
]

logger = logging.getLogger("llmtally")

T = TypeVar("T")

_CLOSE_TIMEOUT_S = 10.0
#: What interpreter exit spends, at most, writing every open store.
EXIT_TIMEOUT_S = 5.0
_HEALTH_TIMEOUT_S = 2.0
_IO_THREADS = 8


class Store:
    """Usage hashes behind an in-process ledger and a background flusher.

    Build one with :func:`open_store`. Close it with ``await store.aclose()`` (or ``close()``
    from sync code), or use it as ``async with open_store(url) as store:``; interpreter exit
    writes whatever an open store still holds, and so does :func:`flush_on_exit_signals` on
    SIGTERM.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        url: str,
        flush_interval_s: float = 0.05,
        max_pending: int = 1_000_000,
        spool: str | os.PathLike[str] | None = None,
    ) -> None:
        if isinstance(flush_interval_s, bool) or not isinstance(flush_interval_s, int | float):
            raise ConfigError("flush_interval_s must be a number of seconds")
        if not (0 < flush_interval_s < math.inf):
            raise ConfigError(
                f"flush_interval_s must be positive and finite, not {flush_interval_s}"
            )
        if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
            raise ConfigError(f"max_pending must be an int >= 1, not {max_pending!r}")
        _install_hooks()
        metrics.auto_enable()
        self.backend = backend
        self.url = url
        self.flush_interval_s = float(flush_interval_s)
        self.max_pending = max_pending
        self._flusher = Flusher(
            backend,
            flush_interval_s=self.flush_interval_s,
            max_pending=max_pending,
            label=f"{backend.name} {_redact(url)}",
            spool=None if spool is None else Spool(spool, url),
        )
        self.ledger = self._flusher.ledger
        self._io: concurrent.futures.ThreadPoolExecutor | None = None
        self._io_lock = threading.Lock()
        self.aio = AsyncBackend(self)
        _live_stores.add(self)
        _observed.stores.add(self)
        # A store dropped without being closed still writes what it holds (at interpreter exit,
        # close_all does it instead).
        _runtime.hand_off.prepare()  # (the finalizer hands its work to that thread)
        finalizer = weakref.finalize(self, _close_in_background, self._flusher)
        # (the typeshed of mypy < 2.4 lacks the attribute)
        finalizer.atexit = False  # type: ignore[misc, unused-ignore]
        if spool is not None:
            self._flusher.start()  # writes what a process that died left in the spool

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
        self._kicked(self.ledger.pending >= EARLY_FLUSH_KEYS)

    def _kick(self) -> None:
        """After a write into the ledger from outside :meth:`add`."""
        self._kicked(self.ledger.pending >= EARLY_FLUSH_KEYS)

    def keep_ticking(self) -> None:
        """Make sure the flusher runs, so the write listeners' ``tick`` comes every interval
        even while no usage is written (a limiter keeps the leases of long calls alive there).
        """
        if not self._flusher.running:
            self._flusher.start()

    def _kicked(self, urgent: bool) -> None:
        """After a write: make sure the flusher runs, and wake it when the ledger reached the
        early-flush size (``urgent``)."""
        flusher = self._flusher
        if not flusher.running:
            flusher.start()  # (a store closed and used again opens again)
        if urgent:
            flusher.wake()

    # -- running backend calls off the event loop ----------------------------------------------

    def _executor(self) -> concurrent.futures.ThreadPoolExecutor:
        io = self._io
        if io is None:
            with self._io_lock:
                io = self._io
                if io is None:
                    io = self._io = concurrent.futures.ThreadPoolExecutor(
                        max_workers=_IO_THREADS,
                        thread_name_prefix=f"llmtally-io {self.backend.name}",
                    )
        return io

    def in_background(self, fn: Callable[[], object]) -> None:
        """Run ``fn()`` soon on the store's I/O threads (never in the caller's: it may be a
        garbage collector's finalizer, on the event loop or inside a lock of the executor's).
        The caller must have called ``_runtime.hand_off.prepare()`` where it registered the
        finalizer. Its failure is logged at DEBUG."""

        def run() -> None:
            try:
                fn()
            except Exception as exc:
                logger.debug("%s: a background store task failed: %r", self.backend.name, exc)

        def submit() -> None:
            try:
                self._executor().submit(run)
            except RuntimeError:  # the executor is shut down: the store is closed
                logger.debug("%s: closed, a background store task was dropped", self.backend.name)

        _runtime.hand_off.put(submit)

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)``: on the store's I/O threads for a blocking backend, here for
        the memory one."""
        if not self.backend.blocking:
            return fn(*args, **kwargs)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor(), functools.partial(fn, *args, **kwargs))

    # -- flushing ------------------------------------------------------------------------------

    async def flush(self) -> bool:
        """Write everything pending now. Returns False (and keeps the deltas for a retry) when
        the backend fails; never raises for a backend error. Never blocks the event loop."""
        return await self._call(self._flusher.flush)

    def flush_sync(self, timeout_s: float | None = None) -> bool:
        """:meth:`flush` for sync code (blocks the calling thread)."""
        return self._flusher.flush(timeout_s)

    # -- limiters --------------------------------------------------------------------------------

    async def bounded_call(self, fn: Callable[[], T], timeout_s: float, *, locked: bool) -> T:
        """``fn()`` on the store's I/O threads (here for the memory backend), bounded by
        ``timeout_s`` (``StoreUnavailable`` past it: the thread is left to finish on its own).
        With ``locked``, while no batch is being written: what limiters use to read this
        process's unflushed deltas and change the backend in one consistent step."""
        flusher = self._flusher
        if not self.backend.blocking:
            return flusher.locked(fn, timeout_s) if locked else fn()
        loop = asyncio.get_running_loop()
        if locked:
            future = loop.run_in_executor(self._executor(), flusher.locked, fn, timeout_s)
        else:
            future = loop.run_in_executor(self._executor(), fn)
        try:
            async with asyncio.timeout(timeout_s):
                return await asyncio.shield(future)
        except TimeoutError:
            future.add_done_callback(_consume)
            raise StoreUnavailable(f"no answer from the store within {timeout_s}s") from None

    def add_write_listener(self, listener: WriteListener) -> None:
        """Tell ``listener`` of every batch of this process's deltas once it is written (kept
        by weak reference)."""
        self._flusher.listeners.add(listener)

    # -- reads ---------------------------------------------------------------------------------

    def local(self, key: str) -> dict[str, int]:
        """This process's unflushed deltas of ``key`` (including a batch awaiting retry)."""
        return self._flusher.local(key)

    def local_totals(self, key: str) -> tuple[int, int]:
        """``(total_tokens, cost_pusd)`` of this process's unflushed deltas of ``key``."""
        return self._flusher.local_totals(key)

    async def read(self, key: str) -> dict[str, int]:
        """The backend's fields of ``key`` plus this process's unflushed deltas, each delta
        counted once.

        Raises:
            StoreUnavailable: when the backend cannot be reached.
        """
        return await self._call(self._flusher.read, key)

    async def set_fields(self, key: str, fields: dict[str, int | None]) -> None:
        """Set plain fields (like ``limit``) now, bypassing the ledger."""
        await self._call(self.backend.set_fields, key, fields)

    async def delete(self, key: str) -> None:
        """Remove ``key`` from the backend (pending deltas are flushed first, so they go too)."""
        await self.flush()
        await self._call(self.backend.delete, key)

    async def usage_keys(self, cycle_start_date: str | None = None) -> list[str]:
        """Usage keys in the backend and in this process, of one cycle or all."""
        found = set(await self._call(self.backend.keys, cycle_start_date))
        for key in self.ledger.keys():  # noqa: SIM118 (a method of the ledger)
            if cycle_start_date is None or key.endswith(":" + cycle_start_date):
                found.add(key)
        retry = self._flusher.retry
        if retry is not None:
            found.update(k for k, _ in retry.items())
        return sorted(k for k in found if parse_key(k) is not None)

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether the store was closed (new deltas open it again)."""
        return self._flusher.closed

    @property
    def flush_failures(self) -> int:
        return self._flusher.flush_failures

    @property
    def batches_written(self) -> int:
        return self._flusher.batches_written

    @property
    def refused_writes(self) -> int:
        return self._flusher.refused_writes

    @property
    def flusher_id(self) -> str:
        return self._flusher.flusher_id

    async def health(self) -> dict[str, Any]:
        """``status`` (``"unhealthy"`` whenever the backend cannot be reached or the last flush
        attempt failed), ``ok``, ``backend``, ``pending_deltas``, ``oldest_pending_s``,
        ``last_flush_s_ago``, ``flush_failures``, ``last_error`` and more."""
        status = self._flusher.status()
        ok = status.pop("flush_ok")
        error = status["last_error"]
        try:
            async with asyncio.timeout(_HEALTH_TIMEOUT_S):
                await self._call(self.backend.ping)
        except (StoreError, TimeoutError) as exc:
            ok = False
            error = str(exc) or f"no answer within {_HEALTH_TIMEOUT_S}s"
        status["last_error"] = error
        return {
            "status": "healthy" if ok else "unhealthy",
            "ok": ok,
            "backend": self.backend.name,
            "url": _redact(self.url),
            **status,
            "errors": status["flush_failures"],
            "timeouts": 0,
        }

    async def aclose(self, timeout_s: float = _CLOSE_TIMEOUT_S) -> bool:
        """Stop the flusher and write everything pending (retrying until ``timeout_s``), then
        close the backend. Idempotent. Returns False when deltas could not be written."""
        if self.closed:
            return True
        await self._call(self._closing, timeout_s)
        ok = await self._call(self._flusher.close, timeout_s)
        self._shutdown_io()
        return ok

    def _closing(self, timeout_s: float) -> None:
        """Before the flusher closes: write the deltas, then let the limiters give back their
        leases (bounded by ``timeout_s``)."""
        listeners = list(self._flusher.listeners)
        if not listeners:
            return
        deadline = time.monotonic() + timeout_s
        self._flusher.flush(timeout_s)
        for listener in listeners:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                self._flusher.locked(listener.store_closing, left)
            except Exception as exc:  # never fails a close
                logger.debug("returning leases at close failed: %r", exc)

    def close(self, timeout_s: float = _CLOSE_TIMEOUT_S) -> bool:
        """:meth:`aclose` for sync code (blocks the calling thread)."""
        if self.closed:
            return True
        self._closing(timeout_s)
        ok = self._flusher.close(timeout_s)
        self._shutdown_io()
        return ok

    def _shutdown_io(self) -> None:
        with self._io_lock:
            io, self._io = self._io, None
        if io is not None:
            io.shutdown(wait=False)

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.shield(self.aclose())

    def _after_fork(self) -> None:
        # The child must not write the parent's deltas a second time, nor use its threads.
        self._flusher.after_fork()
        self.ledger = self._flusher.ledger
        self._io = None
        self._io_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<Store {self.backend.name} {_redact(self.url)} pending={self._flusher.pending}>"


class AsyncBackend:
    """A store's backend operations as awaitables that never block the event loop (they run
    on the store's I/O threads): what budget and rate limiters call."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.name = store.backend.name

    def _limits(self) -> LimitsBackend:
        backend = self._store.backend
        if not hasattr(backend, "lease"):
            raise ConfigError(f"the {backend.name} store does not support limits")
        return backend  # type: ignore[return-value]

    async def read(self, key: str) -> dict[str, int]:
        """The backend's fields of ``key`` (without this process's unflushed deltas)."""
        return await self._store._call(self._store.backend.read, key)

    async def lease(self, key: str, lease_id: str, **kwargs: Any) -> LeaseState:
        return await self._store._call(self._limits().lease, key, lease_id, **kwargs)

    async def claim_flag(self, key: str, field: str) -> bool:
        return await self._store._call(self._limits().claim_flag, key, field)

    async def rate_acquire(
        self,
        keys: list[str],
        member: str,
        weights: list[int],
        limits: list[int],
        window_ms: int,
        now_ms: int | None = None,
    ) -> RateResult:
        return await self._store._call(
            self._limits().rate_acquire, keys, member, weights, limits, window_ms, now_ms
        )

    async def rate_update(self, key: str, member: str, old_weight: int, weight: int | None) -> None:
        await self._store._call(self._limits().rate_update, key, member, old_weight, weight)


def _consume(future: asyncio.Future[Any]) -> None:
    """Read the outcome of an operation given up on (so no "never retrieved" warning)."""
    if not future.cancelled():
        future.exception()


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return parts._replace(netloc=netloc).geturl()
    return url


def _close_in_background(flusher: Flusher) -> None:
    """A store was garbage-collected while open: its flusher writes what is left and stops (on
    a thread started by the hand-off thread: this runs in a finalizer, see ``HandOff``)."""
    if flusher.closed:
        return

    def start() -> None:
        threading.Thread(
            target=flusher.close, args=(_CLOSE_TIMEOUT_S,), name="llmtally-close", daemon=True
        ).start()

    _runtime.hand_off.put(start)


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
    from pathlib import Path

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
        return SQLiteBackend(rest[1:])  # sqlite:///rel -> "rel"; sqlite:////abs -> "/abs"
    if scheme in ("redis", "rediss", "unix", "redis+cluster"):
        from llmtally.storage.redis import RedisBackend

        return RedisBackend(url)
    raise ConfigError(f"unknown store URL scheme {scheme!r} in {url!r}")


def open_store(
    url: str | None = None,
    *,
    flush_interval_s: float = 0.05,
    max_pending: int = 1_000_000,
    spool: str | os.PathLike[str] | None = None,
) -> Store:
    """Open a store by URL (``None``: ``LLMTALLY_STORE``, else Redis from ``REDIS_HOST``, else
    SQLite at ``$XDG_DATA_HOME/llmtally/usage.db``).

    Args:
        flush_interval_s: how often the flusher writes (a SIGKILL loses at most twice this).
        max_pending: keys held in memory while the store is unreachable; past it, with a spool,
            deltas wait in the spool's files instead.
        spool: a local directory (opt-in) where every delta is journaled before it is
            accepted: a SIGKILL loses nothing, the next store opened on it with the same URL
            writes what was left, once. Several processes may share one.

    Raises:
        ConfigError: for a bad URL or argument.
    """
    if url is None:
        url = _default_url()
    return Store(
        _backend_for(url),
        url=url,
        flush_interval_s=flush_interval_s,
        max_pending=max_pending,
        spool=spool,
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


# ---------------------------------------------------------------------------------------------
# Process lifecycle: fork, exit, exit signals. Installed with the first store.

_hooks_installed = False


def _install_hooks() -> None:
    global _hooks_installed
    if _hooks_installed:
        return
    _hooks_installed = True
    atexit.register(_flush_at_exit)
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_after_fork_in_child)


def _after_fork_in_child() -> None:
    global _registry_lock
    _registry_lock = threading.Lock()
    for store in list(_live_stores):
        store._after_fork()
    OPEN.clear()
    OPEN.update(s._flusher for s in list(_live_stores) if not s.closed)


def close_all(timeout_s: float = EXIT_TIMEOUT_S) -> bool:
    """Write what every open store holds and close it, within ``timeout_s`` in all (stores
    are closed one after another, each with a fair share of what is left of the time). True
    when every delta was written."""
    deadline = time.monotonic() + timeout_s
    # Each store gets a fair share of what is left, so one that is down does not spend the
    # time of those after it; later passes give the ones that failed (or that another thread
    # used again while they were being closed) the rest. close() never raises.
    for _ in range(4):
        todo = [flusher for flusher in list(OPEN) if not flusher.closed]
        if not todo:
            break
        for i, flusher in enumerate(todo):
            flusher.close(max(0.0, deadline - time.monotonic()) / (len(todo) - i))
        if time.monotonic() >= deadline:
            break
    return not any(not flusher.closed or flusher.pending for flusher in list(OPEN))


#: Called with a timeout before the stores are closed at exit (or on an exit signal): the
#: calls still open (a stream never finished) end first, so their usage is in the ledger.
_before_exit: list[Callable[[float], None]] = []


def before_exit(hook: Callable[[float], None]) -> None:
    """Run ``hook(timeout_s)`` at exit before the stores are written (internal)."""
    _before_exit.append(hook)
    _install_hooks()


def _stop(timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    for hook in _before_exit:
        try:
            hook(timeout_s / 4)
        except Exception as exc:
            logger.error("ending open calls at exit failed: %r", exc)
    return close_all(max(0.0, deadline - time.monotonic()))


def _flush_at_exit() -> None:
    """Interpreter exit: end the calls still open, write what every open store holds."""
    try:
        _stop(EXIT_TIMEOUT_S)
    except Exception as exc:
        logger.error("writing usage at exit failed: %r", exc)


def flush_on_exit_signals(
    signals: Iterable[int] = (signal.SIGTERM,), *, timeout_s: float = EXIT_TIMEOUT_S
) -> None:
    """Opt in to writing every open store when the process is told to stop (SIGTERM by default:
    what Kubernetes, systemd and docker send), then hand the signal over: to the handler that
    was installed before, or to the default action (for SIGTERM: the process ends with the
    signal's status). Call it from the main thread, after a framework installed its own
    handlers, if any.

    Python's default action for SIGTERM ends the process without running ``atexit``, so without
    this (or a framework that exits normally on SIGTERM, as gunicorn and uvicorn do) the usage
    of the last ``flush_interval_s`` is lost.
    """
    for signum in signals:
        previous = signal.getsignal(signum)

        def handler(sig: int, frame: FrameType | None, previous: Any = previous) -> None:
            # In a thread of its own: the signal may have interrupted this thread inside a
            # flush, whose lock it holds.
            writer = threading.Thread(
                target=_stop, args=(timeout_s,), name="llmtally-exit-signal", daemon=True
            )
            writer.start()
            writer.join(timeout_s)
            if callable(previous):
                previous(sig, frame)
            elif previous == signal.SIG_IGN:
                return
            else:  # SIG_DFL (or unknown): the default action, as if we had never been here
                signal.signal(sig, signal.SIG_DFL)
                os.kill(os.getpid(), sig)

        signal.signal(signum, handler)
