"""Pure-Python equivalents of the Rust pieces, for the same-run comparisons in bench_core.py."""

from __future__ import annotations

import math
import threading
from typing import Any

N = 10


class PyLedger:
    """A dict of counter lists behind a lock (what one would write without the extension)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data: dict[str, list[int]] = {}

    def add(self, key: str, *deltas: int) -> None:
        with self._lock:
            acc = self._data.get(key)
            if acc is None:
                self._data[key] = list(deltas) + [0] * (N - len(deltas))
                return
            for i, v in enumerate(deltas):
                acc[i] += v

    def drain(self) -> list[tuple[str, list[int]]]:
        with self._lock:
            data, self._data = self._data, {}
        return list(data.items())


class PyHistogram:
    """Log-linear buckets in a dict, percentiles by walking the sorted buckets."""

    SUB = 64

    def __init__(self) -> None:
        self.buckets: dict[int, int] = {}
        self.count = 0

    def record(self, value: float) -> None:
        v = round(value * 1000)
        if v < self.SUB:
            i = v
        else:
            exp = v.bit_length() - 1
            shift = exp - 6
            i = (shift + 1) * self.SUB + ((v >> shift) - self.SUB)
        self.buckets[i] = self.buckets.get(i, 0) + 1
        self.count += 1

    def percentile(self, p: float) -> int:
        rank = max(1, math.ceil(p / 100 * self.count))
        seen = 0
        for i in sorted(self.buckets):
            seen += self.buckets[i]
            if seen >= rank:
                return i
        return -1


class PyPrices:
    """Integer pico-USD cost with the same rules."""

    def __init__(self, input_price: float, output_price: float, cache_read: float) -> None:
        self.input = round(input_price * 1e6)
        self.output = round(output_price * 1e6)
        self.cache_read = round(cache_read * 1e6)
        self.cache_write = self.input
        self.reasoning = self.output

    def usage_cost_pusd(self, usage: Any) -> int | None:
        prompt, completion = usage.prompt_tokens, usage.completion_tokens
        if prompt is None or completion is None:
            return None
        return self.cost_pusd(
            prompt,
            completion,
            usage.cached_tokens,
            usage.cache_write_tokens,
            usage.reasoning_tokens,
        )

    def cost_pusd(
        self, prompt: int, completion: int, cached: int, write: int, reasoning: int
    ) -> int:
        if cached + write > prompt or reasoning > completion:
            raise ValueError("subsets exceed their whole")
        return (
            (prompt - cached - write) * self.input
            + cached * self.cache_read
            + write * self.cache_write
            + (completion - reasoning) * self.output
            + reasoning * self.reasoning
        )


FIELDS = (
    "total_tokens",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "cost_pusd",
    "calls",
    "errors",
    "timeouts",
)


def lua_chunks(entries: list[tuple[str, list[int]]], max_keys: int = 512) -> list[Any]:
    """The same Lua call arguments as ``Batch.lua_chunks`` (single node), in Python."""
    out: list[Any] = []
    for start in range(0, len(entries), max_keys):
        keys: list[str] = []
        args: list[Any] = []
        for key, counters in entries[start : start + max_keys]:
            pairs = [(f, v) for f, v in zip(FIELDS, counters, strict=True) if v]
            keys.append(key)
            args.append(len(pairs))
            for f, v in pairs:
                args.append(f)
                args.append(v)
        out.append(("llmtally:flushed", keys, args))
    return out
