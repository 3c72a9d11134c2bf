"""The spool: a local directory where a store journals every delta before accepting it (opt-in,
``open_store(url, spool=path)``), so a process killed with SIGKILL loses nothing (internal).

The ledger writes the journal (``<flusher_id>.<seq>.journal``: the deltas of the batch it will
drain as ``seq``); the flusher removes a file once its batch is in the store. Each live flusher
holds an exclusive ``flock`` on ``<flusher_id>.lock``: files of a flusher whose lock nobody holds
belong to a process that died, and the next store opened on the spool (same store URL) writes
them as that flusher, batch by batch, so a batch that had been written before the crash is
skipped by the store's markers and none is counted twice. Several processes may share one spool
directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
from pathlib import Path

from llmtally.errors import ConfigError

__all__ = ["Spool"]

logger = logging.getLogger("llmtally")

_JOURNAL = re.compile(r"([0-9a-f]{16})\.(\d+)\.journal")


class Spool:
    """One spool directory, as one store (``url``) uses it."""

    def __init__(self, path: str | os.PathLike[str], url: str) -> None:
        self.path = Path(path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"spool directory {self.path}: {exc}") from None
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise ConfigError(f"spool directory {self.path} is not writable")
        #: Which store a journal was written for: files of other stores are left alone.
        self.tag = int.from_bytes(hashlib.blake2b(url.encode(), digest_size=8).digest(), "little")

    def claim(self, flusher_id: str) -> int:
        """Hold ``flusher_id``'s lock for as long as the returned descriptor is open."""
        fd = os.open(self.path / f"{flusher_id}.lock", os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd

    def journals(self, flusher_id: str) -> list[Path]:
        """``flusher_id``'s journal files, oldest batch first."""
        found = []
        for path in self.path.glob(f"{flusher_id}.*.journal"):
            m = _JOURNAL.fullmatch(path.name)
            if m:
                found.append((int(m.group(2)), path))
        return [p for _, p in sorted(found)]

    def orphans(self, own: str) -> list[tuple[str, int]]:
        """Flushers (not ``own``) with journals left and no live owner: ``(flusher_id, fd)``
        with their lock now held by the caller (release it with :meth:`done`)."""
        ids = set()
        for path in self.path.glob("*.journal"):
            m = _JOURNAL.fullmatch(path.name)
            if m and m.group(1) != own:
                ids.add(m.group(1))
        out = []
        for flusher_id in sorted(ids):
            try:
                fd = self.claim(flusher_id)
            except BlockingIOError:
                continue  # alive: its owner writes these itself
            except OSError as exc:
                logger.warning("spool %s: cannot lock %s: %s", self.path, flusher_id, exc)
                continue
            out.append((flusher_id, fd))
        return out

    def done(self, flusher_id: str, fd: int) -> None:
        """Release ``flusher_id``'s lock; remove it when none of its journals is left."""
        if not self.journals(flusher_id):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path / f"{flusher_id}.lock")
        os.close(fd)
