"""``OpenTelemetryHandler``: llmtally events as OpenTelemetry GenAI spans and usage metrics.

Needs only ``opentelemetry-api`` (the ``[otel]`` extra); the application brings the SDK and its
exporters. Names follow the OpenTelemetry GenAI semantic conventions (status: Development):

- an LLM call is a ``CLIENT`` span ``chat {gen_ai.request.model}`` with ``gen_ai.operation.name``,
  ``gen_ai.provider.name`` (and the older ``gen_ai.system``), ``gen_ai.request.model``,
  ``gen_ai.response.model``, ``gen_ai.usage.input_tokens`` / ``output_tokens`` (cache reads
  and writes and reasoning inside, as in llmtally's own counts),
  ``gen_ai.usage.cache_read.input_tokens``, ``gen_ai.usage.cache_creation.input_tokens``,
  ``gen_ai.usage.reasoning.output_tokens``,
  ``gen_ai.response.id`` and ``gen_ai.response.finish_reasons`` when the response dict has them,
  ``enduser.id``, plus ``llmtally.request_id``, ``llmtally.cost_usd``, ``llmtally.cost_source`` and
  ``llmtally.estimated``;
- agent runs are ``INTERNAL`` spans ``invoke_agent {gen_ai.agent.name}`` (the ``agent_name``
  context kwarg), tool calls ``INTERNAL`` ``execute_tool {gen_ai.tool.name}``, chains ``INTERNAL``
  ``invoke_workflow {gen_ai.workflow.name}``, retrievals ``CLIENT`` ``retrieval
  {gen_ai.data_source.id}`` (the ``data_source_id`` context kwarg);
- a failure sets status ``ERROR``, ``error.type`` (the exception's class name) and records the
  exception;
- metrics: histograms ``gen_ai.client.token.usage`` (``{token}``, ``gen_ai.token.type`` ``input``
  / ``output``), ``gen_ai.client.operation.duration`` (``s``) and, for streams,
  ``gen_ai.client.operation.time_to_first_chunk`` (``s``), with the conventions' bucket advice.

Spans nest through llmtally's ``run_id`` / ``parent_run_id``; the outermost one is a child of the
OpenTelemetry span current when it starts. Prompt and completion text never reach a span unless
``capture_content=True`` (then ``gen_ai.input.messages`` / ``gen_ai.output.messages`` and the tool
and retrieval equivalents, as JSON strings).
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, Final, TypeGuard

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from llmtally._native import core_version as __version__
from llmtally.errors import ConfigError
from llmtally.events import AsyncCallbackHandler
from llmtally.identity import user_of

__all__ = ["OpenTelemetryHandler"]

logger = logging.getLogger("llmtally")

# Bucket advice of the GenAI metric conventions.
TOKEN_BUCKETS: Final = (
    1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864,
)  # fmt: skip
DURATION_BUCKETS: Final = (
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
)  # fmt: skip

# llmtally / LiteLLM provider names -> well-known ``gen_ai.provider.name`` values.
PROVIDERS: Final[dict[str, str]] = {
    "azure": "azure.ai.openai",
    "azure_openai": "azure.ai.openai",
    "azure_ai": "azure.ai.inference",
    "bedrock": "aws.bedrock",
    "aws": "aws.bedrock",
    "vertex_ai": "gcp.vertex_ai",
    "vertex": "gcp.vertex_ai",
    "gemini": "gcp.gemini",
    "google": "gcp.gemini",
    "mistral": "mistral_ai",
    "xai": "x_ai",
    "watsonx": "ibm.watsonx.ai",
}

_AGENT, _TOOL, _CHAIN, _RETRIEVAL = range(4)


def provider_name(provider: Any) -> str:
    """The ``gen_ai.provider.name`` for an llmtally provider name.

    >>> provider_name("openai"), provider_name("bedrock"), provider_name(None)
    ('openai', 'aws.bedrock', 'unknown')
    """
    if not isinstance(provider, str) or not provider:
        return "unknown"
    p = provider.strip().lower()
    return PROVIDERS.get(p, p)


def _json(value: Any) -> str:
    try:
        return json.dumps(value, default=str, ensure_ascii=False)
    except (TypeError, ValueError):
        return json.dumps(str(value), ensure_ascii=False)


def _input_messages(messages: Any) -> str:
    """Chat messages in the conventions' input-messages shape (role and text parts)."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    out = []
    if isinstance(messages, Sequence):
        for m in messages:
            if not isinstance(m, Mapping):
                continue
            content = m.get("content")
            if isinstance(content, str):
                parts: Any = [{"type": "text", "content": content}]
            elif content is None:
                parts = []
            else:
                parts = content  # already a list of parts (multimodal, tool calls)
            out.append({"role": m.get("role", "user"), "parts": parts})
    return _json(out)


