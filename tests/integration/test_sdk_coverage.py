"""Every billable path of the installed openai and anthropic SDKs, sync and async, against a
loopback server: each request is metered exactly once with the provider's numbers, or is on
instrument's documented list of endpoints it does not meter (warned once when used).

The last test walks the SDKs' resource classes and fails on any method that posts to an endpoint
instrument has no answer for, so a new SDK release cannot add a silent path."""

from __future__ import annotations

import asyncio
import gc
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

import llmtally
from fakellm import FakeLLM
from llmtally import instrument
from llmtally.integrations.instrument import METERED, NOT_BILLED, NOT_METERED, UNMETERED, classify

from helpers import Recorder

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
CHAT = (1500, 1200, 300, 1024, 0, 256)
RESPONSES = (1300, 900, 400, 512, 0, 320)
COMPLETIONS = (15, 12, 3, 0, 0, 0)
EMBEDDINGS = (16, 16, 0, 0, 0, 0)  # two inputs of 8 tokens
DECISIONS = (750, 700, 50, 200, 100, 20)
MESSAGE = (2470, 2350, 120, 2000, 300, 0)  # input 50 + cache reads 2000 + cache writes 300


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeLLM]:
    server = FakeLLM()
    yield server
    server.close()


def counts(response: dict[str, Any]) -> tuple[Any, ...]:
    keys = ("tokens_used", "prompt_tokens", "completion_tokens", "cached_tokens",
            "cache_write_tokens", "reasoning_tokens")  # fmt: skip
    return tuple(response.get(k) for k in keys)


def clients(fake: FakeLLM, rec: Recorder, sync: bool) -> tuple[Any, Any]:
    o = (openai.OpenAI if sync else openai.AsyncOpenAI)(
        api_key="k", base_url=fake.url + "/v1", max_retries=0
    )
    a = (anthropic.Anthropic if sync else anthropic.AsyncAnthropic)(
        api_key="k", base_url=fake.url, max_retries=0
    )
    return instrument(o, [rec], user_id="alice"), instrument(a, [rec], user_id="alice")


def wait_for_ends(rec: Recorder, n: int) -> None:
    """Sync clients fire on the background loop and wait; a dropped stream ends there later."""
    deadline = time.monotonic() + 5
    while len(rec.of("on_llm_end")) + len(rec.of("on_llm_error")) < n:
        assert time.monotonic() < deadline, rec.names()
        gc.collect()
        time.sleep(0.01)


# -- the paths ---------------------------------------------------------------------------------
# Each: (name, provider, sync function, async function, expected counts, estimated).

KW_CHAT = {"model": "gpt-4o", "messages": MESSAGES}
KW_RESP = {"model": "gpt-4o", "input": "What is the capital of France?"}
KW_EMB = {"model": "text-embedding-3-small", "input": ["a", "b"], "encoding_format": "float"}
KW_MSG = {"model": "claude-house-model", "max_tokens": 100, "messages": MESSAGES}


def s_chat_stream_helper(o: Any, a: Any) -> Any:
    with o.chat.completions.stream(**KW_CHAT) as stream:
        for _ in stream:
            pass
        return stream.get_final_completion()


async def a_chat_stream_helper(o: Any, a: Any) -> Any:
    async with o.chat.completions.stream(**KW_CHAT) as stream:
        async for _ in stream:
            pass
        return await stream.get_final_completion()


def s_chat_streaming_response(o: Any, a: Any) -> Any:
    with o.chat.completions.with_streaming_response.create(**KW_CHAT) as response:
        return response.parse()


async def a_chat_streaming_response(o: Any, a: Any) -> Any:
    async with o.chat.completions.with_streaming_response.create(**KW_CHAT) as response:
        return await response.parse()


def s_raw_stream(o: Any, a: Any) -> Any:
    raw = o.chat.completions.with_raw_response.create(**KW_CHAT, stream=True)
    return list(raw.parse())


