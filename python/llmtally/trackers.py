"""In-process trackers: tokens, cost, latency and streaming progress, audit records.

``TokenCounter``, ``CostTracker`` and ``PerformanceTracker`` keep their numbers in the Rust core
(a ledger of counters, HDR-style histograms) and take the manager's fast path: one synchronous
call per event, no coroutine. ``StreamingProgress`` and ``AuditLogger`` call user code or write
records. Shared handlers charge the call's ``user_id`` kwarg (``"anonymous"`` without one).
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

from llmtally._calls import is_timeout
from llmtally._names import OTHER, KeyTable, check_cap, name
from llmtally._native import (
    LEDGER_FIELDS,
    Ledger,
    PerfModel,
    PerfSink,
    Sink,
    TrackerSink,
    pusd_to_usd,
)
from llmtally.events import AsyncCallbackHandler
from llmtally.identity import user_of

__all__ = [
    "CostTracker",
    "PerformanceTracker",
    "StreamingProgress",
    "TokenCounter",
]

logger = logging.getLogger("llmtally")

_F = {name: i for i, name in enumerate(LEDGER_FIELDS)}

MAX_KEYS = 100_000
"""Default cap of (provider, model, user) entries in a ``TokenCounter``/``CostTracker``."""
MAX_BYTES = 48 * 1024 * 1024
"""Default cap of the memory those entries take (names included), in bytes."""
MAX_MODELS = 1_000
"""Default cap of models a ``PerformanceTracker`` keeps apart (each about 64 KiB)."""


def _overflow(key: tuple[str, ...]) -> tuple[str, ...]:
    """Where a (provider, model, user) past the caps is counted: its provider, ``"<other>"``."""
    return (key[0], OTHER, OTHER)


def _sum(
    ledger: Ledger,
    table: KeyTable,
    keep: Callable[[tuple[str, ...]], bool] | None = None,
) -> list[int]:
    total = [0] * len(LEDGER_FIELDS)
    if keep is None:
        slots: Any = ledger.keys()
    else:
        slots = [slot for key, slot in list(table.slots.items()) if keep(key)]
    for slot in slots:
        for i, v in enumerate(ledger.get(slot)):
            total[i] += v
    return total


def _group(ledger: Ledger, table: KeyTable, part: int) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for key, slot in list(table.slots.items()):
        acc = out.setdefault(key[part], [0] * len(LEDGER_FIELDS))
        for i, v in enumerate(ledger.get(slot)):
            acc[i] += v
    return {k: v for k, v in out.items() if any(v)}


def _counts(c: list[int]) -> dict[str, Any]:
    return {
        "total_tokens": c[_F["total_tokens"]],
        "prompt_tokens": c[_F["prompt_tokens"]],
        "completion_tokens": c[_F["completion_tokens"]],
        "cached_tokens": c[_F["cached_tokens"]],
        "cache_write_tokens": c[_F["cache_write_tokens"]],
        "reasoning_tokens": c[_F["reasoning_tokens"]],
        "cost_usd": pusd_to_usd(c[_F["cost_pusd"]]),
        "cost_pusd": c[_F["cost_pusd"]],
        "requests": c[_F["calls"]],
        "errors": c[_F["errors"]],
        "timeouts": c[_F["timeouts"]],
    }


class _LedgerTracker(AsyncCallbackHandler):
    """Counters per (provider, model, user) in a Rust ledger; one crossing per end event."""

    _llmtally_fast: ClassVar[dict[str, str | None]] = {
        "on_llm_end": "_track_end",
        "on_llm_error": "_track_error",
    }

    def __init__(self, *, max_keys: int = MAX_KEYS, max_bytes: int = MAX_BYTES) -> None:
        #: (provider, model, user) entries kept apart, and the memory they may take; past
        #: either, a new one is counted under (provider, ``"<other>"``, ``"<other>"``) and in
        #: :attr:`overflowed`, so memory stays bounded whatever the input.
        self.max_keys = check_cap("max_keys", max_keys)
        self.max_bytes = check_cap("max_bytes", max_bytes)
        self._ledger = Ledger()
        self._table = KeyTable(self.max_keys, self.max_bytes, _overflow)
        self.bad_input = 0

    @property
    def overflowed(self) -> int:
        """Calls counted under ``"<other>"`` because the caps were reached."""
        return self._table.overflowed

    def _llmtally_sink(self) -> Sink | None:
        # The core looks (provider, model, user) up in the table's slots; a key it does not
        # find goes through the table's admit (the caps are decided in one place).
        return TrackerSink(self._ledger, self._table.slots, self._admit)

    def _admit(self, key: tuple[Any, Any, Any]) -> str:
        """The slot of a (provider, model, user) the core did not find as given."""
        provider, model, user = key
        return self._table.slot(name(provider), name(model), user_of(user, self))

    def _key(self, kwargs: Mapping[str, Any], response: Any = None) -> str:
        model = kwargs.get("model")
        if type(response) is dict:
            model = response.get("model") or model
        return self._table.slot(
            name(kwargs.get("provider")), name(model), user_of(kwargs.get("user_id"), self)
        )

    def _track_end(self, response: Any, kwargs: Mapping[str, Any]) -> None:
        key = self._key(kwargs, response)
        if type(response) is dict:
            try:
                code = self._ledger.add_response(key, response)
            except (TypeError, ValueError, OverflowError):
                code = 2
            if code == 0:
                return
            if code == 1:  # usage skipped as bad input: the call itself is counted already
                self.bad_input += 1
                return
        self.bad_input += 1
        self._ledger.add(key, calls=1)

    def _track_call(self, kwargs: Mapping[str, Any]) -> None:
        """Count a finished call whose usage is not wanted (a request, no tokens)."""
        self._ledger.add(self._key(kwargs), calls=1)

    def _track_error(self, error: BaseException, kwargs: Mapping[str, Any]) -> None:
        if kwargs.get("aborted"):
            return
        if is_timeout(error):
            self._ledger.add(self._key(kwargs), timeouts=1)
        else:
            self._ledger.add(self._key(kwargs), errors=1)

    async def on_llm_end(self, response: dict[str, Any], **kwargs: Any) -> None:
        """Count the call's usage."""
        self._track_end(response, kwargs)

    async def on_llm_error(self, error: BaseException, **kwargs: Any) -> None:
        """Count the failure (``timeouts`` for a timeout)."""
        self._track_error(error, kwargs)

    def _totals(self) -> list[int]:
        return _sum(self._ledger, self._table)

    def reset(self) -> None:
        """Forget everything counted so far."""
        self._ledger.drain()
        self._table.clear()


