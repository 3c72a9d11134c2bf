"""What every storage backend provides to the store (internal)."""

from __future__ import annotations

from typing import Protocol

from llmtally._core import Batch

__all__ = ["Backend", "SET_FIELDS"]

#: Fields written with a plain set (configuration), never incremented by the flusher.
SET_FIELDS = ("limit",)


class Backend(Protocol):
    """A place where usage hashes live. All methods may raise ``StoreError``."""

    name: str

    async def apply(self, batch: Batch, flusher_id: str, seq: int) -> list[str]:
        """Apply ``batch`` once: a call with a ``(flusher_id, seq)`` already applied changes
        nothing. Returns the keys whose delta was refused (a counter would overflow)."""
        ...

    async def read(self, key: str) -> dict[str, int]:
        """All fields of ``key`` (empty when absent)."""
        ...

    async def set_fields(self, key: str, fields: dict[str, int | None]) -> None:
        """Set (or, for ``None``, delete) plain fields of ``key``."""
        ...

    async def delete(self, key: str) -> None:
        """Remove ``key`` entirely."""
        ...

    async def keys(self, cycle_start_date: str | None = None) -> list[str]:
        """Usage keys, of one cycle or all."""
        ...

    async def ping(self) -> None:
        """Raise when the backend cannot be reached."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...