async def a_raw_stream(o: Any, a: Any) -> Any:
    raw = await o.chat.completions.with_raw_response.create(**KW_CHAT, stream=True)
    return [c async for c in raw.parse()]


def s_streaming_response_stream(o: Any, a: Any) -> Any:
    with o.chat.completions.with_streaming_response.create(**KW_CHAT, stream=True) as response:
        return list(response.parse())


async def a_streaming_response_stream(o: Any, a: Any) -> Any:
    async with o.chat.completions.with_streaming_response.create(
        **KW_CHAT, stream=True
    ) as response:
        return [c async for c in await response.parse()]


def s_responses_stream_helper(o: Any, a: Any) -> Any:
    with o.responses.stream(**KW_RESP) as stream:
        for _ in stream:
            pass
        return stream.get_final_response()


async def a_responses_stream_helper(o: Any, a: Any) -> Any:
    async with o.responses.stream(**KW_RESP) as stream:
        async for _ in stream:
            pass
        return await stream.get_final_response()


def s_messages_stream_helper(o: Any, a: Any) -> Any:
    with a.messages.stream(**KW_MSG) as stream:
        return stream.get_final_message()


async def a_messages_stream_helper(o: Any, a: Any) -> Any:
    async with a.messages.stream(**KW_MSG) as stream:
        return await stream.get_final_message()


def s_messages_streaming_response(o: Any, a: Any) -> Any:
    with a.messages.with_streaming_response.create(**KW_MSG) as response:
        return response.parse()


async def a_messages_streaming_response(o: Any, a: Any) -> Any:
    async with a.messages.with_streaming_response.create(**KW_MSG) as response:
        return await response.parse()


def s_relayed(how: str, stream: bool, anthropic_sdk: bool = False) -> Callable[..., Any]:
    """A gateway relaying the raw body: ``with_streaming_response`` read with ``iter_*``."""

    def run(o: Any, a: Any) -> Any:
        resource = a.messages if anthropic_sdk else o.chat.completions
        kw = KW_MSG if anthropic_sdk else KW_CHAT
        with resource.with_streaming_response.create(**kw, stream=stream) as response:
            return list(getattr(response, how)())

    return run


def a_relayed(how: str, stream: bool, anthropic_sdk: bool = False) -> Callable[..., Any]:
    async def run(o: Any, a: Any) -> Any:
        resource = a.messages if anthropic_sdk else o.chat.completions
        kw = KW_MSG if anthropic_sdk else KW_CHAT
        async with resource.with_streaming_response.create(**kw, stream=stream) as response:
            return [piece async for piece in getattr(response, how)()]

    return run


def _drain(result: Any) -> Any:
    return list(result)


async def _adrain(result: Any) -> Any:
    return [x async for x in result]