class TokenCounter(_LedgerTracker):
    """Token totals across every call it sees (and per model: :meth:`by_model`).

    ``input_tokens``/``prompt_tokens`` include cache reads and writes; ``output_tokens``/
    ``completion_tokens`` include reasoning.
    """

    @property
    def prompt_tokens(self) -> int:
        return self._totals()[_F["prompt_tokens"]]

    @property
    def completion_tokens(self) -> int:
        return self._totals()[_F["completion_tokens"]]

    @property
    def total_tokens(self) -> int:
        return self._totals()[_F["total_tokens"]]

    @property
    def cached_tokens(self) -> int:
        return self._totals()[_F["cached_tokens"]]

    @property
    def cache_write_tokens(self) -> int:
        return self._totals()[_F["cache_write_tokens"]]

    @property
    def reasoning_tokens(self) -> int:
        return self._totals()[_F["reasoning_tokens"]]

    @property
    def requests(self) -> int:
        return self._totals()[_F["calls"]]

    input_tokens = prompt_tokens
    output_tokens = completion_tokens

    def by_model(self) -> dict[str, dict[str, Any]]:
        """Token counts per model."""
        return {m: _counts(c) for m, c in _group(self._ledger, self._table, 1).items()}

    def by_provider(self) -> dict[str, dict[str, Any]]:
        """Token counts per provider."""
        return {p: _counts(c) for p, c in _group(self._ledger, self._table, 0).items()}

    def summary(self) -> dict[str, Any]:
        """Every total at once."""
        return _counts(self._totals())


