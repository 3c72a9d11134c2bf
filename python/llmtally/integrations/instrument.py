"""``instrument(client, callbacks=[...])``: every create of an async OpenAI or Anthropic client
fires the llmtally events, streaming included.

Patched in place and idempotent: ``client.chat.completions.create`` and
``client.responses.create`` of ``openai.AsyncOpenAI`` (and Azure's), ``client.messages.create``
of ``anthropic.AsyncAnthropic``. A streamed chat completion asks the provider for its final usage
chunk (``stream_options={"include_usage": True}``) unless the caller said otherwise; a stream
without one is estimated (``estimated: True``).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import AsyncIterator, Callable, Iterable
from types import TracebackType
from typing import Any

from llmtally.dispatch import CallbackManager, LLMCall
from llmtally.errors import InvalidHandler

__all__ = ["instrument"]

_MARK = "_llmtally_instrumented"


class _MeteredStream:
    """Wraps a provider's async stream: each item is a chunk of the call, the call ends when
    the stream is exhausted, closed or fails."""

    def __init__(self, stream: Any, call: LLMCall) -> None:
        self._stream = stream
        self._call = call
        self._ended = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Any]:
        try:
            async for item in self._stream:
                await self._call.chunk(item)
                yield item
        except BaseException:
            await self._end(*sys.exc_info())
            raise
        await self._end(None, None, None)

    async def _end(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._ended:
            self._ended = True
            await self._call.__aexit__(exc_type, exc, tb)

    async def close(self) -> None:
        """Close the provider's stream; the call ends with what arrived so far."""
        try:
            await self._stream.close()
        finally:
            await self._end(None, None, None)

    async def __aenter__(self) -> _MeteredStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self._stream.close()
        finally:
            await self._end(exc_type, exc, tb)


def _wrap(
    original: Callable[..., Any],
    manager: CallbackManager,
    provider: str,
    messages_key: str,
    context: dict[str, Any],
    chat_stream_usage: bool,
) -> Callable[..., Any]:
    @functools.wraps(original)
    async def create(*args: Any, **kwargs: Any) -> Any:
        stream = bool(kwargs.get("stream"))
        if stream and chat_stream_usage:
            options = dict(kwargs.get("stream_options") or {})
            options.setdefault("include_usage", True)
            kwargs["stream_options"] = options
        messages = kwargs.get(messages_key)
        if provider == "anthropic" and kwargs.get("system") and isinstance(messages, list):
            system = kwargs["system"]
            messages = [{"role": "system", "content": system}, *messages]
        call = manager.llm_call(
            messages, provider=provider, model=kwargs.get("model"), **dict(context)
        )
        await call.__aenter__()
        try:
            result = await original(*args, **kwargs)
        except BaseException:
            await call.__aexit__(*sys.exc_info())
            raise
        if stream:
            call.detach_context()  # the stream may outlive this task's current scope
            return _MeteredStream(result, call)
        call.set_response(result)
        await call.__aexit__(None, None, None)
        return result

    setattr(create, _MARK, True)
    return create


def instrument(
    client: Any,
    callbacks: Iterable[object] | CallbackManager | None = None,
    *,
    user_id: str | None = None,
    **context: Any,
) -> Any:
    """Meter every LLM call made through ``client`` (``openai.AsyncOpenAI`` or
    ``anthropic.AsyncAnthropic``); returns the same client, patched in place. Calling it again
    on the same client changes nothing.

    ``callbacks`` is a list of handlers or a :class:`CallbackManager`; ``user_id`` and other
    ``context`` kwargs go to every event (an enclosing scope's ``user_id`` is inherited when
    none is given here).

    Raises:
        InvalidHandler: for a client that is not an async OpenAI or Anthropic client.
    """
    manager = callbacks if isinstance(callbacks, CallbackManager) else CallbackManager(callbacks)
    if user_id is not None:
        context["user_id"] = user_id
    module = type(client).__module__.split(".", 1)[0]
    patched = False
    if module == "openai":
        completions = getattr(getattr(client, "chat", None), "completions", None)
        patched |= _patch(completions, manager, "openai", "messages", context, True)
        responses = getattr(client, "responses", None)
        patched |= _patch(responses, manager, "openai", "input", context, False)
    elif module == "anthropic":
        patched |= _patch(
            getattr(client, "messages", None), manager, "anthropic", "messages", context, False
        )
    if not patched and not _is_instrumented(client, module):
        raise InvalidHandler(
            "instrument() takes an openai.AsyncOpenAI or anthropic.AsyncAnthropic client, not "
            f"{type(client).__module__}.{type(client).__name__}"
        )
    return client


def _is_instrumented(client: Any, module: str) -> bool:
    if module == "openai":
        completions = getattr(getattr(client, "chat", None), "completions", None)
        return bool(getattr(getattr(completions, "create", None), _MARK, False))
    if module == "anthropic":
        return bool(
            getattr(getattr(getattr(client, "messages", None), "create", None), _MARK, False)
        )
    return False


def _patch(
    resource: Any,
    manager: CallbackManager,
    provider: str,
    messages_key: str,
    context: dict[str, Any],
    chat_stream_usage: bool,
) -> bool:
    if resource is None:
        return False
    original = getattr(resource, "create", None)
    if original is None or getattr(original, _MARK, False):
        return False
    # The SDKs' async resources are named Async* (their create is wrapped, so it does not look
    # like a coroutine function to inspect).
    if not type(resource).__name__.startswith("Async"):
        raise InvalidHandler(
            f"{type(resource).__name__}.create is not async: instrument() needs the async client"
        )
    resource.create = _wrap(original, manager, provider, messages_key, context, chat_stream_usage)
    return True