PATHS: list[tuple[str, Callable[..., Any], Callable[..., Awaitable[Any]], tuple[Any, ...], bool]]
PATHS = [
    ("openai chat.completions.create",
     lambda o, a: o.chat.completions.create(**KW_CHAT),
     lambda o, a: o.chat.completions.create(**KW_CHAT), CHAT, False),
    ("openai chat.completions.create stream",
     lambda o, a: _drain(o.chat.completions.create(**KW_CHAT, stream=True)),
     lambda o, a: _astream(o.chat.completions.create(**KW_CHAT, stream=True)), CHAT, False),
    ("openai chat.completions.parse",
     lambda o, a: o.chat.completions.parse(**KW_CHAT),
     lambda o, a: o.chat.completions.parse(**KW_CHAT), CHAT, False),
    ("openai chat.completions.stream", s_chat_stream_helper, a_chat_stream_helper, CHAT, False),
    ("openai chat.completions.with_raw_response.create",
     lambda o, a: o.chat.completions.with_raw_response.create(**KW_CHAT),
     lambda o, a: o.chat.completions.with_raw_response.create(**KW_CHAT), CHAT, False),
    ("openai chat.completions.with_raw_response.create stream", s_raw_stream, a_raw_stream,
     CHAT, False),
    ("openai chat.completions.with_streaming_response.create", s_chat_streaming_response,
     a_chat_streaming_response, CHAT, False),
    ("openai chat.completions.with_streaming_response.create stream",
     s_streaming_response_stream, a_streaming_response_stream, CHAT, False),
    ("openai with_options().chat.completions.create",
     lambda o, a: o.with_options(timeout=30).chat.completions.create(**KW_CHAT),
     lambda o, a: o.with_options(timeout=30).chat.completions.create(**KW_CHAT), CHAT, False),
    ("openai copy().chat.completions.create",
     lambda o, a: o.copy(max_retries=0).chat.completions.create(**KW_CHAT),
     lambda o, a: o.copy(max_retries=0).chat.completions.create(**KW_CHAT), CHAT, False),
    ("openai responses.create",
     lambda o, a: o.responses.create(**KW_RESP),
     lambda o, a: o.responses.create(**KW_RESP), RESPONSES, False),
    ("openai responses.create stream",
     lambda o, a: _drain(o.responses.create(**KW_RESP, stream=True)),
     lambda o, a: _astream(o.responses.create(**KW_RESP, stream=True)), RESPONSES, False),
    ("openai responses.parse",
     lambda o, a: o.responses.parse(**KW_RESP),
     lambda o, a: o.responses.parse(**KW_RESP), RESPONSES, False),
    ("openai responses.stream", s_responses_stream_helper, a_responses_stream_helper,
     RESPONSES, False),
    ("openai responses.with_raw_response.create",
     lambda o, a: o.responses.with_raw_response.create(**KW_RESP),
     lambda o, a: o.responses.with_raw_response.create(**KW_RESP), RESPONSES, False),
    ("openai completions.create",
     lambda o, a: o.completions.create(model="gpt-3.5-turbo-instruct", prompt="Capital?"),
     lambda o, a: o.completions.create(model="gpt-3.5-turbo-instruct", prompt="Capital?"),
     COMPLETIONS, False),
    ("openai completions.create stream",
     lambda o, a: _drain(o.completions.create(model="gpt-3.5-turbo-instruct", prompt="Capital?",
                                              stream=True)),
     lambda o, a: _astream(o.completions.create(model="gpt-3.5-turbo-instruct",
                                                prompt="Capital?", stream=True)),
     COMPLETIONS, False),
    ("openai embeddings.create",
     lambda o, a: o.embeddings.create(**KW_EMB),
     lambda o, a: o.embeddings.create(**KW_EMB),
     EMBEDDINGS, False),
    ("openai decisions.create",
     lambda o, a: o.decisions.create(model="gpt-6-luna", input="Paris?", questions=[]),
     lambda o, a: o.decisions.create(model="gpt-6-luna", input="Paris?", questions=[]),
     DECISIONS, False),
    *[
        (f"openai chat.completions.with_streaming_response.create {how}{' stream' * stream}",
         s_relayed(how, stream), a_relayed(how, stream), CHAT, False)
        for how in ("iter_bytes", "iter_text", "iter_lines") for stream in (False, True)
    ],
    *[
        (f"anthropic messages.with_streaming_response.create iter_bytes{' stream' * stream}",
         s_relayed("iter_bytes", stream, True), a_relayed("iter_bytes", stream, True), MESSAGE,
         False)
        for stream in (False, True)
    ],
    ("anthropic messages.create",
     lambda o, a: a.messages.create(**KW_MSG),
     lambda o, a: a.messages.create(**KW_MSG), MESSAGE, False),
    ("anthropic messages.create stream",
     lambda o, a: _drain(a.messages.create(**KW_MSG, stream=True)),
     lambda o, a: _astream(a.messages.create(**KW_MSG, stream=True)), MESSAGE, False),
    ("anthropic messages.stream", s_messages_stream_helper, a_messages_stream_helper,
     MESSAGE, False),
    ("anthropic messages.with_raw_response.create",
     lambda o, a: a.messages.with_raw_response.create(**KW_MSG),
     lambda o, a: a.messages.with_raw_response.create(**KW_MSG), MESSAGE, False),
    ("anthropic messages.with_streaming_response.create", s_messages_streaming_response,
     a_messages_streaming_response, MESSAGE, False),
    ("anthropic with_options().messages.create",
     lambda o, a: a.with_options(timeout=30).messages.create(**KW_MSG),
     lambda o, a: a.with_options(timeout=30).messages.create(**KW_MSG), MESSAGE, False),
    ("anthropic beta.messages.create",
     lambda o, a: a.beta.messages.create(**KW_MSG),
     lambda o, a: a.beta.messages.create(**KW_MSG), MESSAGE, False),
]  # fmt: skip


