"""OpenTelemetryHandler against the real OpenTelemetry SDK (in-memory span exporter and metric
reader, passed explicitly: the global providers are never set)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.trace import SpanKind, StatusCode

import llmtally
from llmtally import CallbackAbort, CallbackManager, ConfigError
from llmtally.otel import (
    DURATION_BUCKETS,
    TOKEN_BUCKETS,
    OpenTelemetryHandler,
    provider_name,
)

MESSAGES = [{"role": "user", "content": "a secret prompt"}]
USAGE = {
    "usage": {
        "prompt_tokens": 1200,
        "completion_tokens": 300,
        "prompt_tokens_details": {"cached_tokens": 1024},
    }
}


@dataclass
class Otel:
    spans: InMemorySpanExporter
    reader: InMemoryMetricReader
    tracer_provider: TracerProvider
    meter_provider: MeterProvider

    def handler(self, **options: Any) -> OpenTelemetryHandler:
        return OpenTelemetryHandler(self.tracer_provider, self.meter_provider, **options)

    def finished(self) -> list[ReadableSpan]:
        return list(self.spans.get_finished_spans())

    def by_name(self) -> dict[str, ReadableSpan]:
        return {span.name: span for span in self.finished()}

    def points(self, name: str) -> list[Any]:
        data = self.reader.get_metrics_data()
        found = []
        for rm in data.resource_metrics if data else ():
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    if metric.name == name:
                        found.extend(metric.data.data_points)
        return found

    def metric(self, name: str) -> Any:
        data = self.reader.get_metrics_data()
        for rm in data.resource_metrics if data else ():
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    if metric.name == name:
                        return metric
        raise AssertionError(f"no metric {name}")


@pytest.fixture
def otel() -> Iterator[Otel]:
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    yield Otel(spans, reader, tracer_provider, meter_provider)
    tracer_provider.shutdown()
    meter_provider.shutdown()


def _parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def _span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.span_id


# -- LLM calls -------------------------------------------------------------------------------


async def test_llm_call_span_has_the_genai_attributes(otel: Otel) -> None:
    handler = otel.handler()
    manager = CallbackManager([handler])
    async with manager.llm_call(
        MESSAGES, provider="openai", model="gpt-4o", user_id="alice", request_id="req-1"
    ) as call:
        call.set_response(USAGE)
    [span] = otel.finished()
    assert span.name == "chat gpt-4o"
    assert span.kind is SpanKind.CLIENT
    assert span.status.status_code is StatusCode.UNSET
    assert span.instrumentation_scope is not None
    assert span.instrumentation_scope.name == "llmtally"
    assert dict(span.attributes or {}) == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.system": "openai",
        "gen_ai.request.model": "gpt-4o",
        "gen_ai.response.model": "gpt-4o",
        "gen_ai.usage.input_tokens": 1200,
        "gen_ai.usage.output_tokens": 300,
        "gen_ai.usage.cache_read.input_tokens": 1024,
        "enduser.id": "alice",
        "llmtally.request_id": "req-1",
        "llmtally.cost_usd": pytest.approx(call.response["cost_estimate"]),
        "llmtally.cost_source": "table",
        "llmtally.estimated": False,
    }
    assert call.response["cost_estimate"] > 0
    assert handler.open_spans == 0


async def test_llm_call_metrics_follow_the_conventions(otel: Otel) -> None:
    manager = CallbackManager([otel.handler()])
    async with manager.llm_call(MESSAGES, provider="openai", model="gpt-4o") as call:
        call.set_response(USAGE)
    usage = otel.metric("gen_ai.client.token.usage")
    assert usage.unit == "{token}"
    base = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-4o",
        "gen_ai.response.model": "gpt-4o",
    }
    points = {p.attributes["gen_ai.token.type"]: p for p in usage.data.data_points}
    assert set(points) == {"input", "output"}
    assert dict(points["input"].attributes) == {**base, "gen_ai.token.type": "input"}
    assert (points["input"].sum, points["input"].count) == (1200, 1)
    assert (points["output"].sum, points["output"].count) == (300, 1)
    assert tuple(points["input"].explicit_bounds) == TOKEN_BUCKETS
    duration = otel.metric("gen_ai.client.operation.duration")
    assert duration.unit == "s"
    [point] = duration.data.data_points
    assert dict(point.attributes) == base
    assert point.count == 1
    assert 0 <= point.sum < 1
    assert tuple(point.explicit_bounds) == DURATION_BUCKETS
    assert otel.points("gen_ai.client.operation.time_to_first_chunk") == []


async def test_a_stream_records_time_to_first_chunk_and_marks_estimates(otel: Otel) -> None:
    manager = CallbackManager([otel.handler()])
    async with manager.llm_call(MESSAGES, provider="anthropic", model="claude-x") as call:
        await call.chunk("Hel")
        await call.chunk("lo")
    [span] = otel.finished()
    attrs = dict(span.attributes or {})
    assert span.name == "chat claude-x"
    assert attrs["gen_ai.provider.name"] == "anthropic"
    assert attrs["llmtally.estimated"] is True
    ttft = attrs["gen_ai.response.time_to_first_chunk"]
    assert ttft == pytest.approx(call.response["time_to_first_token"])
    [point] = otel.points("gen_ai.client.operation.time_to_first_chunk")
    assert point.count == 1
    assert point.sum == pytest.approx(ttft)
    assert otel.metric("gen_ai.client.operation.time_to_first_chunk").unit == "s"
    # estimated usage is still usage (llmtally never reports a silent 0)
    tokens = {
        p.attributes["gen_ai.token.type"]: p.sum for p in otel.points("gen_ai.client.token.usage")
    }
    assert tokens == {
        "input": call.response["prompt_tokens"],
        "output": call.response["completion_tokens"],
    }


async def test_a_provider_body_through_the_manager_gives_the_response_id_and_reason(
    otel: Otel,
) -> None:
    manager = CallbackManager([otel.handler()])
    body = {
        "id": "chatcmpl-7",
        "model": "gpt-4o",
        "choices": [{"index": 0, "message": {"content": "Paris."}, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 3},
    }
    async with manager.llm_call(MESSAGES, provider="openai", model="gpt-4o") as call:
        call.set_response(body)
    [span] = otel.finished()
    attrs = dict(span.attributes or {})
    assert attrs["gen_ai.response.id"] == "chatcmpl-7"
    assert attrs["gen_ai.response.finish_reasons"] == ("length",)


async def test_response_id_finish_reasons_and_cache_writes_when_the_response_has_them(
    otel: Otel,
) -> None:
    handler = otel.handler()
    kwargs = {"provider": "bedrock", "model": "claude-3", "run_id": "r1", "request_id": "r1"}
    await handler.on_llm_start(MESSAGES, **kwargs)
    response = {
        "tokens_used": 70,
        "prompt_tokens": 50,
        "completion_tokens": 20,
        "cached_tokens": 10,
        "cache_write_tokens": 30,
        "reasoning_tokens": 5,
        "model": "claude-3-20250101",
        "id": "msg_123",
        "finish_reasons": ["end_turn"],
        "cost_estimate": None,
        "estimated": False,
    }
    await handler.on_llm_end(response, **kwargs, duration_ms=250.0)
    [span] = otel.finished()
    attrs = dict(span.attributes or {})
    assert attrs["gen_ai.provider.name"] == "aws.bedrock"
    assert attrs["gen_ai.response.model"] == "claude-3-20250101"
    assert attrs["gen_ai.response.id"] == "msg_123"
    assert attrs["gen_ai.response.finish_reasons"] == ("end_turn",)
    assert attrs["gen_ai.usage.cache_read.input_tokens"] == 10
    assert attrs["gen_ai.usage.cache_creation.input_tokens"] == 30
    assert attrs["gen_ai.usage.reasoning.output_tokens"] == 5
    assert "llmtally.cost_usd" not in attrs  # unknown price: no cost, not 0
    [point] = otel.points("gen_ai.client.operation.duration")
    assert point.sum == pytest.approx(0.25)


def test_provider_names_map_to_the_well_known_values() -> None:
    assert [
        provider_name(p)
        for p in ("openai", "Azure", "azure_ai", "vertex_ai", "gemini", "mistral", "xai", "")
    ] == [
        "openai",
        "azure.ai.openai",
        "azure.ai.inference",
        "gcp.vertex_ai",
        "gcp.gemini",
        "mistral_ai",
        "x_ai",
        "unknown",
    ]


# -- nesting ---------------------------------------------------------------------------------


async def test_llm_call_in_tool_in_agent_nests_spans(otel: Otel) -> None:
    manager = CallbackManager([otel.handler()])
    async with manager.agent_run("book a flight", user_id="bob", agent_name="planner") as run:
        await run.step("search")
        await run.step("answer")
        async with manager.tool_call("search", {"q": "CDG"}, tool_call_id="call_1") as tool:
            async with manager.llm_call(MESSAGES, provider="openai", model="gpt-4o") as call:
                call.set_response(USAGE)
            tool.set_result({"flights": 3})
        run.set_result("booked")
    spans = otel.by_name()
    assert set(spans) == {"invoke_agent planner", "execute_tool search", "chat gpt-4o"}
    agent, tool_span, llm = (
        spans["invoke_agent planner"],
        spans["execute_tool search"],
        spans["chat gpt-4o"],
    )
    assert agent.kind is SpanKind.INTERNAL
    assert tool_span.kind is SpanKind.INTERNAL
    assert llm.kind is SpanKind.CLIENT
    assert _parent_id(agent) is None
    assert _parent_id(tool_span) == _span_id(agent)
    assert _parent_id(llm) == _span_id(tool_span)
    assert len({s.context.trace_id for s in spans.values() if s.context}) == 1
    assert dict(agent.attributes or {}) == {
        "gen_ai.operation.name": "invoke_agent",
        "gen_ai.agent.name": "planner",
        "enduser.id": "bob",
        "llmtally.agent.steps": 2,
    }
    assert dict(tool_span.attributes or {}) == {
        "gen_ai.operation.name": "execute_tool",
        "gen_ai.tool.name": "search",
        "gen_ai.tool.call.id": "call_1",
        "enduser.id": "bob",
    }
    assert llm.attributes is not None and llm.attributes["enduser.id"] == "bob"


async def test_chain_and_retrieval_spans(otel: Otel) -> None:
    manager = CallbackManager([otel.handler()])
    async with manager.chain_run("rag") as chain:
        async with manager.retrieval("flights", data_source_id="kb-1") as retrieval:
            retrieval.set_result(["doc"])
        async with manager.retrieval("more") as retrieval:
            retrieval.set_result([])
        chain.set_result("ok")
    spans = otel.by_name()
    assert set(spans) == {"invoke_workflow rag", "retrieval kb-1", "retrieval"}
    workflow = spans["invoke_workflow rag"]
    assert workflow.kind is SpanKind.INTERNAL
    assert dict(workflow.attributes or {}) == {
        "gen_ai.operation.name": "invoke_workflow",
        "gen_ai.workflow.name": "rag",
    }
    assert spans["retrieval kb-1"].kind is SpanKind.CLIENT
    assert dict(spans["retrieval kb-1"].attributes or {}) == {
        "gen_ai.operation.name": "retrieval",
        "gen_ai.data_source.id": "kb-1",
    }
    for name in ("retrieval kb-1", "retrieval"):
        assert _parent_id(spans[name]) == _span_id(workflow)


async def test_the_outermost_scope_nests_under_the_current_opentelemetry_span(otel: Otel) -> None:
    manager = CallbackManager([otel.handler()])
    tracer = otel.tracer_provider.get_tracer("app")
    with tracer.start_as_current_span("handle request") as request:
        async with manager.agent_run("goal"):
            async with manager.llm_call(MESSAGES, model="gpt-4o") as call:
                call.set_response(USAGE)
        async with manager.llm_call(MESSAGES, model="gpt-4o") as call:
            call.set_response(USAGE)
    spans = otel.finished()
    assert [s.name for s in spans] == [
        "chat gpt-4o",
        "invoke_agent",
        "chat gpt-4o",
        "handle request",
    ]
    request_id = request.get_span_context().span_id
    agent = spans[1]
    assert _parent_id(agent) == request_id
    assert _parent_id(spans[0]) == _span_id(agent)
    assert _parent_id(spans[2]) == request_id
    assert {s.context.trace_id for s in spans if s.context} == {request.get_span_context().trace_id}


async def test_parallel_manager_keeps_the_nesting(otel: Otel) -> None:
    manager = CallbackManager([otel.handler(), llmtally.CostTracker()], parallel=True)
    async with manager.agent_run("goal", agent_name="a"):
        async with manager.llm_call(MESSAGES, model="gpt-4o") as call:
            call.set_response(USAGE)
    spans = otel.by_name()
    assert _parent_id(spans["chat gpt-4o"]) == _span_id(spans["invoke_agent a"])


# -- errors ----------------------------------------------------------------------------------


async def test_a_failed_call_is_an_error_span_and_an_error_duration(otel: Otel) -> None:
    handler = otel.handler()
    manager = CallbackManager([handler])
    with pytest.raises(ValueError, match="provider said no"):
        async with manager.llm_call(MESSAGES, provider="openai", model="gpt-4o"):
            raise ValueError("provider said no")
    [span] = otel.finished()
    assert span.name == "chat gpt-4o"
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "provider said no"
    assert span.attributes is not None
    assert span.attributes["error.type"] == "ValueError"
    assert "gen_ai.usage.input_tokens" not in span.attributes
    [event] = span.events
    assert event.name == "exception"
    assert event.attributes is not None
    assert event.attributes["exception.type"] == "ValueError"
    [point] = otel.points("gen_ai.client.operation.duration")
    assert dict(point.attributes) == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-4o",
        "error.type": "ValueError",
    }
    assert otel.points("gen_ai.client.token.usage") == []
    assert handler.open_spans == 0


async def test_failed_tool_and_agent_spans(otel: Otel) -> None:
    handler = otel.handler()
    manager = CallbackManager([handler])
    with pytest.raises(KeyError):
        async with manager.agent_run("goal", agent_name="a"):
            async with manager.tool_call("lookup", {}):
                raise KeyError("missing")
    spans = otel.by_name()
    for name in ("invoke_agent a", "execute_tool lookup"):
        assert spans[name].status.status_code is StatusCode.ERROR
        assert spans[name].attributes is not None
        assert spans[name].attributes["error.type"] == "KeyError"
    assert handler.open_spans == 0


class Refuse(llmtally.AsyncCallbackHandler):
    async def on_llm_start(self, messages: Any, **kwargs: Any) -> None:
        raise CallbackAbort("over budget")


async def test_a_call_aborted_by_another_handler_ends_the_span(otel: Otel) -> None:
    handler = otel.handler()
    manager = CallbackManager([handler, Refuse()])
    with pytest.raises(CallbackAbort):
        async with manager.llm_call(MESSAGES, model="gpt-4o"):
            pytest.fail("the body must not run")
    [span] = otel.finished()
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes is not None
    assert span.attributes["error.type"] == "CallbackAbort"
    assert span.attributes["llmtally.aborted"] is True
    assert handler.open_spans == 0


# -- scale and leaks ---------------------------------------------------------------------------


async def test_500_concurrent_calls_nest_and_sum_exactly(otel: Otel) -> None:
    handler = otel.handler()
    manager = CallbackManager([handler])
    n = 500

    async def one(i: int) -> None:
        async with manager.agent_run("goal", agent_name=f"agent-{i}", user_id=f"u{i}"):
            await asyncio.sleep(0)
            async with manager.tool_call(f"tool-{i}", {}):
                await asyncio.sleep(0)
                async with manager.llm_call(
                    MESSAGES, provider="openai", model="gpt-4o", request_id=f"req-{i}"
                ) as call:
                    await asyncio.sleep(0)
                    call.set_response({"prompt_tokens": 100 + i, "completion_tokens": 1 + i % 7})

    await asyncio.gather(*(one(i) for i in range(n)))
    spans = otel.finished()
    assert len(spans) == 3 * n
    by_id = {_span_id(s): s for s in spans}
    llm_spans = [s for s in spans if s.name == "chat gpt-4o"]
    assert len(llm_spans) == n
    for llm in llm_spans:
        assert llm.attributes is not None
        i = int(str(llm.attributes["llmtally.request_id"]).removeprefix("req-"))
        tool = by_id[_parent_id(llm)]  # type: ignore[index]
        assert tool.name == f"execute_tool tool-{i}"
        agent = by_id[_parent_id(tool)]  # type: ignore[index]
        assert agent.name == f"invoke_agent agent-{i}"
        assert _parent_id(agent) is None
        assert llm.attributes["enduser.id"] == f"u{i}"
        assert llm.attributes["gen_ai.usage.input_tokens"] == 100 + i
        assert len({s.context.trace_id for s in (llm, tool, agent) if s.context}) == 1
    assert len({s.context.trace_id for s in spans if s.context}) == n
    tokens = {
        p.attributes["gen_ai.token.type"]: p for p in otel.points("gen_ai.client.token.usage")
    }
    assert tokens["input"].sum == sum(100 + i for i in range(n))
    assert tokens["output"].sum == sum(1 + i % 7 for i in range(n))
    assert tokens["input"].count == tokens["output"].count == n
    [duration] = otel.points("gen_ai.client.operation.duration")
    assert duration.count == n
    assert handler.open_spans == 0
    assert handler.errors == 0
    assert handler._metric_attrs.keys() == {("openai", "gpt-4o", "gpt-4o")}


async def test_starts_without_ends_never_leak(otel: Otel) -> None:
    handler = otel.handler(max_open_spans=10)
    for i in range(25):
        await handler.on_llm_start(MESSAGES, run_id=f"r{i}", model="m")
    assert handler.open_spans == 10
    assert handler.evicted == 15
    evicted = otel.finished()
    assert len(evicted) == 15
    assert all(s.attributes and s.attributes["llmtally.incomplete"] is True for s in evicted)
    assert handler.end_open_spans() == 10
    assert handler.open_spans == 0
    assert len(otel.finished()) == 25
    # an end for an evicted span still makes a (late) span, never an error
    await handler.on_llm_end({"prompt_tokens": 1, "completion_tokens": 1}, run_id="r0")
    assert handler.errors == 0
    assert len(otel.finished()) == 26


async def test_a_span_whose_end_never_comes_is_ended_after_its_ttl(otel: Otel) -> None:
    handler = otel.handler(span_ttl_s=0.05)
    manager = CallbackManager([handler])
    # a request counted already is not started again: no span waits for it
    for _ in range(2):
        async with manager.llm_call(MESSAGES, model="gpt-4o", request_id="same") as call:
            call.set_response(USAGE)
    assert handler.open_spans == 0
    # a start whose end never comes (a process that lost the call)
    await handler.on_llm_start(MESSAGES, model="gpt-4o", run_id="lost", request_id="lost")
    assert handler.open_spans == 1
    await asyncio.sleep(0.06)
    async with manager.llm_call(MESSAGES, model="gpt-4o") as call:
        call.set_response(USAGE)
    assert handler.open_spans == 0
    assert handler.evicted == 1
    assert (
        sum(1 for s in otel.finished() if s.attributes and "llmtally.incomplete" in s.attributes)
        == 1
    )


async def test_no_state_is_left_after_calls_and_scopes(otel: Otel) -> None:
    handler = otel.handler()
    manager = CallbackManager([handler])
    for _ in range(50):
        async with manager.chain_run("c"):
            async with manager.retrieval("q") as r:
                r.set_result([])
            async with manager.llm_call(MESSAGES, model="gpt-4o") as call:
                call.set_response(USAGE)
        with pytest.raises(RuntimeError):
            async with manager.llm_call(MESSAGES, model="gpt-4o"):
                raise RuntimeError
    assert handler.open_spans == 0
    # metric attributes are cached per (provider, model, response model), not per call
    assert set(handler._metric_attrs) == {
        ("unknown", "gpt-4o", "gpt-4o"),
        ("unknown", "gpt-4o", None),
    }


# -- content -----------------------------------------------------------------------------------


async def _one_of_each(manager: CallbackManager) -> None:
    async with manager.agent_run("a secret goal", agent_name="a") as run:
        async with manager.tool_call("search", {"q": "a secret query"}) as tool:
            tool.set_result({"found": "a secret result"})
        async with manager.retrieval("a secret question") as retrieval:
            retrieval.set_result([{"id": "d1", "score": 0.9}])
        async with manager.llm_call(MESSAGES, provider="openai", model="gpt-4o") as call:
            call.set_response(
                {
                    "choices": [{"message": {"role": "assistant", "content": "a secret answer"}}],
                    "usage": {"prompt_tokens": 5, "completion_tokens": 3},
                }
            )
        run.set_result("a secret outcome")


async def test_no_prompt_or_completion_text_by_default(otel: Otel) -> None:
    await _one_of_each(CallbackManager([otel.handler()]))
    spans = otel.finished()
    assert len(spans) == 4
    for span in spans:
        for value in (span.attributes or {}).values():
            assert "secret" not in str(value)
        assert not span.events


async def test_capture_content_records_the_conventions_content_attributes(otel: Otel) -> None:
    await _one_of_each(CallbackManager([otel.handler(capture_content=True)]))
    spans = {s.name: dict(s.attributes or {}) for s in otel.finished()}
    llm = spans["chat gpt-4o"]
    assert json.loads(llm["gen_ai.input.messages"]) == [
        {"role": "user", "parts": [{"type": "text", "content": "a secret prompt"}]}
    ]
    assert json.loads(llm["gen_ai.output.messages"]) == [
        {"role": "assistant", "parts": [{"type": "text", "content": "a secret answer"}]}
    ]
    tool = spans["execute_tool search"]
    assert json.loads(tool["gen_ai.tool.call.arguments"]) == {"q": "a secret query"}
    assert json.loads(tool["gen_ai.tool.call.result"]) == {"found": "a secret result"}
    retrieval = spans["retrieval"]
    assert retrieval["gen_ai.retrieval.query.text"] == "a secret question"
    assert json.loads(retrieval["gen_ai.retrieval.documents"]) == [{"id": "d1", "score": 0.9}]
    agent = spans["invoke_agent a"]
    assert json.loads(agent["gen_ai.input.messages"])[0]["parts"][0]["content"] == "a secret goal"
    assert json.loads(agent["gen_ai.output.messages"])[0]["parts"][0]["content"] == (
        "a secret outcome"
    )


# -- bad input, direct calls, configuration ---------------------------------------------------


async def test_bad_input_never_raises(otel: Otel) -> None:
    handler = otel.handler()
    await handler.on_llm_start("not messages", run_id="x")  # type: ignore[arg-type]
    await handler.on_llm_end("not a dict", run_id="x", duration_ms="soon")  # type: ignore[arg-type]
    await handler.on_llm_start(MESSAGES, run_id=["unhashable"])
    await handler.on_agent_step("s", run_id=["unhashable"])
    await handler.on_llm_error(ValueError("x"), run_id=["unhashable"])
    await handler.on_tool_end(None, None, run_id=None)  # type: ignore[arg-type]
    await handler.on_llm_end(
        {"prompt_tokens": -1, "completion_tokens": "3", "model": 7, "time_to_first_token": -1.0},
        run_id="y",
        duration_ms=float("inf"),
        ttft_ms=float("nan"),
    )
    assert handler.errors == 0
    assert handler.open_spans == 0
    spans = otel.finished()
    assert [s.name for s in spans] == ["chat", "chat", "execute_tool", "chat"]
    assert spans[1].status.status_code is StatusCode.ERROR  # the unhashable run id, by repr
    assert "gen_ai.usage.input_tokens" not in (spans[3].attributes or {})
    assert "gen_ai.response.model" not in (spans[3].attributes or {})
    assert "gen_ai.response.time_to_first_chunk" not in (spans[3].attributes or {})
    assert otel.points("gen_ai.client.operation.time_to_first_chunk") == []


async def test_a_failure_inside_the_handler_is_counted_not_raised(
    otel: Otel, caplog: pytest.LogCaptureFixture
) -> None:
    handler = otel.handler()

    class Unreadable(dict[str, Any]):
        def get(self, key: str, default: Any = None) -> Any:
            raise RuntimeError("broken mapping")

    await handler.on_llm_start(MESSAGES, run_id="r")
    await handler.on_llm_end(Unreadable(), run_id="r")
    assert handler.errors == 1
    assert "OpenTelemetryHandler.on_llm_end failed" in caplog.text
    assert handler.open_spans == 0
    assert len(otel.finished()) == 1  # the span is still ended


async def test_a_handler_called_directly_without_a_start_still_makes_a_span(otel: Otel) -> None:
    handler = otel.handler()
    before = time.time_ns()
    await handler.on_llm_end(
        {"prompt_tokens": 7, "completion_tokens": 2, "model": "gpt-4o"},
        model="gpt-4o",
        provider="openai",
        duration_ms=1500.0,
    )
    [span] = otel.finished()
    assert span.name == "chat gpt-4o"
    assert span.start_time is not None and span.end_time is not None
    assert span.start_time <= before - 1_400_000_000
    assert span.end_time - span.start_time == pytest.approx(1.5e9, rel=0.05)
    assert span.attributes is not None
    assert span.attributes["gen_ai.usage.input_tokens"] == 7


async def test_without_an_sdk_the_global_providers_are_used_and_nothing_breaks() -> None:
    handler = OpenTelemetryHandler()  # the (no-op) global providers
    manager = CallbackManager([handler])
    async with manager.llm_call(MESSAGES, model="gpt-4o") as call:
        call.set_response(USAGE)
    assert handler.errors == 0
    assert handler.open_spans == 0
    assert not isinstance(trace.get_tracer_provider(), TracerProvider)


@pytest.mark.parametrize(
    "options",
    [
        {"capture_content": "yes"},
        {"max_open_spans": 0},
        {"max_open_spans": True},
        {"span_ttl_s": 0},
        {"span_ttl_s": "1"},
    ],
)
def test_bad_configuration_raises_config_error(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        OpenTelemetryHandler(**options)


def test_lazy_export_from_llmtally() -> None:
    assert llmtally.OpenTelemetryHandler is OpenTelemetryHandler
    with pytest.raises(AttributeError):
        _ = llmtally.NoSuchName  # type: ignore[attr-defined]


def test_import_llmtally_does_not_import_opentelemetry() -> None:
    code = (
        "import sys, llmtally; "
        "assert not [m for m in sys.modules if m.startswith('opentelemetry')], 'imported'; "
        "llmtally.CallbackManager([llmtally.CostTracker()]); "
        "assert not [m for m in sys.modules if m.startswith('opentelemetry')], 'imported'; "
        "llmtally.OpenTelemetryHandler; "
        "assert 'opentelemetry.trace' in sys.modules"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


# -- the LLM span is the current span ---------------------------------------------------------


async def test_spans_made_inside_the_call_nest_under_its_span_and_none_leaks(otel: Otel) -> None:
    """What the caller (or the SDK's HTTP instrumentation) traces inside the call is a child of
    the LLM span; after the call the previous span is current again."""
    handler = otel.handler()
    manager = CallbackManager([handler])
    tracer = otel.tracer_provider.get_tracer("app")
    with tracer.start_as_current_span("request") as outer:
        async with manager.llm_call(MESSAGES, provider="openai", model="gpt-4o") as call:
            with tracer.start_as_current_span("POST /v1/chat/completions"):
                pass
            call.set_response(USAGE)
        assert trace.get_current_span() is outer
    spans = otel.by_name()
    http, llm, request = spans["POST /v1/chat/completions"], spans["chat gpt-4o"], spans["request"]
    assert _parent_id(http) == _span_id(llm)
    assert _parent_id(llm) == _span_id(request)


async def test_a_call_ended_in_another_task_leaves_the_starting_context_alone(otel: Otel) -> None:
    handler = otel.handler()
    manager = CallbackManager([handler])
    call = manager.llm_call(MESSAGES, provider="openai", model="gpt-4o")

    async def begin() -> None:
        await call.start()
        assert trace.get_current_span().get_span_context().is_valid  # current in this task

    await asyncio.create_task(begin())
    assert not trace.get_current_span().get_span_context().is_valid  # not in ours
    await asyncio.create_task(call.end(USAGE))
    assert [s.name for s in otel.finished()] == ["chat gpt-4o"]
    assert handler.open_spans == 0
