"""Prometheus metrics (the ``[prometheus]`` extra).

When ``prometheus_client`` is installed, the first manager (or store) registers one collector
in its default registry, never ``import llmtally`` itself (``LLMTALLY_METRICS=0`` turns that off;
``LLMTALLY_METRICS_PREFIX`` changes the ``llmtally_`` prefix). The series are read from
in-process counters when Prometheus scrapes, so recording costs a few counter increments per
handler call and nothing else:

- ``llmtally_callback_executions_total{callback_type, status}`` (``status``: ``success``,
  ``error`` or ``timeout``), ``llmtally_callback_duration_seconds{callback_type}`` (histogram),
  ``llmtally_callback_errors_total{callback_type, error_type}`` and ``llmtally_active_callbacks``:
  the seed's names and labels with the prefix, so its dashboards port by adding it.
  ``callback_type`` is the handler's class name, ``error_type`` the exception's.
- ``llmtally_tokens_total{type, provider, model}`` (``type``: ``prompt``, ``completion``,
  ``cache_read``, ``cache_write``, ``reasoning``), ``llmtally_cost_usd_total`` (all priced
  calls) and ``llmtally_model_cost_usd_total{provider, model}``,
  ``llmtally_llm_requests_total{provider, model, status}`` and the seed's per-user
  ``llmtally_token_usage_total{user_id, type}`` (``prompt``/``completion``; the first 10,000 users
  get their own series, later ones count under ``"<other>"``, and past 1,000 provider and model
  pairs a new model counts under ``"<other>"``).
- ``llmtally_flush_batches_total`` (batches written), ``llmtally_flush_failures_total``,
  ``llmtally_store_flushes_total{backend, status}`` and ``llmtally_pending_deltas``.

>>> import prometheus_client
>>> from llmtally.metrics import enable_metrics
>>> registry = prometheus_client.CollectorRegistry()
>>> _ = enable_metrics(registry, prefix="demo_")
>>> registry.get_sample_value("demo_active_callbacks") is not None
True
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
from collections.abc import Iterator
from typing import Any

from llmtally._native import LEDGER_FIELDS, pusd_to_usd
from llmtally._observe import state
from llmtally.errors import ConfigError

__all__ = ["DEFAULT_PREFIX", "LlmtallyCollector", "disable_metrics", "enable_metrics"]

logger = logging.getLogger("llmtally")

DEFAULT_PREFIX = "llmtally_"
#: Bucket bounds (seconds) of ``callback_duration_seconds``: callbacks take microseconds to
#: seconds, so the buckets start at 1 us.
DURATION_BUCKETS = (
    1e-6,
    2.5e-6,
    5e-6,
    1e-5,
    2.5e-5,
    5e-5,
    1e-4,
    2.5e-4,
    5e-4,
    1e-3,
    2.5e-3,
    5e-3,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
_F = {name: i for i, name in enumerate(LEDGER_FIELDS)}
_TOKEN_TYPES = (
    ("prompt", "prompt_tokens"),
    ("completion", "completion_tokens"),
    ("cache_read", "cached_tokens"),
    ("cache_write", "cache_write_tokens"),
    ("reasoning", "reasoning_tokens"),
)


class LlmtallyCollector:
    """A ``prometheus_client`` collector over llmtally's in-process counters."""

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        if not isinstance(prefix, str) or not all(c.isalnum() or c in "_:" for c in prefix):
            raise ConfigError(f"metrics prefix must be letters, digits, '_' or ':', not {prefix!r}")
        if prefix[:1].isdigit():
            raise ConfigError(f"metrics prefix must not start with a digit: {prefix!r}")
        self.prefix = prefix

    def describe(self) -> Iterator[Any]:
        return self.collect()

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        p = self.prefix
        executions = CounterMetricFamily(
            f"{p}callback_executions",
            "Callback handler executions by outcome",
            labels=["callback_type", "status"],
        )
        errors = CounterMetricFamily(
            f"{p}callback_errors",
            "Callback handler errors by exception class",
            labels=["callback_type", "error_type"],
        )
        durations = HistogramMetricFamily(
            f"{p}callback_duration_seconds",
            "Callback handler execution time",
            labels=["callback_type"],
        )
        bounds = list(DURATION_BUCKETS)
        for name, stats in sorted(state.handlers.items()):
            executions.add_metric([name, "success"], float(stats.successes))
            executions.add_metric([name, "error"], float(stats.errors))
            executions.add_metric([name, "timeout"], float(stats.timeouts))
            for error_type, n in sorted(stats.error_types.items()):
                errors.add_metric([name, error_type], float(n))
            counts, total, seconds = stats.durations.cumulative(bounds)
            buckets = [(_le(b), float(c)) for b, c in zip(bounds, counts, strict=True)]
            buckets.append(("+Inf", float(total)))
            durations.add_metric([name], buckets, seconds)
        yield executions
        yield errors
        yield durations
        active = GaugeMetricFamily(f"{p}active_callbacks", "Callback handlers registered")
        active.add_metric([], float(sum(len(m.handlers) for m in list(state.managers))))
        yield active

        tokens = CounterMetricFamily(
            f"{p}tokens", "LLM tokens by type", labels=["type", "provider", "model"]
        )
        cost = CounterMetricFamily(f"{p}cost_usd", "LLM cost in USD (priced calls)")
        model_cost = CounterMetricFamily(
            f"{p}model_cost_usd", "LLM cost in USD per model", labels=["provider", "model"]
        )
        requests = CounterMetricFamily(
            f"{p}llm_requests", "LLM calls by outcome", labels=["provider", "model", "status"]
        )
        per_user = CounterMetricFamily(
            f"{p}token_usage", "LLM tokens per user", labels=["user_id", "type"]
        )
        by_model: dict[tuple[str, str], list[int]] = {}
        by_user: dict[str, list[int]] = {}
        for (provider, model, user), c in state.llm_usage().items():
            for acc in (by_model.setdefault((provider, model), [0] * len(c)),
                        by_user.setdefault(user, [0] * len(c))):  # fmt: skip
                for i, v in enumerate(c):
                    acc[i] += v
        for (provider, model), c in sorted(by_model.items()):
            for label, field in _TOKEN_TYPES:
                tokens.add_metric([label, provider, model], float(c[_F[field]]))
            model_cost.add_metric([provider, model], pusd_to_usd(c[_F["cost_pusd"]]))
            requests.add_metric([provider, model, "success"], float(c[_F["calls"]]))
            requests.add_metric([provider, model, "error"], float(c[_F["errors"]]))
            requests.add_metric([provider, model, "timeout"], float(c[_F["timeouts"]]))
        for user, c in sorted(by_user.items()):
            per_user.add_metric([user, "prompt"], float(c[_F["prompt_tokens"]]))
            per_user.add_metric([user, "completion"], float(c[_F["completion_tokens"]]))
        yield tokens
        cost.add_metric([], pusd_to_usd(sum(c[_F["cost_pusd"]] for c in by_model.values())))
        yield cost
        yield model_cost
        yield requests
        yield per_user

        flushes = CounterMetricFamily(f"{p}flush_batches", "Batches written to stores")
        failures = CounterMetricFamily(f"{p}flush_failures", "Store writes that failed (retried)")
        by_backend = CounterMetricFamily(
            f"{p}store_flushes", "Store writes by backend and outcome", labels=["backend", "status"]
        )
        written = failed = 0
        for (backend, status), n in sorted(state.flush_batches.items()):
            by_backend.add_metric([backend, status], float(n))
            if status == "success":
                written += n
            else:
                failed += n
        flushes.add_metric([], float(written))
        failures.add_metric([], float(failed))
        yield flushes
        yield failures
        yield by_backend
        pending = GaugeMetricFamily(f"{p}pending_deltas", "Keys with deltas not yet flushed")
        pending.add_metric([], float(sum(s.ledger.pending for s in list(state.stores))))
        yield pending