async def _astream(coro: Awaitable[Any]) -> Any:
    return await _adrain(await coro)


@pytest.mark.parametrize("sync", [True, False], ids=["sync", "async"])
@pytest.mark.parametrize(
    ("name", "sync_fn", "async_fn", "expected", "estimated"), PATHS, ids=[p[0] for p in PATHS]
)
async def test_every_billable_path_is_metered_once_with_the_providers_numbers(
    fake: FakeLLM,
    sync: bool,
    name: str,
    sync_fn: Callable[..., Any],
    async_fn: Callable[..., Awaitable[Any]],
    expected: tuple[Any, ...],
    estimated: bool,
) -> None:
    rec = Recorder()
    o, a = clients(fake, rec, sync)
    provider, attribute = name.split()[:2]
    found: Any = o if provider == "openai" else a
    for part in attribute.split("()")[0].split("."):  # with_options().x: with_options
        if not hasattr(found, part):  # an SDK release before this method
            pytest.skip(f"{provider} {version(provider)} has no {attribute}")
        found = getattr(found, part)
    if sync:
        await asyncio.to_thread(sync_fn, o, a)
    else:
        await async_fn(o, a)
    await asyncio.to_thread(wait_for_ends, rec, 1)
    assert rec.names().count("on_llm_start") == 1
    ends = rec.of("on_llm_end")
    assert len(ends) == 1, rec.names()
    (response,), kwargs = ends[0]
    assert counts(response) == expected
    assert response["estimated"] is estimated
    assert response.get("finish_reason") != "abandoned"
    assert kwargs["user_id"] == "alice"


@pytest.mark.parametrize("sync", [True, False], ids=["sync", "async"])
@pytest.mark.parametrize("how", ["break", "close", "raise", "drop"])
async def test_a_stream_left_mid_way_ends_as_abandoned(fake: FakeLLM, sync: bool, how: str) -> None:
    rec = Recorder()
    o, _ = clients(fake, rec, sync)

    def consume_sync() -> None:
        stream = o.chat.completions.create(**KW_CHAT, stream=True)
        try:
            for _ in stream:
                if how == "break":
                    break
                if how == "close":
                    stream.close()
                    break
                if how == "raise":
                    raise KeyError("consumer bug")
                if how == "drop":
                    return
        except KeyError:
            pass

    async def consume_async() -> None:
        stream = await o.chat.completions.create(**KW_CHAT, stream=True)
        try:
            async for _ in stream:
                if how == "break":
                    break
                if how == "close":
                    await stream.close()
                    break
                if how == "raise":
                    raise KeyError("consumer bug")
                if how == "drop":
                    return
        except KeyError:
            pass

    if sync:
        await asyncio.to_thread(consume_sync)
    else:
        await consume_async()
    for _ in range(3):
        gc.collect()
        await asyncio.sleep(0.01)  # the event loop's async generator finalizer runs
    await asyncio.to_thread(wait_for_ends, rec, 1)
    assert rec.names().count("on_llm_start") == 1
    ends = rec.of("on_llm_end")
    assert len(ends) == 1 and not rec.of("on_llm_error"), rec.names()
    (response,), _ = ends[0]
    assert response["finish_reason"] == "abandoned" and response["estimated"] is True
    assert response["prompt_tokens"] == llmtally.estimate_tokens(MESSAGES, "gpt-4o")


