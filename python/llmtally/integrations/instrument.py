"""``instrument(client, callbacks=[...])``: every billable request of an OpenAI or Anthropic
client, sync or async, fires the llmtally events.

The client is patched in place at the one method every request goes through (``request``, which
``post`` and every resource call), so every path that reaches a billable endpoint is seen,
whichever helper made it: ``create``, ``parse``, the ``stream`` helpers, ``with_raw_response``,
``with_streaming_response``, and copies made by ``with_options``/``copy``. What each endpoint is
(metered, billed but not metered here, or not billed) is decided by :func:`classify`, a table
kept next to this docstring and checked against the installed SDKs by the test suite.

Streams are metered as they are read: they end with the provider's final usage when read to the
end, and as abandoned (the usage seen so far, else an estimate) when closed, broken off, or
dropped mid-way. A streamed chat or text completion asks the provider for its final usage chunk
(``stream_options={"include_usage": True}``) unless the caller said otherwise.
"""

from __future__ import annotations

import asyncio
import codecs
import collections
import contextvars
import inspect
import json
import logging
import re
import threading
import weakref
from asyncio import CancelledError as _Cancelled
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator
from typing import Any

from llmtally._calls import LLMCall
from llmtally._runtime import runner
from llmtally.dispatch import CallbackManager
from llmtally.errors import InvalidHandler

__all__ = ["UNMETERED", "classify", "instrument"]

logger = logging.getLogger("llmtally")

_MARK = "_llmtally_instrumented"
_RAW_HEADER = "X-Stainless-Raw-Response"

METERED, NOT_METERED, NOT_BILLED = "metered", "not metered", "not billed"

# (provider, pattern over the request path without its query, kind, reason). First match wins.
_ROUTES: list[tuple[str, re.Pattern[str], str, str]] = []


def _route(provider: str, pattern: str, kind: str, reason: str = "") -> None:
    _ROUTES.append((provider, re.compile(pattern), kind, reason))


# OpenAI: token usage in the response body (or the stream's last event).
_route("openai", r"/chat/completions", METERED)
_route("openai", r"/responses", METERED)
_route("openai", r"/completions", METERED)
_route("openai", r"/embeddings", METERED)
_route("openai", r"/decisions", METERED)
# OpenAI: billed, but not per request in tokens llmtally can read from the reply.
_BILLED_ELSEWHERE = {
    r"/responses/compact": "billed as model tokens; the reply carries no usage",
    r"/audio/(speech|transcriptions|translations)": "billed per character or audio minute",
    r"/images/(generations|edits|variations)": "billed per image",
    r"/videos(/.*)?": "billed per second of video",
    r"/batches": "billed when the batch runs; its usage is in the output file",
    r"/fine_tuning/jobs": "billed per trained token when the job runs",
    r"/fine_tuning/alpha/graders/run": "grader model tokens, billed to the run",
    r"/evals(/.*)?/runs": "model tokens billed when the eval run runs",
    r"/threads(/.*)?/runs(/[^/]+)?(/submit_tool_outputs)?": (
        "Assistants runs: usage is on the run object once it completes"
    ),
    r"/threads/runs": "Assistants runs: usage is on the run object once it completes",
    r"/realtime/(calls|sessions|transcription_sessions|client_secrets)(/.*)?": (
        "a Realtime session: usage arrives in its websocket events"
    ),
    r"/realtime/translations/client_secrets": "a Realtime session: usage in its events",
    r"/live/sessions(/.*)?": "a live session: usage arrives in its events",
    r"/agents/sessions(/.*)?": "agent sessions: model usage billed inside the session",
    r"/agents/automations/[^/]+/invocations": "agent runs: model usage billed inside the run",
    r"/chatkit/sessions": "ChatKit sessions: model usage billed inside the session",
    r"/containers(/.*)?": "billed per container session",
}
for _pattern, _reason in _BILLED_ELSEWHERE.items():
    _route("openai", _pattern, NOT_METERED, _reason)