def _le(bound: float) -> str:
    return repr(float(bound))


_enabled: dict[int, tuple[Any, LlmtallyCollector]] = {}


def enable_metrics(registry: Any = None, *, prefix: str | None = None) -> LlmtallyCollector:
    """Register llmtally's collector in ``registry`` (default: ``prometheus_client.REGISTRY``)
    and start recording executions, durations and usage. Idempotent per registry.

    Raises:
        ConfigError: for a bad prefix.
        ImportError: when ``prometheus_client`` is not installed (``pip install
            llmtally[prometheus]``).
    """
    import prometheus_client

    if registry is None:
        registry = prometheus_client.REGISTRY
    if prefix is None:
        prefix = os.environ.get("LLMTALLY_METRICS_PREFIX", DEFAULT_PREFIX)
    found = _enabled.get(id(registry))
    if found is not None and found[0] is registry:
        state.on = True
        return found[1]
    collector = LlmtallyCollector(prefix)
    registry.register(collector)
    _enabled[id(registry)] = (registry, collector)
    state.on = True
    return collector


def disable_metrics(registry: Any = None) -> None:
    """Unregister the collector from ``registry`` (default: the default registry); recording
    stops when no registry has it."""
    if registry is None:
        import prometheus_client

        registry = prometheus_client.REGISTRY
    found = _enabled.pop(id(registry), None)
    if found is not None and found[0] is registry:
        registry.unregister(found[1])
    state.on = bool(_enabled)


_auto_lock = threading.Lock()
_auto_done = False


def auto_enable() -> None:
    """Once per process, at the first manager or store (never at import): register in the
    default registry when ``prometheus_client`` is installed, unless ``LLMTALLY_METRICS`` is
    ``0``/``false``/``off``.

    Raises:
        ConfigError: for a bad ``LLMTALLY_METRICS_PREFIX``.
    """
    global _auto_done
    if _auto_done:
        return
    with _auto_lock:
        if _auto_done:
            return
        _auto_done = True
        setting = os.environ.get("LLMTALLY_METRICS", "").strip().lower()
        if setting in ("0", "false", "off", "no"):
            return
        if importlib.util.find_spec("prometheus_client") is None:
            if setting in ("1", "true", "on", "yes"):
                logger.warning("LLMTALLY_METRICS is on but prometheus_client is not installed")
            return
        try:
            enable_metrics()
        except ConfigError:
            raise
        except Exception as exc:  # a name taken by another collector: say so, never break
            logger.warning("llmtally metrics not registered in the default registry: %r", exc)