async def test_a_consumer_cancelled_mid_stream_is_abandoned_not_an_error(fake: FakeLLM) -> None:
    """A web client that disconnects cancels the task reading the stream."""
    rec = Recorder()
    o, _ = clients(fake, rec, False)
    first = asyncio.Event()

    async def relay() -> None:
        stream = await o.chat.completions.create(**KW_CHAT, stream=True)
        async for _ in stream:
            first.set()
            await asyncio.sleep(3600)

    task = asyncio.create_task(relay())
    await first.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(3):
        gc.collect()
        await asyncio.sleep(0.01)  # the dropped stream's generator is closed by the loop
    (response,), _ = rec.of("on_llm_end")[0]
    assert response["finish_reason"] == "abandoned"
    assert rec.names().count("on_llm_end") == 1 and not rec.of("on_llm_error")


@pytest.mark.parametrize("sync", [True, False], ids=["sync", "async"])
async def test_a_budget_refusal_reaches_the_caller_and_nothing_is_sent(
    fake: FakeLLM, sync: bool
) -> None:
    class Refuse(llmtally.AsyncCallbackHandler):
        async def on_llm_start(self, messages: Any, **kwargs: Any) -> None:
            raise llmtally.BudgetExceeded("alice", limit=1, used=1, requested=1, unit="tokens")

    before = len(fake.requests)
    client = (openai.OpenAI if sync else openai.AsyncOpenAI)(
        api_key="k", base_url=fake.url + "/v1", max_retries=0
    )
    instrument(client, [Refuse()], user_id="alice")
    with pytest.raises(llmtally.BudgetExceeded):
        if sync:
            await asyncio.to_thread(lambda: client.chat.completions.create(**KW_CHAT))
        else:
            await client.chat.completions.create(**KW_CHAT)
    assert len(fake.requests) == before


async def test_billable_paths_llmtally_does_not_meter_warn_once(
    fake: FakeLLM, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="llmtally")
    rec = Recorder()
    o, _ = clients(fake, rec, False)
    before = UNMETERED["openai /images/generations"]
    for _ in range(2):
        with pytest.raises(openai.NotFoundError):  # the loopback server has no images
            await o.images.generate(model="gpt-image-1", prompt="a cat")
    assert UNMETERED["openai /images/generations"] == before + 2
    warnings = [r for r in caplog.records if "/images/generations" in r.getMessage()]
    assert len(warnings) <= 1  # once per process (maybe before this test)
    assert rec.names() == []
    # Moderations are free: nothing counted, nothing warned.
    with pytest.raises(openai.NotFoundError):
        await o.moderations.create(input="hi")
    assert not any("/moderations" in key for key in UNMETERED)


async def test_an_unmetered_endpoint_is_one_entry_whatever_ids_its_path_names(
    fake: FakeLLM, caplog: pytest.LogCaptureFixture
) -> None:
    """1,000 Assistants runs on 1,000 threads: one UNMETERED entry and one warning, not one per
    thread (the counter grew with every id, and warned for each)."""
    caplog.set_level(logging.WARNING, logger="llmtally")
    o, _ = clients(fake, Recorder(), False)
    size = len(UNMETERED)
    key = "openai /threads/{id}/runs"
    before = UNMETERED[key]
    for i in range(1000):
        with pytest.raises(openai.NotFoundError):  # the loopback server has no Assistants
            await o.post(f"/threads/thread_{i:024d}/runs", body={}, cast_to=object)
    assert UNMETERED[key] == before + 1000
    assert len(UNMETERED) <= size + 1
    assert len([r for r in caplog.records if "/threads/" in r.getMessage()]) <= 1