# Anthropic.
_route("anthropic", r"/v1/messages", METERED)
_route("anthropic", r"/v1/complete", METERED)  # the legacy API reports no usage: estimated
_route(
    "anthropic",
    r"/v1/messages/batches(/.*)?",
    NOT_METERED,
    "billed when the batch runs; usage is in its results",
)
_route("anthropic", r"/v1/sessions(/.*)?", NOT_METERED, "agent sessions: usage inside the session")
_route("anthropic", r"/v1/deployments/[^/]+/run", NOT_METERED, "agent runs: usage inside the run")
_route("anthropic", r"/v1/dreams(/.*)?", NOT_METERED, "billed inside the job")
# Not billed per call: account and control plane, files and storage (billed per day, not per
# request), object management, cancellations, and the free endpoints (moderations, token
# counting). A path in none of these lists is unknown: warned once as not metered.
_FREE = {
    "openai": [
        r"/organization/.*",
        r"/projects/.*",
        r"/files(/.*)?",
        r"/uploads(/.*)?",
        r"/vector_stores(/.*)?",
        r"/moderations",
        r"/responses/input_tokens",
        r"/responses/[^/]+/cancel",
        r"/chat/completions/[^/]+",
        r"/batches/[^/]+/cancel",
        r"/fine_tuning/jobs/[^/]+/(cancel|pause|resume)",
        r"/fine_tuning/alpha/graders/validate",
        r"/fine_tuning/checkpoints/.*",
        r"/assistants(/[^/]+)?",
        r"/threads(/[^/]+)?",
        r"/threads/[^/]+/messages(/[^/]+)?",
        r"/threads/[^/]+/runs/[^/]+/cancel",
        r"/conversations(/.*)?",
        r"/evals(/[^/]+)?",
        r"/evals/[^/]+/runs/[^/]+/cancel",
        r"/evals/[^/]+/runs/[^/]+",  # cancel, in SDKs before 3
        r"/skills(/.*)?",
        r"/vaults(/.*)?",
        r"/webhook_endpoints(/.*)?",
        r"/audio/(voices|voice_consents)(/.*)?",
        r"/chatkit/sessions/[^/]+/cancel",
        r"/uploads/[^/]+/(cancel|complete|parts)",
        r"/agents(/[^/]+)?",
        r"/agents/environments(/.*)?",
        r"/agents/automations(/[^/]+)?",
        r"/agents/automations/[^/]+/(pause|resume)",
        r"/containers/[^/]+/files(/.*)?",
        r"/realtime/calls/[^/]+/(hangup|refer|reject)",
        r"/live/sessions/[^/]+/(hangup|refer|reject)",
        r"/videos/[^/]+/remix_cancel",
        r"/content_provenance_checks",  # a file check
    ],
    "anthropic": [
        r"/v1/messages/count_tokens",
        r"/v1/messages/batches/[^/]+/cancel",
        r"/v1/organizations/.*",
        r"/v1/files(/.*)?",
        r"/v1/skills(/.*)?",
        r"/v1/agents(/.*)?",
        r"/v1/environments(/.*)?",
        r"/v1/memory_stores(/.*)?",
        r"/v1/vaults(/.*)?",
        r"/v1/tunnels(/.*)?",
        r"/v1/user_profiles(/.*)?",
        r"/v1/compliance/.*",
        r"/v1/deployments(/[^/]+)?",
        r"/v1/deployments/[^/]+/(archive|pause|unpause)",
        r"/v1/dreams/[^/]+/(archive|cancel)",
        r"/v1/sessions/[^/]+/(archive|resources/.*)",
        r"/v1/sessions/[^/]+/threads/[^/]+/archive",
    ],
}
for _owner, _patterns in _FREE.items():
    for _pattern in _patterns:
        _route(_owner, _pattern, NOT_BILLED)

#: Requests to billable endpoints llmtally does not meter, by ``"provider path"``; each kind is
#: logged once, as a warning.
UNMETERED: collections.Counter[str] = collections.Counter()
_warned: set[str] = set()
_warned_lock = threading.Lock()