def _output_messages(content: Any, finish_reason: Any) -> str:
    message: dict[str, Any] = {
        "role": "assistant",
        "parts": [{"type": "text", "content": content}] if isinstance(content, str) else [],
    }
    if isinstance(finish_reason, str):
        message["finish_reason"] = finish_reason
    return _json([message])


def _finish_reasons(response: Mapping[str, Any]) -> list[str] | None:
    found = response.get("finish_reasons")
    if found is None:
        found = response.get("finish_reason")
    if isinstance(found, str):
        return [found]
    if isinstance(found, list | tuple) and found and all(isinstance(f, str) for f in found):
        return list(found)
    return None


class _Open:
    """A span waiting for its end event."""

    __slots__ = ("span", "started", "steps", "token")

    def __init__(self, span: trace.Span, started: float) -> None:
        self.span = span
        self.started = started
        self.steps = 0
        self.token: object | None = None  # the context made current at the start

    def end(self) -> None:
        """End the span; if it is still the current span of this context, restore the
        previous one (when the end comes in another context, the start's is left as is)."""
        token = self.token
        if token is not None:
            self.token = None
            if trace.get_current_span() is self.span:
                otel_context.detach(token)  # type: ignore[arg-type, unused-ignore]
        self.span.end()


def _guarded(event: Callable[..., None]) -> Callable[..., Coroutine[Any, Any, None]]:
    """The async event method around ``event``'s body: a failure inside it is logged and
    counted in ``errors``, never raised (the handler may be called directly, without a
    manager's isolation)."""

    @functools.wraps(event)
    async def guarded(self: OpenTelemetryHandler, *args: Any, **kwargs: Any) -> None:
        try:
            event(self, *args, **kwargs)
        except Exception as exc:
            self._failed(event.__name__, exc)

    return guarded