def test_classify_answers_for_every_endpoint_the_installed_sdks_post_to() -> None:
    """Read every resource module of both SDKs: each method that posts names an endpoint that
    instrument meters, or lists with a reason, or knows to be free. (Read as text, not
    imported: some modules need optional extras.)"""
    seen: dict[str, set[str]] = {"openai": set(), "anthropic": set()}
    unknown: list[str] = []
    post = re.compile(r"self\._post\b\s*[(,]\s*(?:path_template\(\s*)?f?([\"'])(/[^\"']*)\1")
    for package in (openai, anthropic):
        provider = package.__name__
        root = Path(package.__file__).parent / "resources"
        files = sorted(root.rglob("*.py"))
        assert files
        for file in files:
            for match in post.finditer(file.read_text(encoding="utf-8")):
                path = re.sub(r"\{[^}]+\}", "x1", match.group(2))
                seen[provider].add(path)
                kind, reason = classify(provider, path)
                assert kind in (METERED, NOT_METERED, NOT_BILLED)
                if kind == NOT_METERED and "does not know" in reason:
                    unknown.append(f"{provider} {file.relative_to(root)} {path}")
    assert not unknown, unknown
    # The walk found the paths that matter (it would pass vacuously otherwise).
    assert {"/chat/completions", "/responses", "/embeddings", "/completions"} <= seen["openai"]
    assert "/v1/messages" in {p.split("?")[0] for p in seen["anthropic"]}
    assert classify("openai", "/chat/completions") == (METERED, "")
    assert classify("openai", "/moderations") == (NOT_BILLED, "")
    assert classify("openai", "/images/generations")[0] == NOT_METERED
    assert classify("anthropic", "/v1/messages/count_tokens") == (NOT_BILLED, "")
    assert classify("anthropic", "/v1/messages/batches")[0] == NOT_METERED


async def test_the_sdks_http_request_runs_under_the_llm_span(fake: FakeLLM) -> None:
    """With the OpenTelemetry handler, the LLM span is current while the SDK sends its HTTP
    request (where httpx instrumentation makes its span), and not after the call returns."""
    httpx = pytest.importorskip("httpx")
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from llmtally.otel import OpenTelemetryHandler

    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    current: list[str] = []

    class Transport(httpx.AsyncHTTPTransport):  # type: ignore[misc, name-defined]
        async def handle_async_request(self, request: Any) -> Any:
            span = trace.get_current_span()
            current.append(getattr(span, "name", "") if span.get_span_context().is_valid else "")
            return await super().handle_async_request(request)

    client = openai.AsyncOpenAI(
        api_key="k",
        base_url=fake.url + "/v1",
        max_retries=0,
        http_client=httpx.AsyncClient(transport=Transport()),
    )
    instrument(client, [OpenTelemetryHandler(provider)], user_id="alice")
    await client.chat.completions.create(**KW_CHAT)
    stream = await client.chat.completions.create(**KW_CHAT, stream=True)
    assert not trace.get_current_span().get_span_context().is_valid  # nothing left current
    async for _ in stream:
        pass
    assert current == ["chat gpt-4o", "chat gpt-4o"]
    assert [s.name for s in spans.get_finished_spans()] == ["chat gpt-4o", "chat gpt-4o"]
    await client.close()
    provider.shutdown()