def classify(provider: str, path: str) -> tuple[str, str]:
    """What a ``POST`` to ``path`` is: ``("metered", "")``, ``("not metered", reason)`` (billed,
    but not in tokens this client can read; warned once when used) or ``("not billed", "")``."""
    path = path.split("?", 1)[0].rstrip("/") or "/"
    for wanted in (METERED, NOT_BILLED, NOT_METERED):  # a specific free path wins over a family
        for owner, pattern, kind, reason in _ROUTES:
            if kind == wanted and owner == provider and pattern.fullmatch(path):
                return kind, reason
    return NOT_METERED, "an endpoint llmtally does not know"


_ID_SEGMENT = re.compile(r"(?!v\d+$).*\d.*|.{40,}")
_MAX_UNMETERED = 1_000  # endpoints counted apart in UNMETERED; later ones under "<other>"


def _endpoint(path: str) -> str:
    """A request path as UNMETERED counts it: its ids (segments with a digit, other than a
    ``v1``-like version, or very long) as ``{id}``, so one endpoint is one entry whatever the
    thread, run or container it names."""
    parts = path.split("?", 1)[0].split("/")
    return "/".join("{id}" if _ID_SEGMENT.fullmatch(part) else part for part in parts)


def _unmetered(provider: str, path: str, reason: str) -> None:
    key = f"{provider} {_endpoint(path)}"
    with _warned_lock:
        if key not in UNMETERED and len(UNMETERED) >= _MAX_UNMETERED:
            key = f"{provider} <other>"
        UNMETERED[key] += 1
        first = key not in _warned
        _warned.add(key)
    if first:
        logger.warning("%s is not metered by llmtally: %s (warned once)", key, reason)


# ---------------------------------------------------------------------------------------------
# What a request says.


def _as_messages(value: Any) -> Any:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return [{"role": "user", "content": v} for v in value]
    return value


def _request_messages(provider: str, path: str, body: dict[str, Any]) -> Any:
    if provider == "anthropic":
        if "/complete" in path:
            return _as_messages(body.get("prompt"))
        messages = body.get("messages")
        system = body.get("system")
        if system and isinstance(messages, list):
            return [{"role": "system", "content": system}, *messages]
        return messages
    if path.startswith("/chat/completions"):
        return body.get("messages")
    if path.startswith("/responses"):
        found = _as_messages(body.get("input"))
        instructions = body.get("instructions")
        if instructions and isinstance(found, list):
            return [{"role": "system", "content": instructions}, *found]
        return found
    if path.startswith("/completions"):
        return _as_messages(body.get("prompt"))
    if path.startswith("/decisions"):
        return _as_messages(body.get("input"))
    return _as_messages(body.get("input"))  # embeddings


def _raw_mode(options: Any) -> str | None:
    headers = getattr(options, "headers", None)
    if isinstance(headers, dict):
        value = headers.get(_RAW_HEADER)
        return value if isinstance(value, str) else None
    return None


class _Request:
    """One metered request: its call, and how its result is read."""

    __slots__ = ("call", "raw", "stream")

    def __init__(self, call: LLMCall, stream: bool, raw: str | None) -> None:
        self.call = call
        self.stream = stream
        self.raw = raw


class _Instrumentation:
    """The manager and context of one instrumented client (and of its copies)."""

    def __init__(self, manager: CallbackManager, context: dict[str, Any], provider: str) -> None:
        self.manager = manager
        self.context = context
        self.provider = provider

    def begin(self, options: Any, kwargs: dict[str, Any]) -> _Request | None:
        """A call for a metered request (None for the others, warned when billable)."""
        if str(getattr(options, "method", "")).lower() != "post":
            return None
        path = getattr(options, "url", None)
        if not isinstance(path, str):
            return None
        kind, reason = classify(self.provider, path)
        if kind != METERED:
            if kind == NOT_METERED:
                _unmetered(self.provider, path, reason)
            return None
        body = getattr(options, "json_data", None)
        if not isinstance(body, dict):
            body = {}
        if body.get("background") is True:
            _unmetered(self.provider, path + " (background)", "usage comes when it completes")
            return None
        stream = bool(kwargs.get("stream")) or bool(body.get("stream"))
        if stream and self.provider == "openai" and path.startswith(("/chat/", "/completions")):
            stream_options = body.get("stream_options")
            stream_options = dict(stream_options) if isinstance(stream_options, dict) else {}
            if "include_usage" not in stream_options:
                stream_options["include_usage"] = True
                options.json_data = {**body, "stream_options": stream_options}
        model = body.get("model")
        call = self.manager.llm_call(
            _request_messages(self.provider, path, body),
            provider=self.provider,
            model=model if isinstance(model, str) else None,
            **dict(self.context),
        )
        return _Request(call, stream, _raw_mode(options))