class OpenTelemetryHandler(AsyncCallbackHandler):
    """Emits OpenTelemetry GenAI spans and usage metrics for every call and scope it sees.

    Pick it to see llmtally's calls, agents, tools, chains and retrievals in an OpenTelemetry
    backend (Jaeger, Tempo, Honeycomb, Datadog, ...) next to the application's own spans.

    Args:
        tracer_provider: where spans go; default the global tracer provider.
        meter_provider: where metrics go; default the global meter provider.
        capture_content: put prompt, completion, tool argument/result and retrieval text on the
            spans (off by default: they often hold personal data).
        max_open_spans: spans kept waiting for their end event; past it the oldest is ended,
            marked ``llmtally.incomplete``, and counted in ``evicted``.
        span_ttl_s: a span still open after this many seconds is ended the same way (``None``:
            never); a scope whose end never comes (a stream abandoned before its end) cannot leak.

    Never raises into the call: a failure inside the handler is logged and counted in
    ``errors``.
    """

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
        *,
        capture_content: bool = False,
        max_open_spans: int = 100_000,
        span_ttl_s: float | None = 3600.0,
    ) -> None:
        if not isinstance(capture_content, bool):
            raise ConfigError(f"capture_content must be a bool, not {capture_content!r}")
        if isinstance(max_open_spans, bool) or not isinstance(max_open_spans, int):
            raise ConfigError(f"max_open_spans must be an int >= 1, not {max_open_spans!r}")
        if max_open_spans < 1:
            raise ConfigError(f"max_open_spans must be an int >= 1, not {max_open_spans!r}")
        if span_ttl_s is not None and (
            isinstance(span_ttl_s, bool)
            or not isinstance(span_ttl_s, int | float)
            or not span_ttl_s > 0
        ):
            raise ConfigError(f"span_ttl_s must be a number > 0 or None, not {span_ttl_s!r}")
        self.capture_content = capture_content
        self.max_open_spans = max_open_spans
        self.span_ttl_s = None if span_ttl_s is None else float(span_ttl_s)
        self._tracer = trace.get_tracer("llmtally", __version__, tracer_provider)
        meter = metrics.get_meter("llmtally", __version__, meter_provider)
        self._token_usage = _histogram(
            meter,
            "gen_ai.client.token.usage",
            "{token}",
            "Number of input and output tokens used.",
            TOKEN_BUCKETS,
        )
        self._duration = _histogram(
            meter, "gen_ai.client.operation.duration", "s", "GenAI operation duration.",
            DURATION_BUCKETS,
        )  # fmt: skip
        self._ttfc = _histogram(
            meter,
            "gen_ai.client.operation.time_to_first_chunk",
            "s",
            "Time to receive the first chunk of a streamed response.",
            DURATION_BUCKETS,
        )
        self._open: dict[Any, _Open] = {}
        self._metric_attrs: dict[tuple[Any, ...], tuple[dict[str, Any], ...]] = {}
        self.errors = 0
        self.bad_input = 0  # bad user ids (charged to "anonymous")
        self.evicted = 0

    # -- state ---------------------------------------------------------------------------------

    @property
    def open_spans(self) -> int:
        """Spans started and not ended yet."""
        return len(self._open)

    def end_open_spans(self) -> int:
        """End every span still waiting for its end event (marked ``llmtally.incomplete``), for
        example at shutdown; returns how many."""
        ended = 0
        while self._open:
            try:
                key = next(iter(self._open))
                entry = self._open.pop(key)
            except (StopIteration, KeyError, RuntimeError):
                continue
            self._end_incomplete(entry)
            ended += 1
        return ended

    def _end_incomplete(self, entry: _Open) -> None:
        entry.span.set_attribute("llmtally.incomplete", True)
        entry.end()

    def _evict(self, now: float) -> None:
        opened = self._open
        horizon = None if self.span_ttl_s is None else now - self.span_ttl_s
        while opened:
            try:
                key = next(iter(opened))
                entry = opened[key]
            except (StopIteration, KeyError, RuntimeError):
                return
            if len(opened) < self.max_open_spans and (horizon is None or entry.started > horizon):
                return
            if opened.pop(key, None) is entry:
                self.evicted += 1
                self._end_incomplete(entry)

    def _failed(self, event: str, exc: Exception) -> None:
        self.errors += 1
        level = logging.ERROR if self.errors == 1 else logging.DEBUG
        logger.log(level, "OpenTelemetryHandler.%s failed (skipped): %r", event, exc, exc_info=exc)

    # -- spans ---------------------------------------------------------------------------------

    def _start(
        self,
        name: str,
        span_kind: SpanKind,
        attributes: dict[str, Any],
        kwargs: Mapping[str, Any],
        current: bool = False,
    ) -> None:
        run_id = _run_key(kwargs)
        if run_id is None:
            return  # nothing to find it by at the end: the end event makes the whole span
        now = time.monotonic()
        opened = self._open
        if opened:
            self._evict(now)
        context = None
        parent_id = _key(kwargs.get("parent_run_id"))
        if parent_id is not None:
            parent = opened.get(parent_id)
            if parent is not None:
                context = trace.set_span_in_context(parent.span)
        if kwargs.get("user_id") is not None:  # the charged user, by the identity rule
            attributes["enduser.id"] = user_of(kwargs.get("user_id"), self)
        conversation = kwargs.get("conversation_id")
        if isinstance(conversation, str) and conversation:
            attributes["gen_ai.conversation.id"] = conversation
        span = self._tracer.start_span(name, context, span_kind, attributes)
        previous = opened.pop(run_id, None)
        if previous is not None:  # a run id started twice: the first can never end now
            self._end_incomplete(previous)
        entry = opened[run_id] = _Open(span, now)
        if current:
            # The span is current for the caller's code until the end (the SDK's HTTP spans
            # nest under it), when the event runs in the caller's context.
            entry.token = otel_context.attach(trace.set_span_in_context(span))

    def _take(self, kwargs: Mapping[str, Any]) -> _Open | None:
        run_id = _run_key(kwargs)
        return None if run_id is None else self._open.pop(run_id, None)

    def _late_span(
        self, name: str, span_kind: SpanKind, attributes: dict[str, Any], kwargs: Mapping[str, Any]
    ) -> trace.Span:
        """A span for an end event whose start this handler did not see (called directly, or
        added mid-call): started ``duration_ms`` before now when known."""
        duration_ms = kwargs.get("duration_ms")
        start_ns = None
        if _is_ms(duration_ms):
            start_ns = time.time_ns() - int(duration_ms * 1e6)
        if kwargs.get("user_id") is not None:  # the charged user, by the identity rule
            attributes["enduser.id"] = user_of(kwargs.get("user_id"), self)
        return self._tracer.start_span(name, None, span_kind, attributes, start_time=start_ns)

    @staticmethod
    def _error(span: trace.Span, error: BaseException, kwargs: Mapping[str, Any]) -> str:
        error_type = type(error).__name__
        span.set_attribute("error.type", error_type)
        if kwargs.get("aborted"):
            span.set_attribute("llmtally.aborted", True)
        span.set_status(Status(StatusCode.ERROR, str(error) or error_type))
        span.record_exception(error)
        return error_type

    # -- LLM calls -----------------------------------------------------------------------------

    def _llm_attributes(self, kwargs: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
        provider = provider_name(kwargs.get("provider"))
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": provider,
            "gen_ai.system": provider,
        }
        model = kwargs.get("model")
        name = "chat"
        if isinstance(model, str) and model and model != "unknown":
            attributes["gen_ai.request.model"] = model
            name = f"chat {model}"
        request_id = kwargs.get("request_id")
        if request_id is not None:
            attributes["llmtally.request_id"] = str(request_id)
        return name, attributes

    @_guarded
    def on_llm_start(self, messages: list[dict[str, Any]], **kwargs: Any) -> None:
        """Start the call's ``chat {model}`` span."""
        name, attributes = self._llm_attributes(kwargs)
        if self.capture_content:
            attributes["gen_ai.input.messages"] = _input_messages(messages)
        self._start(name, SpanKind.CLIENT, attributes, kwargs, current=True)

    @_guarded
    def on_llm_end(self, response: dict[str, Any], **kwargs: Any) -> None:
        """Set usage, cost and response attributes, end the span, record the metrics."""
        self._llm_end(response, kwargs)

    def _llm_end(self, response: Any, kwargs: Mapping[str, Any]) -> None:
        entry = self._take(kwargs)
        if entry is None:
            name, attributes = self._llm_attributes(kwargs)
            span = self._late_span(name, SpanKind.CLIENT, attributes, kwargs)
            started = None
        else:
            span = entry.span
            started = entry.started
        try:
            self._llm_end_span(span, response, kwargs, started)
        finally:
            if entry is None:
                span.end()
            else:
                entry.end()

    def _llm_end_span(
        self, span: trace.Span, response: Any, kwargs: Mapping[str, Any], started: float | None
    ) -> None:
        if not isinstance(response, Mapping):
            response = {}
        attrs: dict[str, Any] = {}
        response_model = response.get("model")
        if isinstance(response_model, str) and response_model and response_model != "unknown":
            attrs["gen_ai.response.model"] = response_model
        else:
            response_model = None
        prompt = response.get("prompt_tokens")
        completion = response.get("completion_tokens")
        has_usage = type(prompt) is int and type(completion) is int
        if has_usage:
            attrs["gen_ai.usage.input_tokens"] = prompt
            attrs["gen_ai.usage.output_tokens"] = completion
            for field, key in (
                ("cached_tokens", "gen_ai.usage.cache_read.input_tokens"),
                ("cache_write_tokens", "gen_ai.usage.cache_creation.input_tokens"),
                ("reasoning_tokens", "gen_ai.usage.reasoning.output_tokens"),
            ):
                value = response.get(field)
                if type(value) is int and value > 0:
                    attrs[key] = value
        response_id = response.get("response_id", response.get("id"))
        if isinstance(response_id, str) and response_id:
            attrs["gen_ai.response.id"] = response_id
        reasons = _finish_reasons(response)
        if reasons is not None:
            attrs["gen_ai.response.finish_reasons"] = reasons
        cost = response.get("cost_estimate")
        if isinstance(cost, int | float) and not isinstance(cost, bool):
            attrs["llmtally.cost_usd"] = float(cost)
        source = response.get("cost_source")
        if isinstance(source, str):
            attrs["llmtally.cost_source"] = source
        attrs["llmtally.estimated"] = bool(response.get("estimated", False))
        usage_error = response.get("usage_error")
        if isinstance(usage_error, str):
            attrs["llmtally.usage_error"] = usage_error
        ttft_s: float | None = None
        ttft_ms = kwargs.get("ttft_ms")
        if _is_ms(ttft_ms):
            ttft_s = ttft_ms / 1000.0
        else:
            found = response.get("time_to_first_token")
            if _is_ms(found):
                ttft_s = float(found)
        if ttft_s is not None:
            attrs["gen_ai.response.time_to_first_chunk"] = ttft_s
        if self.capture_content:
            content = response.get("content")
            if isinstance(content, str):
                attrs["gen_ai.output.messages"] = _output_messages(
                    content, reasons[0] if reasons else None
                )
        span.set_attributes(attrs)
        # Metrics.
        base, inputs, outputs = self._attrs_for(kwargs, response_model)
        self._duration.record(_duration_s(kwargs, started), base)
        if has_usage:
            self._token_usage.record(prompt, inputs)
            self._token_usage.record(completion, outputs)
        if ttft_s is not None:
            self._ttfc.record(ttft_s, base)

    def _attrs_for(
        self, kwargs: Mapping[str, Any], response_model: str | None
    ) -> tuple[dict[str, Any], ...]:
        """Metric attributes (base, input tokens, output tokens), made once per provider and
        models."""
        provider = kwargs.get("provider")
        model = kwargs.get("model")
        key = (provider, model, response_model)
        found = self._metric_attrs.get(key)
        if found is None:
            base: dict[str, Any] = {
                "gen_ai.operation.name": "chat",
                "gen_ai.provider.name": provider_name(provider),
            }
            if isinstance(model, str) and model and model != "unknown":
                base["gen_ai.request.model"] = model
            if response_model is not None:
                base["gen_ai.response.model"] = response_model
            found = (
                base,
                {**base, "gen_ai.token.type": "input"},
                {**base, "gen_ai.token.type": "output"},
            )
            if len(self._metric_attrs) >= 10_000:
                self._metric_attrs.clear()
            self._metric_attrs[key] = found
        return found

    @_guarded
    def on_llm_error(self, error: BaseException, **kwargs: Any) -> None:
        """End the span as failed and record the duration with ``error.type``."""
        entry = self._take(kwargs)
        if entry is None:
            name, attributes = self._llm_attributes(kwargs)
            span = self._late_span(name, SpanKind.CLIENT, attributes, kwargs)
            started = None
        else:
            span, started = entry.span, entry.started
        try:
            error_type = self._error(span, error, kwargs)
        finally:
            if entry is None:
                span.end()
            else:
                entry.end()
        base = self._attrs_for(kwargs, None)[0]
        self._duration.record(_duration_s(kwargs, started), {**base, "error.type": error_type})

    # -- scopes --------------------------------------------------------------------------------

    def _scope_end(self, kind: int, name_arg: Any, output: Any, kwargs: Mapping[str, Any]) -> None:
        entry = self._take(kwargs)
        if entry is None:
            name, span_kind, attributes = self._scope_span(kind, name_arg, kwargs)
            span = self._late_span(name, span_kind, attributes, kwargs)
            steps = 0
        else:
            span, steps = entry.span, entry.steps
        try:
            if steps:
                span.set_attribute("llmtally.agent.steps", steps)
            if self.capture_content and output is not None:
                key = _OUTPUT_KEYS[kind]
                if key == "gen_ai.output.messages":
                    span.set_attribute(key, _output_messages(_text(output), None))
                else:
                    span.set_attribute(key, _json(output))
        finally:
            span.end()

    def _scope_error(
        self, kind: int, name_arg: Any, error: BaseException, kwargs: Mapping[str, Any]
    ) -> None:
        entry = self._take(kwargs)
        if entry is None:
            name, span_kind, attributes = self._scope_span(kind, name_arg, kwargs)
            span = self._late_span(name, span_kind, attributes, kwargs)
        else:
            span = entry.span
        try:
            self._error(span, error, kwargs)
        finally:
            span.end()

    def _scope_span(
        self, kind: int, name_arg: Any, kwargs: Mapping[str, Any]
    ) -> tuple[str, SpanKind, dict[str, Any]]:
        if kind == _AGENT:
            agent = kwargs.get("agent_name")
            attributes: dict[str, Any] = {"gen_ai.operation.name": "invoke_agent"}
            name = "invoke_agent"
            if isinstance(agent, str) and agent:
                attributes["gen_ai.agent.name"] = agent
                name = f"invoke_agent {agent}"
            provider = kwargs.get("provider")
            if isinstance(provider, str) and provider:
                attributes["gen_ai.provider.name"] = provider_name(provider)
            model = kwargs.get("model")
            if isinstance(model, str) and model and model != "unknown":
                attributes["gen_ai.request.model"] = model
            return name, SpanKind.INTERNAL, attributes
        if kind == _TOOL:
            tool = name_arg
            attributes = {"gen_ai.operation.name": "execute_tool"}
            name = "execute_tool"
            if isinstance(tool, str) and tool:
                attributes["gen_ai.tool.name"] = tool
                name = f"execute_tool {tool}"
            call_id = kwargs.get("tool_call_id")
            if isinstance(call_id, str) and call_id:
                attributes["gen_ai.tool.call.id"] = call_id
            return name, SpanKind.INTERNAL, attributes
        if kind == _CHAIN:
            chain = name_arg
            attributes = {"gen_ai.operation.name": "invoke_workflow"}
            name = "invoke_workflow"
            if isinstance(chain, str) and chain:
                attributes["gen_ai.workflow.name"] = chain
                name = f"invoke_workflow {chain}"
            return name, SpanKind.INTERNAL, attributes
        source = kwargs.get("data_source_id")
        attributes = {"gen_ai.operation.name": "retrieval"}
        name = "retrieval"
        if isinstance(source, str) and source:
            attributes["gen_ai.data_source.id"] = source
            name = f"retrieval {source}"
        return name, SpanKind.CLIENT, attributes

    def _scope_start(
        self, kind: int, name_arg: Any, content: Any, kwargs: Mapping[str, Any]
    ) -> None:
        name, span_kind, attributes = self._scope_span(kind, name_arg, kwargs)
        if self.capture_content and content is not None:
            key = _INPUT_KEYS[kind]
            if key == "gen_ai.input.messages":
                attributes[key] = _input_messages(_text(content))
            elif key == "gen_ai.retrieval.query.text":
                attributes[key] = _text(content)
            else:
                attributes[key] = _json(content)
        self._start(name, span_kind, attributes, kwargs)

    @_guarded
    def on_agent_start(self, goal: Any, **kwargs: Any) -> None:
        """Start an ``invoke_agent`` span."""
        self._scope_start(_AGENT, None, goal, kwargs)

    @_guarded
    def on_agent_step(self, step: Any, **kwargs: Any) -> None:
        """Count the step (``llmtally.agent.steps`` on the agent's span)."""
        run_id = _key(kwargs.get("run_id"))
        entry = self._open.get(run_id) if run_id is not None else None
        if entry is not None:
            entry.steps += 1

    @_guarded
    def on_agent_end(self, result: Any, **kwargs: Any) -> None:
        """End the agent's span."""
        self._scope_end(_AGENT, None, result, kwargs)

    @_guarded
    def on_agent_error(self, error: BaseException, **kwargs: Any) -> None:
        """End the agent's span as failed."""
        self._scope_error(_AGENT, None, error, kwargs)

    @_guarded
    def on_tool_start(self, tool_name: str, args: Any, **kwargs: Any) -> None:
        """Start an ``execute_tool`` span."""
        self._scope_start(_TOOL, tool_name, args, kwargs)

    @_guarded
    def on_tool_end(self, tool_name: str, result: Any, **kwargs: Any) -> None:
        """End the tool's span."""
        self._scope_end(_TOOL, tool_name, result, kwargs)

    @_guarded
    def on_tool_error(self, tool_name: str, error: BaseException, **kwargs: Any) -> None:
        """End the tool's span as failed."""
        self._scope_error(_TOOL, tool_name, error, kwargs)

    @_guarded
    def on_chain_start(self, chain_name: str, **kwargs: Any) -> None:
        """Start an ``invoke_workflow`` span."""
        self._scope_start(_CHAIN, chain_name, None, kwargs)

    @_guarded
    def on_chain_end(self, result: Any, **kwargs: Any) -> None:
        """End the chain's span."""
        self._scope_end(_CHAIN, None, result, kwargs)

    @_guarded
    def on_chain_error(self, error: BaseException, **kwargs: Any) -> None:
        """End the chain's span as failed."""
        self._scope_error(_CHAIN, None, error, kwargs)

    @_guarded
    def on_retrieval_start(self, query: Any, **kwargs: Any) -> None:
        """Start a ``retrieval`` span."""
        self._scope_start(_RETRIEVAL, None, query, kwargs)

    @_guarded
    def on_retrieval_end(self, documents: Any, **kwargs: Any) -> None:
        """End the retrieval's span."""
        self._scope_end(_RETRIEVAL, None, documents, kwargs)

    @_guarded
    def on_retrieval_error(self, error: BaseException, **kwargs: Any) -> None:
        """End the retrieval's span as failed."""
        self._scope_error(_RETRIEVAL, None, error, kwargs)