def test_the_sync_sdks_http_request_runs_under_the_llm_span(
    fake: FakeLLM, caplog: pytest.LogCaptureFixture
) -> None:
    """The same with a sync client: the start's handlers run on the background loop, and the
    request in the context they left, so the LLM span is current on the caller's thread while
    the SDK sends; the caller's own context is untouched after the call."""
    httpx = pytest.importorskip("httpx")
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from llmtally.otel import OpenTelemetryHandler

    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    current: list[str] = []

    class Transport(httpx.HTTPTransport):  # type: ignore[misc, name-defined]
        def handle_request(self, request: Any) -> Any:
            span = trace.get_current_span()
            current.append(getattr(span, "name", "") if span.get_span_context().is_valid else "")
            return super().handle_request(request)

    client = openai.OpenAI(
        api_key="k",
        base_url=fake.url + "/v1",
        max_retries=0,
        http_client=httpx.Client(transport=Transport()),
    )
    instrument(client, [OpenTelemetryHandler(provider)], user_id="alice")
    tracer = provider.get_tracer("app")
    with tracer.start_as_current_span("handle request") as outer, caplog.at_level("ERROR"):
        client.chat.completions.create(**KW_CHAT)
        assert trace.get_current_span() is outer  # the caller's span is current again
        for _ in client.chat.completions.create(**KW_CHAT, stream=True):
            pass
        assert trace.get_current_span() is outer
    assert current == ["chat gpt-4o", "chat gpt-4o"]
    finished = {s.name: s for s in spans.get_finished_spans()}
    assert sorted(finished) == ["chat gpt-4o", "handle request"]
    llm_spans = [s for s in spans.get_finished_spans() if s.name == "chat gpt-4o"]
    assert len(llm_spans) == 2
    assert all(
        s.parent is not None and s.parent.span_id == outer.get_span_context().span_id
        for s in llm_spans
    )  # under the caller's span, carried to the background loop
    assert [r for r in caplog.records if "detach" in r.getMessage().lower()] == []
    client.close()
    provider.shutdown()


EXIT_CHILD = """
import asyncio, sys, llmtally, openai
url, mode, store_url = sys.argv[1:4]
store = llmtally.open_store(store_url)
MSG = [{"role": "user", "content": "What is the capital of France?"}]
keep = []
recorder = llmtally.UsageRecorder(store=store)
if mode.startswith("sync"):
    client = openai.OpenAI(api_key="k", base_url=url + "/v1", max_retries=0)
    o = llmtally.instrument(client, [recorder], user_id="exit-" + mode)
    stream = o.chat.completions.create(model="gpt-4o", messages=MSG, stream=True)
    chunks = iter(stream)
    next(chunks)
    keep.append((stream, chunks))  # open at exit
    if mode == "sync-exit":
        sys.exit(3)
    if mode == "sync-raise":
        raise RuntimeError("crash with an open stream")
else:
    async def main():
        client = openai.AsyncOpenAI(api_key="k", base_url=url + "/v1", max_retries=0)
        o = llmtally.instrument(client, [recorder], user_id="exit-" + mode)
        stream = await o.chat.completions.create(model="gpt-4o", messages=MSG, stream=True)
        await stream.__anext__()
        keep.append(stream)
    asyncio.run(main())
"""


@pytest.mark.parametrize(
    ("mode", "rc"), [("sync", 0), ("sync-exit", 3), ("sync-raise", 1), ("async", 0)]
)
def test_a_stream_open_at_exit_is_written_once_and_the_process_exits(
    fake: FakeLLM, tmp_path: Path, mode: str, rc: int
) -> None:
    """An instrumented stream still open when the interpreter exits (normally, by sys.exit, by
    an uncaught exception): the exit hook ends it as abandoned and the store writes it once;
    nothing left to the garbage collector at shutdown starts a thread or waits (the process
    used to hang there)."""
    import json
    import subprocess
    import sys
    import textwrap

    store_url = f"sqlite:///{tmp_path}/exit.db"
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(EXIT_CHILD), fake.url, mode, store_url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == rc, proc.stderr[-2000:]
    read = """
    import asyncio, json, sys, llmtally
    repo = llmtally.TokenUsageRepository(store=sys.argv[1])
    print(json.dumps(asyncio.run(repo.get_usage_stats(sys.argv[2]))))
    """
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(read), store_url, f"exit-{mode}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    stats = json.loads(out)
    assert (stats["calls"], stats["errors"]) == (1, 0)
    # OpenAI streams report usage in their last chunk: what was sent, estimated.
    assert stats["prompt_tokens"] == llmtally.estimate_tokens(MESSAGES, "gpt-4o")