class CostTracker(_LedgerTracker):
    """Cost and tokens, in total and per provider, model and user.

    ``total_cost`` (USD) sums the priced calls only (exact: kept in integer pico-USD); calls of a
    model without a price are counted in ``unpriced_requests``, never dropped.
    """

    # Declared again: CostTracker's own _track_end is the built-in recorder of this class.
    _llmtally_fast: ClassVar[dict[str, str | None]] = _LedgerTracker._llmtally_fast

    def __init__(self, *, max_keys: int = MAX_KEYS, max_bytes: int = MAX_BYTES) -> None:
        super().__init__(max_keys=max_keys, max_bytes=max_bytes)
        self.unpriced_requests = 0
        self._unpriced_models: set[str] = set()

    def _track_end(self, response: Any, kwargs: Mapping[str, Any]) -> None:
        if type(response) is not dict or response.get("cost_estimate") is None:
            model = response.get("model") if type(response) is dict else kwargs.get("model")
            self._count_unpriced(model)
        super()._track_end(response, kwargs)

    def _count_unpriced(self, model: Any) -> None:
        """A call without a cost (no price for its model): counted, its model kept by name up
        to ``MAX_MODELS`` names. The core's fast path calls this for the calls it records."""
        self.unpriced_requests += 1
        if len(self._unpriced_models) < MAX_MODELS:
            self._unpriced_models.add(name(model))

    @property
    def total_cost(self) -> float:
        return pusd_to_usd(self._totals()[_F["cost_pusd"]])

    @property
    def total_cost_pusd(self) -> int:
        return self._totals()[_F["cost_pusd"]]

    @property
    def total_tokens(self) -> int:
        return self._totals()[_F["total_tokens"]]

    @property
    def request_count(self) -> int:
        return self._totals()[_F["calls"]]

    @property
    def unpriced_models(self) -> list[str]:
        return sorted(self._unpriced_models)

    def by_provider(self) -> dict[str, dict[str, Any]]:
        """Cost and tokens per provider."""
        return {p: _counts(c) for p, c in _group(self._ledger, self._table, 0).items()}

    def by_model(self) -> dict[str, dict[str, Any]]:
        """Cost and tokens per model."""
        return {m: _counts(c) for m, c in _group(self._ledger, self._table, 1).items()}

    def by_user(self) -> dict[str, dict[str, Any]]:
        """Cost and tokens per user."""
        return {u: _counts(c) for u, c in _group(self._ledger, self._table, 2).items()}

    def cost_for(
        self, *, provider: str | None = None, model: str | None = None, user_id: str | None = None
    ) -> float:
        """Cost (USD) of the calls matching every given filter."""

        def keep(parts: tuple[str, ...]) -> bool:
            return (
                (provider is None or parts[0] == provider)
                and (model is None or parts[1] == model)
                and (user_id is None or parts[2] == user_id)
            )

        return pusd_to_usd(_sum(self._ledger, self._table, keep)[_F["cost_pusd"]])

    def summary(self) -> dict[str, Any]:
        """Totals, with ``unpriced_requests``."""
        out = _counts(self._totals())
        out["total_cost"] = out["cost_usd"]
        out["request_count"] = out["requests"]
        out["unpriced_requests"] = self.unpriced_requests
        return out

    def reset(self) -> None:
        super().reset()
        self.unpriced_requests = 0
        self._unpriced_models.clear()


# ---------------------------------------------------------------------------------------------
# Performance.


_PERCENTILES = ("latency_p50_ms", "latency_p95_ms", "latency_p99_ms", "ttft_p50_ms", "ttft_p95_ms")


