"""``TokenUsageRepository``: per-user, per-cycle usage, limits and resets over any store."""

from __future__ import annotations

from typing import Any

from llmtally._native import LEDGER_FIELDS, pusd_to_usd
from llmtally.errors import BadInput
from llmtally.storage import Store, resolve_store
from llmtally.storage.keys import current_cycle, parse_key, usage_key, validate_cycle
from llmtally.storage.keys import validate_user_id as _validate_user_id

__all__ = ["TokenUsageRepository", "usage_stats"]

_MAX_TOKENS = 10**12


def _tokens(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < _MAX_TOKENS:
        raise BadInput(f"{name} must be an int in [0, 10**12), not {value!r}")
    return value


def _cycle(cycle_start_date: str | None) -> str:
    return current_cycle() if cycle_start_date is None else validate_cycle(cycle_start_date)


def usage_stats(fields: dict[str, int], user_id: str, cycle_start_date: str) -> dict[str, Any]:
    """The public usage dict of one user and cycle from a hash's fields."""
    stats: dict[str, Any] = {name: int(fields.get(name, 0)) for name in LEDGER_FIELDS}
    stats["cost_usd"] = pusd_to_usd(stats["cost_pusd"])
    stats["limit"] = fields.get("limit")
    stats["cycle_start_date"] = cycle_start_date
    stats["user_id"] = user_id
    return stats


class TokenUsageRepository:
    """Usage per user and billing cycle (``cycle_start_date``, default the first day of the
    current UTC month) in a store (``None``: the default store; a URL; or a ``Store``).

    Increments go through the in-process ledger and reach the backend with the next flush; reads
    include this process's unflushed deltas. All methods are async.
    """

    def __init__(self, store: Store | str | None = None) -> None:
        self.store = resolve_store(store)

    def _key(self, user_id: str, cycle_start_date: str | None) -> tuple[str, str]:
        cycle = _cycle(cycle_start_date)
        return usage_key(_validate_user_id(user_id), cycle), cycle

    async def increment_total_usage(
        self, user_id: str, tokens: int, cycle_start_date: str | None = None
    ) -> None:
        """Add ``tokens`` to the user's ``total_tokens``."""
        key, _ = self._key(user_id, cycle_start_date)
        self.store.add(key, total_tokens=_tokens(tokens, "tokens"))

    async def increment_detailed_usage(
        self,
        user_id: str,
        prompt_tokens: int,
        completion_tokens: int,
        cycle_start_date: str | None = None,
    ) -> None:
        """Add prompt and completion tokens (and their sum to ``total_tokens``)."""
        key, _ = self._key(user_id, cycle_start_date)
        prompt = _tokens(prompt_tokens, "prompt_tokens")
        completion = _tokens(completion_tokens, "completion_tokens")
        self.store.add(
            key,
            total_tokens=prompt + completion,
            prompt_tokens=prompt,
            completion_tokens=completion,
        )

    async def get_usage_stats(
        self, user_id: str, cycle_start_date: str | None = None
    ) -> dict[str, Any]:
        """``total_tokens``, ``prompt_tokens``, ``completion_tokens``, ``cached_tokens``,
        ``cache_write_tokens``, ``reasoning_tokens``, ``cost_usd`` (and ``cost_pusd``),
        ``calls``, ``errors``, ``timeouts``, ``cycle_start_date``, ``limit`` (``None`` when
        unset), ``user_id``; missing counts are 0.

        Raises:
            StoreUnavailable: when the backend cannot be reached.
        """
        key, cycle = self._key(user_id, cycle_start_date)
        return usage_stats(await self.store.read(key), user_id, cycle)

    async def set_usage_limit(
        self, user_id: str, limit: int | None, cycle_start_date: str | None = None
    ) -> None:
        """Set the user's token limit for the cycle (``None`` removes it). Written at once."""
        if limit is not None:
            limit = _tokens(limit, "limit")
        key, _ = self._key(user_id, cycle_start_date)
        await self.store.set_fields(key, {"limit": limit})

    async def check_usage_limit(
        self, user_id: str, cycle_start_date: str | None = None, *, requested: int = 0
    ) -> dict[str, Any]:
        """Whether the user may use ``requested`` more tokens this cycle: ``allowed``,
        ``exceeded`` (usage at or past the limit), ``limit``, ``current_usage``, ``remaining``
        (``None`` when there is no limit)."""
        requested = _tokens(requested, "requested")
        stats = await self.get_usage_stats(user_id, cycle_start_date)
        used = stats["total_tokens"]
        limit = stats["limit"]
        if limit is None:
            allowed, exceeded, remaining = True, False, None
        else:
            allowed = used + requested <= limit
            exceeded = used >= limit
            remaining = max(0, limit - used)
        return {
            "user_id": user_id,
            "cycle_start_date": stats["cycle_start_date"],
            "limit": limit,
            "current_usage": used,
            "used": used,
            "requested": requested,
            "remaining": remaining,
            "exceeded": exceeded,
            "allowed": allowed,
        }

    async def reset_usage(self, user_id: str, cycle_start_date: str | None = None) -> None:
        """Zero the user's usage counters for the cycle (pending deltas included); the limit
        stays."""
        key, _ = self._key(user_id, cycle_start_date)
        await self.store.flush()
        await self.store.set_fields(key, dict.fromkeys(LEDGER_FIELDS))

    async def list_usage(self, cycle_start_date: str | None = None) -> list[dict[str, Any]]:
        """Every user's usage dict in the store (one cycle, or all cycles)."""
        if cycle_start_date is not None:
            cycle_start_date = validate_cycle(cycle_start_date)
        out = []
        for key in await self.store.usage_keys(cycle_start_date):
            parsed = parse_key(key)
            if parsed is None:
                continue
            user_id, cycle = parsed
            out.append(usage_stats(await self.store.read(key), user_id, cycle))
        return out
