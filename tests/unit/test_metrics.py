"""Prometheus metrics: the seed's callback series with the prefix, usage, flushes, scraped from
a real ``prometheus_client`` registry. Counters are process-wide, so each test uses its own
handler classes and model names, or compares before and after."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

prometheus_client = pytest.importorskip("prometheus_client")

from llmtally import (  # noqa: E402
    AsyncCallbackHandler,
    CallbackManager,
    ConfigError,
    CostTracker,
    PerformanceTracker,
    RedisTokenCallbackHandler,
    open_store,
    pricing,
    register_model,
)
from llmtally.metrics import disable_metrics, enable_metrics  # noqa: E402

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
def registry() -> Iterator[Any]:
    registry = prometheus_client.CollectorRegistry()
    enable_metrics(registry)
    yield registry
    disable_metrics(registry)


def value(registry: Any, name: str, **labels: str) -> float:
    found = registry.get_sample_value(name, labels)
    return 0.0 if found is None else float(found)


class MetricsCounted(AsyncCallbackHandler):
    async def on_llm_start(self, messages: Any, **kwargs: Any) -> None:
        pass

    async def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        pass


class MetricsFails(AsyncCallbackHandler):
    async def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        raise KeyError("boom")


class MetricsHangs(AsyncCallbackHandler):
    async def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        await asyncio.sleep(10)


async def test_callback_executions_errors_timeouts_and_durations(registry: Any) -> None:
    manager = CallbackManager([MetricsCounted(), MetricsFails(), MetricsHangs()], timeout=0.01)
    for _ in range(4):
        async with manager.llm_call(MESSAGES, model="gpt-4o") as call:
            call.set_response({"usage": {"prompt_tokens": 3, "completion_tokens": 2}})
    ex = "llmtally_callback_executions_total"
    # start and end of 4 calls
    assert value(registry, ex, callback_type="MetricsCounted", status="success") == 8
    assert value(registry, ex, callback_type="MetricsCounted", status="error") == 0
    assert value(registry, ex, callback_type="MetricsFails", status="error") == 4
    assert value(registry, ex, callback_type="MetricsFails", status="success") == 0
    assert value(registry, ex, callback_type="MetricsHangs", status="timeout") == 4
    assert value(registry, ex, callback_type="MetricsHangs", status="success") == 0
    assert (
        value(
            registry,
            "llmtally_callback_errors_total",
            callback_type="MetricsFails",
            error_type="KeyError",
        )
        == 4
    )
    hist = "llmtally_callback_duration_seconds"
    assert value(registry, f"{hist}_count", callback_type="MetricsCounted") == 8
    assert value(registry, f"{hist}_count", callback_type="MetricsHangs") == 4
    # The hang was cut at the 10 ms timeout: each took at least that, well under a second.
    hangs = value(registry, f"{hist}_sum", callback_type="MetricsHangs")
    assert 4 * 0.01 <= hangs < 4 * 1.0
    assert value(registry, f"{hist}_bucket", callback_type="MetricsHangs", le="0.005") == 0
    assert value(registry, f"{hist}_bucket", callback_type="MetricsHangs", le="+Inf") == 4
    health = await manager.health()
    assert health["errors"] == 4 and health["timeouts"] == 4


async def test_built_in_handlers_on_the_fast_path_are_counted(registry: Any) -> None:
    ex = "llmtally_callback_executions_total"
    before = value(registry, ex, callback_type="PerformanceTracker", status="success")
    store = open_store("memory://")
    manager = CallbackManager(
        [RedisTokenCallbackHandler("alice", store=store), CostTracker(), PerformanceTracker()]
    )
    for _ in range(5):
        async with manager.llm_call(MESSAGES, provider="openai", model="gpt-4o") as call:
            call.set_response({"usage": {"prompt_tokens": 3, "completion_tokens": 2}})
    after = value(registry, ex, callback_type="PerformanceTracker", status="success")
    assert after - before == 5  # one end event each; the start needs no work
    count = value(
        registry, "llmtally_callback_duration_seconds_count", callback_type="PerformanceTracker"
    )
    assert count >= 5
    assert value(registry, "llmtally_active_callbacks") >= 3
    await store.aclose()


async def test_tokens_cost_requests_and_per_user_usage(registry: Any) -> None:
    cost_before = value(registry, "llmtally_cost_usd_total")
    register_model("metrics-test-model", provider="acme", input_price=2.0, output_price=8.0)
    try:
        manager = CallbackManager([CostTracker()])
        for user in ("metrics-u1", "metrics-u1", "metrics-u2"):
            async with manager.llm_call(
                MESSAGES, provider="acme", model="metrics-test-model", user_id=user
            ) as call:
                call.set_response(
                    {
                        "usage": {
                            "prompt_tokens": 1000,
                            "completion_tokens": 300,
                            "prompt_tokens_details": {"cached_tokens": 200},
                            "completion_tokens_details": {"reasoning_tokens": 100},
                        }
                    }
                )
        with pytest.raises(RuntimeError):
            async with manager.llm_call(MESSAGES, provider="acme", model="metrics-test-model"):
                raise RuntimeError("provider down")
        with pytest.raises(TimeoutError):
            async with manager.llm_call(MESSAGES, provider="acme", model="metrics-test-model"):
                raise TimeoutError
    finally:
        with pricing._lock:
            pricing._registered.pop(("metrics-test-model", "acme"), None)
            pricing._generation += 1
            pricing._cache.clear()
    labels = {"provider": "acme", "model": "metrics-test-model"}
    tokens = "llmtally_tokens_total"
    assert value(registry, tokens, type="prompt", **labels) == 3000
    assert value(registry, tokens, type="completion", **labels) == 900
    assert value(registry, tokens, type="cache_read", **labels) == 600
    assert value(registry, tokens, type="cache_write", **labels) == 0
    assert value(registry, tokens, type="reasoning", **labels) == 300
    # 1000 prompt tokens (200 cached at the input price: no cache price given) at 2 USD/1M,
    # 300 completion tokens at 8 USD/1M, three times.
    assert value(registry, "llmtally_model_cost_usd_total", **labels) == pytest.approx(
        3 * (1000 * 2 + 300 * 8) / 1e6
    )
    assert value(registry, "llmtally_cost_usd_total") - cost_before == pytest.approx(
        3 * (1000 * 2 + 300 * 8) / 1e6
    )
    requests = "llmtally_llm_requests_total"
    assert value(registry, requests, status="success", **labels) == 3
    assert value(registry, requests, status="error", **labels) == 1
    assert value(registry, requests, status="timeout", **labels) == 1
    per_user = "llmtally_token_usage_total"
    assert value(registry, per_user, user_id="metrics-u1", type="prompt") == 2000
    assert value(registry, per_user, user_id="metrics-u1", type="completion") == 600
    assert value(registry, per_user, user_id="metrics-u2", type="prompt") == 1000


async def test_flush_batches_and_pending_deltas(registry: Any) -> None:
    flushes = "llmtally_store_flushes_total"
    before = value(registry, flushes, backend="memory", status="success")
    batches = value(registry, "llmtally_flush_batches_total")
    failures = value(registry, "llmtally_flush_failures_total")
    store = open_store("memory://", flush_interval_s=60)
    manager = CallbackManager([RedisTokenCallbackHandler("metrics-flush", store=store)])
    async with manager.llm_call(MESSAGES, model="gpt-4o") as call:
        call.set_response({"usage": {"prompt_tokens": 3, "completion_tokens": 2}})
    assert value(registry, "llmtally_pending_deltas") >= 1
    await store.flush()
    assert value(registry, flushes, backend="memory", status="success") == before + 1
    assert value(registry, "llmtally_flush_batches_total") == batches + 1
    assert value(registry, "llmtally_flush_failures_total") == failures  # the write succeeded
    await store.aclose()


def test_the_prefix_is_configurable() -> None:
    registry = prometheus_client.CollectorRegistry()
    enable_metrics(registry, prefix="gateway_")
    try:
        names = {m.name for m in registry.collect()}
        assert "gateway_callback_executions" in names
        assert "gateway_pending_deltas" in names
        assert not any(n.startswith("llmtally_") for n in names)
    finally:
        disable_metrics(registry)
    with pytest.raises(ConfigError):
        enable_metrics(prometheus_client.CollectorRegistry(), prefix="bad prefix")


def test_registered_in_the_default_registry_by_the_first_manager_unless_turned_off() -> None:
    """Not at import (``import llmtally`` has no side effects), at the first manager."""
    code = (
        "import llmtally, prometheus_client as p;"
        "name = 'llmtally_pending_deltas';"
        "before = p.REGISTRY.get_sample_value(name);"
        "llmtally.CallbackManager([]);"
        "print(before, p.REGISTRY.get_sample_value(name))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMTALLY_METRICS")}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.split() == ["None", "0.0"]
    env["LLMTALLY_METRICS"] = "0"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.split() == ["None", "None"]
    env["LLMTALLY_METRICS"] = "1"
    env["LLMTALLY_METRICS_PREFIX"] = "edge_"
    code = code.replace("llmtally_pending", "edge_pending")
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.split() == ["None", "0.0"]


def test_the_first_store_registers_the_collector_too() -> None:
    code = (
        "import llmtally, prometheus_client as p;"
        "llmtally.open_store('memory://');"
        "print(p.REGISTRY.get_sample_value('llmtally_pending_deltas'))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMTALLY_METRICS")}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.split() == ["0.0"]


async def test_odd_user_ids_never_break_a_call(registry: Any) -> None:
    manager = CallbackManager([CostTracker()])
    for user in (["not", "hashable"], 42, "", "ü"):
        async with manager.llm_call(MESSAGES, model="gpt-4o", user_id=user) as call:
            call.set_response({"usage": {"prompt_tokens": 3, "completion_tokens": 2}})
    per_user = "llmtally_token_usage_total"
    # The identity rule: a list is bad input and, like "", charged to "anonymous".
    assert value(registry, per_user, user_id="anonymous", type="prompt") >= 6
    assert value(registry, per_user, user_id="['not', 'hashable']", type="prompt") == 0
    assert (await manager.health())["bad_input"] == 1
    assert value(registry, per_user, user_id="42", type="prompt") >= 3
    assert value(registry, per_user, user_id="ü", type="completion") >= 2


class MetricsParallelA(AsyncCallbackHandler):
    async def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        await asyncio.sleep(0.002)


class MetricsParallelB(AsyncCallbackHandler):
    async def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        raise ValueError("b")


async def test_parallel_handlers_are_timed_and_counted_each(registry: Any) -> None:
    manager = CallbackManager([MetricsParallelA(), MetricsParallelB()], parallel=True)
    for _ in range(3):
        async with manager.llm_call(MESSAGES, model="gpt-4o") as call:
            call.set_response({"usage": {"prompt_tokens": 3, "completion_tokens": 2}})
    ex = "llmtally_callback_executions_total"
    assert value(registry, ex, callback_type="MetricsParallelA", status="success") == 3
    assert value(registry, ex, callback_type="MetricsParallelB", status="error") == 3
    hist = "llmtally_callback_duration_seconds"
    assert value(registry, f"{hist}_sum", callback_type="MetricsParallelA") >= 3 * 0.002
    assert value(registry, f"{hist}_count", callback_type="MetricsParallelB") == 3


async def test_model_labels_are_bounded(registry: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from llmtally import _observe

    monkeypatch.setattr(_observe, "MAX_MODELS", len(_observe.state.models) + 2)
    manager = CallbackManager([CostTracker()])
    for i in range(5):
        async with manager.llm_call(MESSAGES, provider="bounded", model=f"m{i}") as call:
            call.set_response({"usage": {"prompt_tokens": 1, "completion_tokens": 1}})
    tokens = "llmtally_tokens_total"
    assert value(registry, tokens, type="prompt", provider="bounded", model="m0") == 1
    assert value(registry, tokens, type="prompt", provider="bounded", model="m1") == 1
    assert value(registry, tokens, type="prompt", provider="bounded", model="<other>") == 3