# ---------------------------------------------------------------------------------------------
# Async results.


async def _settle_async(result: Any, request: _Request) -> Any:
    """End the call with ``result``, or hand back a stream/raw response that ends it later."""
    call = request.call
    if request.raw is not None and hasattr(result, "http_response"):
        return await _raw_async(result, request)
    if _is_stream(result):
        return _meter_async_stream(result, call)
    await call.end(result)
    return result


def _is_stream(result: Any) -> bool:
    """The SDKs' ``Stream``/``AsyncStream`` (and subclasses)."""
    return any(base.__name__ in ("Stream", "AsyncStream") for base in type(result).__mro__)


def _meter_async_stream(stream: Any, call: LLMCall) -> Any:
    # A stream dropped before it was read (an SDK helper may build its own from the response):
    # the call ends, as abandoned, when the stream is collected.
    _when_dropped(stream, call)
    source: AsyncIterator[Any] | None = getattr(stream, "_iterator", None)
    if source is None:  # an SDK without the iterator we wrap: a wrapper of our own
        return _AsyncStream(stream, call)
    stream._iterator = _async_chunks(source, call)
    close = stream.close

    async def close_and_abandon() -> None:
        try:
            await close()
        finally:
            await call.abandon()

    stream.close = close_and_abandon
    return stream


async def _async_chunks(source: AsyncIterator[Any], call: LLMCall) -> AsyncIterator[Any]:
    try:
        async for item in source:
            await call.chunk(item)
            yield item
    except (GeneratorExit, _Cancelled):
        # Broken off, closed, dropped, or the consumer cancelled (a client that went away).
        await call.abandon()
        raise
    except BaseException as exc:
        await call.fail(exc)
        raise
    await call.end()


class _AsyncStream:
    """A stream of an SDK whose iterator we cannot wrap in place."""

    def __init__(self, stream: Any, call: LLMCall) -> None:
        self._stream = stream
        self._chunks = _async_chunks(stream.__aiter__(), call)
        self._call = call

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._chunks

    async def __anext__(self) -> Any:
        return await self._chunks.__anext__()

    async def close(self) -> None:
        try:
            await self._stream.close()
        finally:
            await self._call.abandon()

    async def __aenter__(self) -> _AsyncStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def _raw_async(result: Any, request: _Request) -> Any:
    """A raw response (``with_raw_response``/``with_streaming_response``): the call ends when
    its body is parsed or read, as abandoned when it is closed or dropped unread."""
    call = request.call
    if not request.stream and (body := _body(result)) is not None:  # read already
        await call.end(body)
        return result
    _when_dropped(result, call)
    parse = result.parse
    if not inspect.iscoroutinefunction(parse):  # the legacy raw response of a stream

        def parse_sync(*args: Any, **kwargs: Any) -> Any:
            value = parse(*args, **kwargs)
            if _is_stream(value):
                return _meter_async_stream(value, call)
            runner.submit(call.end(value))  # a sync method of an async client
            return value

        result.parse = parse_sync
        return result

    async def parse_async(*args: Any, **kwargs: Any) -> Any:
        value = await parse(*args, **kwargs)
        if _is_stream(value):
            return _meter_async_stream(value, call)
        await call.end(value)
        return value

    result.parse = parse_async
    for name in ("json", "read", "text"):
        result.__dict__[name] = _after_async(getattr(result, name), result, call)
    _tap_async(result, request)
    close = result.close

    async def close_async() -> None:
        try:
            await close()
        finally:
            await call.abandon()

    result.close = close_async
    return result


