"""The per-call cost of ``OpenTelemetryHandler`` (a span and three histogram records per call).

Same run, same harness (benches/harness.py): the empty harness (the floor), ``llm_call`` with no
handler, ``llm_call`` with ``OpenTelemetryHandler`` on the real SDK (spans to a dropping exporter
through ``SimpleSpanProcessor``, metrics aggregated in memory), and the same span and histogram
work written by hand against the SDK, the least any OpenTelemetry instrumentation pays. For
scale, BENCHMARKS.md measured OpenTelemetry's own openai instrumentation at about 505 us added
per call.

    pytest benches/bench_otel.py --benchmark-only
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

from harness import (
    BATCH,
    PER_WORKER,
    USAGE,
    WORKERS,
    Call,
    bench_concurrent,
    bench_sequential,
    llm_call,
)
from peers import empty_harness
from results import record

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.trace import SpanKind

import llmtally
from llmtally.otel import OpenTelemetryHandler


class _Drop(SpanExporter):
    """Counts exported spans and keeps none (an exporter costs the same for every system)."""

    def __init__(self) -> None:
        self.spans = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.spans += len(spans)
        return SpanExportResult.SUCCESS


def _providers() -> tuple[TracerProvider, MeterProvider, _Drop]:
    exporter = _Drop()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    return tracer_provider, meter_provider, exporter


def no_handler(concurrent: bool) -> tuple[Call, Any]:
    return llm_call(llmtally.CallbackManager([]), concurrent), None


def with_otel_handler(concurrent: bool) -> tuple[Call, Any]:
    tracer_provider, meter_provider, exporter = _providers()
    handler = OpenTelemetryHandler(tracer_provider, meter_provider)
    return llm_call(llmtally.CallbackManager([handler]), concurrent), exporter


def sdk_by_hand(concurrent: bool) -> tuple[Call, Any]:
    """The span (same attributes) and the three histogram records, written directly."""
    tracer_provider, meter_provider, exporter = _providers()
    tracer = tracer_provider.get_tracer("bench")
    meter = meter_provider.get_meter("bench")
    tokens = meter.create_histogram("gen_ai.client.token.usage", "{token}")
    duration = meter.create_histogram("gen_ai.client.operation.duration", "s")
    start = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.system": "openai",
        "gen_ai.request.model": "gpt-4o",
        "llmtally.request_id": "req-1",
    }
    end = {
        "gen_ai.response.model": "gpt-4o",
        "gen_ai.usage.input_tokens": USAGE["prompt_tokens"],
        "gen_ai.usage.output_tokens": USAGE["completion_tokens"],
        "llmtally.cost_usd": 0.000105,
        "llmtally.cost_source": "table",
        "llmtally.estimated": False,
    }
    base = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-4o",
        "gen_ai.response.model": "gpt-4o",
    }
    inputs = {**base, "gen_ai.token.type": "input"}
    outputs = {**base, "gen_ai.token.type": "output"}
    sleep = asyncio.sleep

    async def call() -> None:
        span = tracer.start_span("chat gpt-4o", kind=SpanKind.CLIENT, attributes=dict(start))
        if concurrent:
            await sleep(0)
        span.set_attributes(end)
        span.end()
        duration.record(0.001, base)
        tokens.record(USAGE["prompt_tokens"], inputs)
        tokens.record(USAGE["completion_tokens"], outputs)

    return call, exporter


SYSTEMS: dict[str, Callable[[bool], Any]] = {
    "empty": lambda concurrent: (empty_harness(concurrent), None),
    "llm_call-no-handler": no_handler,
    "llmtally": with_otel_handler,
    "otel-sdk-by-hand": sdk_by_hand,
}


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.mark.benchmark(group="OTel-sequential")
@pytest.mark.parametrize("system", list(SYSTEMS))
def test_otel_sequential(benchmark: Any, loop: asyncio.AbstractEventLoop, system: str) -> None:
    call, exporter = SYSTEMS[system](False)
    bench_sequential(benchmark, loop, call, rounds=20)
    record("OTel-sequential", system, benchmark.stats.stats.median / BATCH)
    if exporter is not None:
        assert exporter.spans == 21 * BATCH  # warm-up + 20 rounds, one span per call


@pytest.mark.benchmark(group="OTel-concurrent")
@pytest.mark.parametrize("system", list(SYSTEMS))
def test_otel_concurrent(benchmark: Any, loop: asyncio.AbstractEventLoop, system: str) -> None:
    call, exporter = SYSTEMS[system](True)
    bench_concurrent(benchmark, loop, call)
    record("OTel-concurrent", system, benchmark.stats.stats.median / (WORKERS * PER_WORKER))
    if exporter is not None:
        assert exporter.spans == 5 * WORKERS * PER_WORKER