_INPUT_KEYS: Final = {
    _AGENT: "gen_ai.input.messages",
    _TOOL: "gen_ai.tool.call.arguments",
    _RETRIEVAL: "gen_ai.retrieval.query.text",
}
_OUTPUT_KEYS: Final = {
    _AGENT: "gen_ai.output.messages",
    _TOOL: "gen_ai.tool.call.result",
    _CHAIN: "gen_ai.output.messages",
    _RETRIEVAL: "gen_ai.retrieval.documents",
}


def _key(run_id: Any) -> Any:
    """A run id usable as a dict key (framework ids are str or UUID; anything else by repr)."""
    if run_id is None or type(run_id) is str:
        return run_id
    try:
        hash(run_id)
    except TypeError:
        return repr(run_id)
    return run_id


def _run_key(kwargs: Mapping[str, Any]) -> Any:
    """The key of a scope's span: its ``run_id``, else its ``request_id`` (a handler called
    directly), else ``None``."""
    run_id = kwargs.get("run_id")
    if run_id is None:
        run_id = kwargs.get("request_id")
    return _key(run_id)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else _json(value)


def _is_ms(value: Any) -> TypeGuard[float]:
    """A finite, non-negative duration (of at most about 30 years)."""
    return type(value) in (int, float) and 0 <= value < 1e12


def _duration_s(kwargs: Mapping[str, Any], started: float | None) -> float:
    duration_ms = kwargs.get("duration_ms")
    if _is_ms(duration_ms):
        return float(duration_ms) / 1000.0
    if started is not None:
        return time.monotonic() - started
    return 0.0


def _histogram(
    meter: metrics.Meter, name: str, unit: str, description: str, buckets: Sequence[float]
) -> metrics.Histogram:
    try:
        return meter.create_histogram(
            name, unit, description, explicit_bucket_boundaries_advisory=buckets
        )
    except TypeError:  # an opentelemetry-api without bucket advice
        return meter.create_histogram(name, unit, description)