def _after_async(
    method: Callable[[], Coroutine[Any, Any, Any]], result: Any, call: LLMCall
) -> Callable[[], Coroutine[Any, Any, Any]]:
    async def read() -> Any:
        value = await method()
        body = _body(result)
        if body is not None:
            await call.end(body)
        return value

    return read


# ---------------------------------------------------------------------------------------------
# Sync results: the events run on the background loop.


def _wait(coro: Coroutine[Any, Any, Any]) -> Any:
    return runner.run(coro)


def _settle_sync(result: Any, request: _Request, context: contextvars.Context) -> Any:
    """End the call of a finished sync request (in the request's ``context``), or meter the
    stream or raw response it returned (their ends come from the caller's code)."""
    call = request.call
    if request.raw is not None and hasattr(result, "http_response"):
        return _raw_sync(result, request)
    if _is_stream(result):
        return _meter_sync_stream(result, call)
    runner.run(call.end(result), context=context)
    return result


def _meter_sync_stream(stream: Any, call: LLMCall) -> Any:
    _when_dropped(stream, call)
    source: Iterator[Any] | None = getattr(stream, "_iterator", None)
    if source is None:
        return _SyncStream(stream, call)
    stream._iterator = _sync_chunks(source, call)
    close = stream.close

    def close_and_abandon() -> None:
        try:
            close()
        finally:
            _wait(call.abandon())

    stream.close = close_and_abandon
    return stream


def _sync_chunks(source: Iterator[Any], call: LLMCall) -> Iterator[Any]:
    try:
        for item in source:
            if call.wants_chunks:
                _wait(call.chunk(item))
            else:
                call.record_chunk(item)
            yield item
    except GeneratorExit:  # closed or dropped: nothing may wait here
        call.abandon_soon()
        raise
    except BaseException as exc:
        _wait(call.fail(exc))
        raise
    _wait(call.end())


class _SyncStream:
    def __init__(self, stream: Any, call: LLMCall) -> None:
        self._stream = stream
        self._chunks = _sync_chunks(iter(stream), call)
        self._call = call

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def __iter__(self) -> Iterator[Any]:
        return self._chunks

    def __next__(self) -> Any:
        return next(self._chunks)

    def close(self) -> None:
        try:
            self._stream.close()
        finally:
            _wait(self._call.abandon())

    def __enter__(self) -> _SyncStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _raw_sync(result: Any, request: _Request) -> Any:
    call = request.call
    if not request.stream and (body := _body(result)) is not None:  # read already
        _wait(call.end(body))
        return result
    _when_dropped(result, call)
    parse = result.parse

    def parse_sync(*args: Any, **kwargs: Any) -> Any:
        value = parse(*args, **kwargs)
        if _is_stream(value):
            return _meter_sync_stream(value, call)
        _wait(call.end(value))
        return value

    result.parse = parse_sync
    if request.raw == "true":  # the legacy raw response of a stream: parse() is the way in
        return result
    for name in ("json", "read", "text"):
        result.__dict__[name] = _after_sync(getattr(result, name), result, call)
    _tap_sync(result, request)
    close = result.close

    def close_sync() -> None:
        try:
            close()
        finally:
            _wait(call.abandon())

    result.close = close_sync
    return result


def _after_sync(method: Callable[[], Any], result: Any, call: LLMCall) -> Callable[[], Any]:
    def read() -> Any:
        value = method()
        body = _body(result)
        if body is not None:
            _wait(call.end(body))
        return value

    return read


# ---------------------------------------------------------------------------------------------
# Shared.


_MAX_BODY_CHARS = 64 * 1024 * 1024  # a JSON body read piece by piece is kept up to this


