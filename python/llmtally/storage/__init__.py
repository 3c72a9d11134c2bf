"""Stores: usage deltas kept in process (the Rust ledger) and written in the background.

``open_store(url)`` picks a backend by URL: ``memory://``, ``sqlite:///path`` (the embedded
default), ``redis://`` / ``rediss://`` / ``unix://``, ``redis+cluster://``. Handlers add deltas
in O(1) without awaiting anything; each store's flusher thread drains them every
``flush_interval_s`` (or sooner when many keys are pending) and writes each batch, every unit of
it applied once however often it is retried. A backend outage loses nothing: the batch is
retried with backoff while new deltas keep merging per key. Reads see the backend plus this
process's unflushed deltas.
"""

from llmtally.errors import StoreError, StoreUnavailable
from llmtally.storage.flusher import EARLY_FLUSH_KEYS
from llmtally.storage.store import (
    AsyncBackend,
    Store,
    close_all,
    default_store,
    flush_on_exit_signals,
    open_store,
    resolve_store,
)

__all__ = [
    "EARLY_FLUSH_KEYS",
    "AsyncBackend",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "close_all",
    "default_store",
    "flush_on_exit_signals",
    "open_store",
    "resolve_store",
]