class PerformanceTracker(AsyncCallbackHandler):
    """Latency p50/p95/p99, time to first token, tokens/s and requests/min, per model, in
    fixed-memory histograms; regression detection against a saved baseline.

    >>> tracker = PerformanceTracker()
    >>> tracker.stats()["requests"]
    0
    """

    _llmtally_fast: ClassVar[dict[str, str | None]] = {
        "on_llm_end": "_track_end",
        "on_llm_error": "_track_error",
    }

    def __init__(
        self, *, clock: Callable[[], float] | None = None, max_models: int = MAX_MODELS
    ) -> None:
        # Per model: latency, ttft and tokens/s histograms, errors, requests per minute (each
        # about 64 KiB): at most max_models apart, later ones share "<other>".
        self.max_models = check_cap("max_models", max_models)
        self._models: dict[str, PerfModel] = {}
        #: Calls counted under ``"<other>"`` because ``max_models`` was reached.
        self.overflowed = 0
        # Without a clock, requests/min counts on the core's own monotonic clock.
        self._clock = clock

    def _llmtally_sink(self) -> Sink | None:
        # The manager's one-crossing recorder keeps time on the core's clock: only then.
        return PerfSink(self._models, self._admit) if self._clock is None else None

    def _now(self) -> float | None:
        return None if self._clock is None else self._clock()

    def _admit(self, model: Any) -> PerfModel:
        """The accumulators of a model not found by name: its own while there is room (a name
        over ``MAX_NAME_CHARS`` is ``"<other>"``), else the shared ``"<other>"`` entry."""
        key = name(model)
        found = self._models.get(key)
        if found is None:
            if len(self._models) >= self.max_models:
                self.overflowed += 1
                key = OTHER
                found = self._models.get(key)
            if found is None:
                found = self._models[key] = PerfModel()
        return found

    def _perf(self, model: Any) -> PerfModel:
        found = self._models.get(model) if type(model) is str else None
        return found if found is not None else self._admit(model)

    def _track_end(self, response: Any, kwargs: Mapping[str, Any]) -> None:
        duration_ms = kwargs.get("duration_ms")
        if not isinstance(duration_ms, int | float) or not duration_ms >= 0:
            return
        # One model's accumulators per call; the all-models view is merged when read.
        ttft_ms = kwargs.get("ttft_ms")
        completion = response.get("completion_tokens") if type(response) is dict else None
        self._perf(kwargs.get("model")).record(
            float(duration_ms),
            ttft_ms if isinstance(ttft_ms, int | float) else None,
            completion if type(completion) is int else None,
            self._now(),
        )

    def _track_error(self, error: BaseException, kwargs: Mapping[str, Any]) -> None:
        if kwargs.get("aborted"):
            return
        self._perf(kwargs.get("model")).record_error()

    async def on_llm_end(self, response: dict[str, Any], **kwargs: Any) -> None:
        """Record the call's latency, time to first token and speed."""
        self._track_end(response, kwargs)

    async def on_llm_error(self, error: BaseException, **kwargs: Any) -> None:
        """Count the failure."""
        self._track_error(error, kwargs)

    def _merged(self) -> PerfModel:
        merged = PerfModel()
        for perf in list(self._models.values()):
            merged.merge(perf)
        return merged

    def stats(self, model: str | None = None) -> dict[str, Any]:
        """``requests``, ``errors``, ``latency_p50_ms``/``p95``/``p99``/``max``, ``ttft_p50_ms``/
        ``p95``, ``tokens_per_s`` (median), ``requests_per_min``; for one model or all."""
        perf = self._merged() if model is None else self._models.get(model) or PerfModel()
        p50, p95, p99 = perf.latency.percentiles([50, 95, 99])
        t50, t95 = perf.ttft.percentiles([50, 95])
        return {
            "model": model,
            "requests": perf.latency.count,
            "errors": perf.errors,
            "latency_p50_ms": p50,
            "latency_p95_ms": p95,
            "latency_p99_ms": p99,
            "latency_max_ms": perf.latency.max,
            "latency_mean_ms": perf.latency.mean,
            "ttft_p50_ms": t50,
            "ttft_p95_ms": t95,
            "tokens_per_s": perf.tps.percentile(50),
            "requests_per_min": perf.requests_per_min(self._now()),
        }

    def models(self) -> list[str]:
        """Models seen so far."""
        return sorted(self._models)

    def baseline(self) -> dict[str, Any]:
        """A snapshot to compare later runs with (JSON-serializable)."""
        return {"all": self.stats(), "models": {m: self.stats(m) for m in self._models}}

    def save_baseline(self, path: str | Path) -> None:
        """Write :meth:`baseline` to a JSON file."""
        Path(path).write_text(json.dumps(self.baseline(), indent=2, sort_keys=True))

    def detect_regressions(
        self, baseline: Mapping[str, Any] | str | Path, *, tolerance: float = 0.2
    ) -> list[dict[str, Any]]:
        """Which percentiles got slower than ``baseline`` by more than ``tolerance`` (0.2 = 20%),
        and tokens/s that dropped by more than it. Each finding says the model, the metric, the
        baseline and current values and the relative change."""
        if isinstance(baseline, str | Path):
            baseline = json.loads(Path(baseline).read_text())
        if not isinstance(baseline, Mapping):
            raise TypeError("baseline must be a dict from baseline() or a path to one")
        findings = []
        scopes: list[tuple[str | None, Mapping[str, Any]]] = [(None, baseline.get("all", {}))]
        scopes += list(baseline.get("models", {}).items())
        for model, before in scopes:
            now = self.stats(model)
            for metric in _PERCENTILES:
                findings += _moved(model, metric, before.get(metric), now.get(metric), tolerance, 1)
            findings += _moved(
                model,
                "tokens_per_s",
                before.get("tokens_per_s"),
                now.get("tokens_per_s"),
                tolerance,
                -1,
            )
        return findings

    def regression_report(
        self, baseline: Mapping[str, Any] | str | Path, *, tolerance: float = 0.2
    ) -> str:
        """A human-readable list of :meth:`detect_regressions` (or "no regression")."""
        findings = self.detect_regressions(baseline, tolerance=tolerance)
        if not findings:
            return f"no regression beyond {tolerance:.0%}"
        lines = []
        for f in findings:
            scope = f["model"] or "all models"
            lines.append(
                f"{scope}: {f['metric']} {f['baseline']:.2f} -> {f['current']:.2f}"
                f" ({f['change']:+.0%})"
            )
        return "\n".join(lines)

    def reset(self) -> None:
        """Forget every sample."""
        self._models.clear()