class _BodyTap:
    """What a caller reads of a raw response piece by piece (``iter_bytes``, ``iter_text``,
    ``iter_lines``, as a gateway relaying the bytes does): an SSE stream's events go into the
    call's usage as they pass, a JSON body is kept until its end. :meth:`finish` gives what the
    call ends with: the body, else ``None`` (the stream's usage, or an estimate)."""

    __slots__ = ("_call", "_decoder", "_parts", "_pending", "_size", "_stream")

    def __init__(self, call: LLMCall, stream: bool) -> None:
        self._call = call
        self._stream = stream
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._pending = ""  # an SSE line not complete yet
        self._parts: list[str] | None = []
        self._size = 0

    def feed(self, piece: Any, line: bool = False) -> None:
        text = self._decoder.decode(piece) if isinstance(piece, bytes | bytearray) else piece
        if not isinstance(text, str):
            return
        if line:
            text += "\n"
        if self._stream:
            lines = (self._pending + text).split("\n")
            self._pending = lines.pop()
            for found in lines:
                self._event(found)
            return
        if self._parts is not None:
            self._size += len(text)
            if self._size > _MAX_BODY_CHARS:
                self._parts = None  # too big to keep: the call ends with an estimate
            else:
                self._parts.append(text)

    def _event(self, line: str) -> None:
        line = line.rstrip("\r")
        if not line.startswith("data:"):
            return
        data = line[5:].strip()
        if not data or data == "[DONE]":
            return
        try:
            event = json.loads(data)
        except ValueError:
            return
        self._call.record_chunk(event)

    def finish(self) -> Any:
        tail = self._decoder.decode(b"", final=True)
        if self._stream:
            self._event(self._pending + tail)
            return None
        if self._parts is None:
            return None
        try:
            return json.loads("".join(self._parts) + tail)
        except ValueError:
            return None


def _tap_sync(result: Any, request: _Request) -> None:
    """Meter a sync raw response read with ``iter_bytes``/``iter_text``/``iter_lines``."""
    call = request.call
    for name in ("iter_bytes", "iter_text", "iter_lines"):
        method = getattr(result, name, None)
        if method is None:
            continue

        def tapped(*args: Any, _method: Any = method, _line: bool = name == "iter_lines",
                   **kwargs: Any) -> Iterator[Any]:  # fmt: skip
            tap = _BodyTap(call, request.stream)
            for piece in _method(*args, **kwargs):
                tap.feed(piece, _line)
                yield piece
            if not call.ended:
                body = tap.finish()
                _wait(call.end() if body is None else call.end(body))

        result.__dict__[name] = tapped


def _tap_async(result: Any, request: _Request) -> None:
    """Meter an async raw response read with ``iter_bytes``/``iter_text``/``iter_lines``."""
    call = request.call
    for name in ("iter_bytes", "iter_text", "iter_lines"):
        method = getattr(result, name, None)
        if method is None:
            continue

        async def tapped(*args: Any, _method: Any = method, _line: bool = name == "iter_lines",
                         **kwargs: Any) -> AsyncIterator[Any]:  # fmt: skip
            tap = _BodyTap(call, request.stream)
            async for piece in _method(*args, **kwargs):
                tap.feed(piece, _line)
                yield piece
            if not call.ended:
                body = tap.finish()
                await (call.end() if body is None else call.end(body))

        result.__dict__[name] = tapped


def _when_dropped(obj: object, call: LLMCall) -> None:
    """End ``call`` as abandoned when ``obj`` is garbage-collected. Not at interpreter exit:
    there the exit hook ends every open call and waits for it before the stores are written
    (a finalizer would end it in the background, racing the last write)."""
    finalizer = weakref.finalize(obj, call.abandon_soon)
    finalizer.atexit = False  # type: ignore[misc, unused-ignore]  # older typeshed: slots


def _body(result: Any) -> Any:
    """The JSON body of a raw response whose content was read (None for an SSE stream)."""
    try:
        content = result.http_response.content
    except Exception:  # not read
        return None
    try:
        return json.loads(content)
    except ValueError:
        return None


