"""What every storage backend provides to the store (internal)."""

from __future__ import annotations

from typing import Protocol

from llmtally._core import Batch
from llmtally.storage._limits import BudgetState, RateResult

__all__ = ["Backend", "LimitsBackend", "SET_FIELDS"]

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


class LimitsBackend(Backend, Protocol):
    """A backend that also keeps budget reservations and rate windows (all three built-in ones).

    Each method is one atomic step across processes sharing the backend; the reference
    semantics are in ``storage/_limits.py``. ``now_ms`` is the caller's clock (tests); ``None``
    means the backend's own (Redis: the server's ``TIME``).
    """

    async def budget(
        self,
        key: str,
        *,
        reserve: tuple[str, int, int, int] | None = None,
        settle: tuple[str, int, int, int] | None = None,
        release: list[str] | None = None,
        limits: tuple[int, int] = (-1, -1),
        adjust: tuple[int, int] = (0, 0),
        now_ms: int | None = None,
    ) -> BudgetState:
        """Drop expired reservations of ``key``, apply ``release``, ``settle`` (``(id, tokens,
        pusd, ttl_ms)``, unconditional) and ``reserve`` (same shape, only when ``total_tokens``
        / ``cost_pusd`` plus open reservations plus ``adjust`` plus it stay within ``limits``;
        -1: no limit), write ``reserved_tokens`` / ``reserved_pusd``, return what it saw."""
        ...

    async def claim_flag(self, key: str, field: str) -> bool:
        """Set ``field`` of ``key`` to 1 unless set; True for the one caller that set it."""
        ...

    async def rate_acquire(
        self,
        keys: list[str],
        member: str,
        weights: list[int],
        limits: list[int],
        window_ms: int,
        now_ms: int | None = None,
    ) -> RateResult:
        """Add ``member`` (weight ``weights[i]``) to every sliding window ``keys[i]`` when each
        stays within ``limits[i]``; else add nothing and say how long to wait."""
        ...

    async def rate_update(self, key: str, member: str, old_weight: int, weight: int | None) -> None:
        """Change the weight of ``member`` (now ``old_weight``) in window ``key`` (``None``
        removes it)."""
        ...