def _moved(
    model: str | None, metric: str, before: Any, now: Any, tolerance: float, direction: int
) -> list[dict[str, Any]]:
    if not isinstance(before, int | float) or not isinstance(now, int | float) or before <= 0:
        return []
    change = (now - before) / before
    if change * direction > tolerance:
        return [
            {"model": model, "metric": metric, "baseline": before, "current": now, "change": change}
        ]
    return []


# ---------------------------------------------------------------------------------------------
# Streaming progress.

Callback = Callable[..., Any]


async def _call_user(fn: Callback, *args: Any) -> None:
    result = fn(*args)
    if inspect.isawaitable(result):
        await result


class _Stream:
    __slots__ = ("chunks", "first_at", "started_at", "texts")

    def __init__(self, now: float) -> None:
        self.started_at = now
        self.first_at: float | None = None
        self.chunks = 0
        self.texts: list[str] = []


class StreamingProgress(AsyncCallbackHandler):
    """Calls ``on_chunk(chunk)`` for every streamed chunk and ``on_complete(summary)`` once per
    call, with ``chunks``, ``completion_tokens`` (``estimated`` when the stream had no usage),
    ``ttft_ms``, ``duration_ms``, ``tokens_per_s`` and ``content``. Both may be plain callables or
    coroutine functions; their failures are isolated like any handler's.
    """

    def __init__(
        self,
        on_chunk: Callback | None = None,
        on_complete: Callback | None = None,
        *,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        for arg, fn in (("on_chunk", on_chunk), ("on_complete", on_complete)):
            if fn is not None and not callable(fn):
                from llmtally.errors import ConfigError

                raise ConfigError(f"{arg} must be callable, not {type(fn).__name__}")
        self._on_chunk = on_chunk
        self._on_complete = on_complete
        self._clock = clock
        self._streams: dict[Any, _Stream] = {}
        self.completed = 0

    def tokens_so_far(self, request_id: Any = None) -> int:
        """Chunks received so far in a call (the stream's own count)."""
        stream = self._streams.get(request_id)
        return 0 if stream is None else stream.chunks

    async def on_llm_start(self, messages: Any, **kwargs: Any) -> None:
        if len(self._streams) >= 100_000:
            self._streams.clear()
        self._streams[kwargs.get("request_id")] = _Stream(self._clock())

    async def on_llm_stream_chunk(self, chunk: Any, **kwargs: Any) -> None:
        stream = self._streams.get(kwargs.get("request_id"))
        if stream is None:
            stream = self._streams[kwargs.get("request_id")] = _Stream(self._clock())
        if stream.first_at is None:
            stream.first_at = self._clock()
        stream.chunks += 1
        if isinstance(chunk, str):
            stream.texts.append(chunk)
        if self._on_chunk is not None:
            await _call_user(self._on_chunk, chunk)

    async def on_llm_end(self, response: dict[str, Any], **kwargs: Any) -> None:
        stream = self._streams.pop(kwargs.get("request_id"), None)
        now = self._clock()
        self.completed += 1
        if self._on_complete is None:
            return
        duration_ms = kwargs.get("duration_ms")
        if duration_ms is None and stream is not None:
            duration_ms = (now - stream.started_at) * 1000.0
        ttft_ms = kwargs.get("ttft_ms")
        if ttft_ms is None and stream is not None and stream.first_at is not None:
            ttft_ms = (stream.first_at - stream.started_at) * 1000.0
        completion = response.get("completion_tokens") if isinstance(response, dict) else None
        content = response.get("content") if isinstance(response, dict) else None
        if content is None and stream is not None and stream.texts:
            content = "".join(stream.texts)
        tps = None
        if isinstance(completion, int) and isinstance(duration_ms, int | float):
            gen_ms = duration_ms - (ttft_ms or 0.0)
            tps = completion * 1000.0 / gen_ms if gen_ms > 0 else None
        summary = {
            "request_id": kwargs.get("request_id"),
            "chunks": stream.chunks if stream is not None else 0,
            "completion_tokens": completion,
            "estimated": bool(response.get("estimated")) if isinstance(response, dict) else True,
            "ttft_ms": ttft_ms,
            "duration_ms": duration_ms,
            "tokens_per_s": tps if tps is None or math.isfinite(tps) else None,
            "content": content,
        }
        await _call_user(self._on_complete, summary)

    async def on_llm_error(self, error: BaseException, **kwargs: Any) -> None:
        self._streams.pop(kwargs.get("request_id"), None)