def _patch_request(client: Any, meter: _Instrumentation) -> None:
    original = client.request
    if inspect.iscoroutinefunction(original):

        async def metered(
            request: _Request, cast_to: Any, options: Any, *args: Any, **kwargs: Any
        ) -> Any:
            call = request.call
            await call.start()
            try:
                result = await original(cast_to, options, *args, **kwargs)
            except BaseException as exc:
                await call.fail(exc)
                raise
            return await _settle_async(result, request)

        async def request_async(cast_to: Any, options: Any, *args: Any, **kwargs: Any) -> Any:
            request = meter.begin(options, kwargs)
            if request is None:
                return await original(cast_to, options, *args, **kwargs)
            # In a copy of the caller's context: what handlers make current at the start (the
            # OpenTelemetry span the HTTP spans nest under) stays with the request, not with
            # the caller after a stream is handed back.
            return await asyncio.create_task(
                metered(request, cast_to, options, *args, **kwargs),
                context=contextvars.copy_context(),
            )

        client.request = request_async
    else:

        def request_sync(cast_to: Any, options: Any, *args: Any, **kwargs: Any) -> Any:
            request = meter.begin(options, kwargs)
            if request is None:
                return original(cast_to, options, *args, **kwargs)
            call = request.call
            # The start's handlers run in this context, and the request in it after them: what
            # they make current (the OpenTelemetry span the HTTP spans nest under) is current
            # for the request, and stays with it, not with the caller.
            context = contextvars.copy_context()
            runner.run(call.start(), context=context)
            try:
                result = context.run(original, cast_to, options, *args, **kwargs)
            except BaseException as exc:
                runner.run(call.fail(exc), context=context)
                raise
            return _settle_sync(result, request, context)

        client.request = request_sync


def _patch_copies(client: Any, meter: _Instrumentation) -> None:
    original = client.copy

    def copy(*args: Any, **kwargs: Any) -> Any:
        clone = original(*args, **kwargs)
        _instrument(clone, meter)
        return clone

    client.copy = copy
    client.with_options = copy


def _patch_websockets(client: Any, meter: _Instrumentation) -> None:
    """Realtime sessions run over a websocket, outside ``request``: warned once when opened."""
    for path in (("realtime",), ("beta", "realtime")):
        resource: Any = client
        try:
            for name in path:
                resource = getattr(resource, name)
        except Exception:  # not in this SDK version
            continue
        connect = getattr(resource, "connect", None)
        if connect is None or getattr(connect, _MARK, False):
            continue

        def warn_and_connect(
            *args: Any, _connect: Any = connect, _path: str = ".".join(path), **kwargs: Any
        ) -> Any:
            _unmetered(meter.provider, f"{_path}.connect", "a Realtime session over a websocket")
            return _connect(*args, **kwargs)

        setattr(warn_and_connect, _MARK, True)
        resource.connect = warn_and_connect


def _instrument(client: Any, meter: _Instrumentation) -> None:
    if client.__dict__.get(_MARK) is not None:
        return
    client.__dict__[_MARK] = meter
    _patch_request(client, meter)
    _patch_copies(client, meter)
    _patch_websockets(client, meter)


def instrument(
    client: Any,
    callbacks: Iterable[object] | CallbackManager | None = None,
    *,
    user_id: str | None = None,
    **context: Any,
) -> Any:
    """Meter every LLM call made through ``client`` (``openai.OpenAI``/``AsyncOpenAI``, Azure's,
    ``anthropic.Anthropic``/``AsyncAnthropic``, Bedrock's and Vertex's); returns the same
    client, patched in place. Calling it again on the same client changes nothing.

    ``callbacks`` is a list of handlers or a :class:`CallbackManager`; ``user_id`` and other
    ``context`` kwargs go to every event (an enclosing scope's ``user_id`` is inherited when
    none is given here). A sync client runs the handlers on llmtally's background event loop
    and waits for them; a ``CallbackAbort`` (a budget) is raised to the caller either way.

    Raises:
        InvalidHandler: for an object that is not an OpenAI or Anthropic client.
    """
    module = type(client).__module__.split(".", 1)[0]
    if module not in ("openai", "anthropic") or not callable(getattr(client, "request", None)):
        raise InvalidHandler(
            "instrument() takes an OpenAI or Anthropic client (sync or async), not "
            f"{type(client).__module__}.{type(client).__name__}"
        )
    if client.__dict__.get(_MARK) is not None:
        return client
    manager = callbacks if isinstance(callbacks, CallbackManager) else CallbackManager(callbacks)
    if user_id is not None:
        context["user_id"] = user_id
    _instrument(client, _Instrumentation(manager, context, module))
    return client
