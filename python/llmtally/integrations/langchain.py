"""LangChain integration: feed llmtally handlers from LangChain runs, or meter with
LangChain-native callbacks.

Install with the ``[langchain]`` extra; this module imports ``langchain_core`` and is never
imported by ``llmtally`` itself.

- :class:`LlmtallyCallbackHandler` is a LangChain ``AsyncCallbackHandler`` that turns LangChain's
  runs into llmtally events: chat models and LLMs become LLM calls (usage from the message's
  ``usage_metadata``, else ``llm_output["token_usage"]``, else estimated), streamed tokens become
  chunks, chains, tools and retrievers become chain, tool and retrieval events. LangChain's
  ``run_id`` is the call's ``request_id`` and ``run_id`` (so each run is counted once), its
  ``parent_run_id`` the parent link.
- :class:`TokenCountingCallback`, :class:`CostTrackingCallback`, :class:`PerformanceCallback`,
  :class:`StreamingCallback`, :class:`DefectAnalysisCallback` and :class:`CompositeCallback` are
  plain LangChain callbacks (``BaseCallbackHandler``), called inline and thread-safe, for code
  that wants the numbers without an llmtally manager.

Neither kind ever raises into the LangChain call: failures are logged and counted. The one
exception is on purpose: an llmtally handler raising ``CallbackAbort`` (``BudgetExceeded``,
``RateLimited``) at the start of a run stops that run.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar, cast
from uuid import UUID

from langchain_core.callbacks import AsyncCallbackHandler as _LCAsyncHandler
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import BaseMessage, get_buffer_string
from langchain_core.outputs import ChatGeneration, LLMResult

from llmtally._calls import LLMCall, price_response
from llmtally._context import current_run
from llmtally._names import OTHER
from llmtally._native import PUSD_PER_USD, BadUsage, Usage, extract_usage, make_response
from llmtally.dispatch import CallbackManager
from llmtally.errors import CallbackAbort
from llmtally.integrations._runs import FailureGuard, OpenRuns
from llmtally.tokens import estimate_tokens
from llmtally.trackers import (
    MAX_BYTES,
    MAX_KEYS,
    MAX_MODELS,
    CostTracker,
    PerformanceTracker,
    TokenCounter,
)

__all__ = [
    "CompositeCallback",
    "CostTrackingCallback",
    "DefectAnalysisCallback",
    "LlmtallyCallbackHandler",
    "PerformanceCallback",
    "StreamingCallback",
    "TokenCountingCallback",
]

logger = logging.getLogger("llmtally")

MAX_OPEN_RUNS = 100_000
"""Runs tracked at once per handler; past it the oldest open run is forgotten (counted)."""

_ROLES = {"human": "user", "ai": "assistant", "system": "system", "tool": "tool"}


# ---------------------------------------------------------------------------------------------
# Reading LangChain objects.


def _text_of(content: Any) -> str:
    """The text of a message's content (a string or a list of content blocks)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for block in content:
            if isinstance(block, str):
                parts.append(block)
            elif isinstance(block, dict) and isinstance(block.get("text"), str):
                parts.append(block["text"])
        return "".join(parts)
    return ""


def _message_dict(message: BaseMessage) -> dict[str, Any]:
    role = _ROLES.get(message.type)
    if role is None:
        role = str(getattr(message, "role", None) or message.type)
    out: dict[str, Any] = {"role": role, "content": _text_of(message.content)}
    if isinstance(message.name, str) and message.name:
        out["name"] = message.name
    return out


def _model_and_provider(
    serialized: Mapping[str, Any] | None,
    metadata: Mapping[str, Any] | None,
    kwargs: Mapping[str, Any],
) -> tuple[str | None, str | None]:
    """The model and provider of a run: LangChain's ``ls_model_name``/``ls_provider`` metadata,
    else the invocation params, else the serialized constructor kwargs."""
    model: Any = None
    provider: Any = None
    if metadata:
        model = metadata.get("ls_model_name")
        provider = metadata.get("ls_provider")
    if not model:
        params = kwargs.get("invocation_params")
        if isinstance(params, Mapping):
            model = params.get("model") or params.get("model_name") or params.get("model_id")
    if not model and serialized:
        init = serialized.get("kwargs")
        if isinstance(init, Mapping):
            model = init.get("model") or init.get("model_name")
    return (
        model if isinstance(model, str) and model else None,
        provider if isinstance(provider, str) and provider else None,
    )


def _generation_parts(response: LLMResult) -> tuple[Any, str, str | None]:
    """``(message, text, model_name)`` of a result's first generation (message ``None`` for a
    text LLM)."""
    try:
        generation = response.generations[0][0]
    except (IndexError, TypeError):
        return None, "", None
    if isinstance(generation, ChatGeneration):
        message = generation.message
        model = message.response_metadata.get("model_name") or message.response_metadata.get(
            "model"
        )
        return message, _text_of(message.content), model if isinstance(model, str) else None
    return None, generation.text if isinstance(generation.text, str) else "", None


def _token_usage(response: LLMResult) -> Any:
    output = response.llm_output
    if not isinstance(output, dict):
        return None
    usage = output.get("token_usage") or output.get("usage")
    return usage if isinstance(usage, dict) and usage else None


_ZERO_USAGE: dict[str, int] = {"prompt_tokens": 0, "completion_tokens": 0}


def _batch_share(response: LLMResult, message: Any, batch_size: int) -> bool:
    """True for a run whose ``llm_output`` says ``token_usage: {}`` on purpose: what
    ``LLMResult.flatten()`` gives every run of a text-completion batch but the first. A chat
    model's runs are not flattened, and a single run's ``{}`` is a provider that reported
    nothing (a streamed completion): those are estimated, never a silent zero."""
    output = response.llm_output
    return (
        batch_size > 1
        and message is None
        and isinstance(output, dict)
        and output.get("token_usage") == {}
    )


def _batch_size(kwargs: Mapping[str, Any]) -> int:
    """The ``batch_size`` LangChain gives ``on_llm_start`` (1 when absent)."""
    size = kwargs.get("batch_size")
    return size if type(size) is int else 1


def _reported_usage(response: LLMResult, message: Any, batch_size: int = 1) -> Usage | None:
    """The provider's usage: the message's ``usage_metadata``, else ``llm_output``'s
    ``token_usage`` (zero for the runs of a batch after the first). Raises ``BadUsage`` for
    counts that cannot be trusted."""
    usage_metadata = getattr(message, "usage_metadata", None) if message is not None else None
    if usage_metadata:
        # A plain dict reads in about a tenth of the time of the pydantic message.
        found = extract_usage({"usage_metadata": usage_metadata})
        if found is not None:
            return found
    token_usage = _token_usage(response)
    if token_usage is not None:
        return extract_usage({"usage": token_usage})
    if _batch_share(response, message, batch_size):
        return Usage(total_tokens=0, prompt_tokens=0, completion_tokens=0)
    return None


def _estimated_usage(messages: Any, text: str, model: str | None) -> Usage:
    prompt = 0
    if messages:
        try:
            prompt = estimate_tokens(messages, model)
        except (TypeError, ValueError):
            prompt = 0
    completion = estimate_tokens(text, model) if text else 0
    return Usage(
        total_tokens=prompt + completion, prompt_tokens=prompt, completion_tokens=completion
    )


def _run_key(run_id: Any) -> str:
    return str(run_id)


# ---------------------------------------------------------------------------------------------
# LlmtallyCallbackHandler.


class _OpenCall:
    __slots__ = ("batch_size", "call", "trace_id")

    def __init__(self, call: LLMCall, trace_id: Any, batch_size: int = 1) -> None:
        self.call = call
        self.trace_id = trace_id
        self.batch_size = batch_size


def _end_evicted(run: _OpenCall | _OpenScope) -> None:
    """A run whose end never came, pushed out of the registry: a call ends as abandoned."""
    if isinstance(run, _OpenCall):
        run.call.abandon_soon()


class _OpenScope:
    __slots__ = ("kind", "kwargs", "name", "trace_id")

    def __init__(self, kind: str, name: str, kwargs: dict[str, Any]) -> None:
        self.kind = kind
        self.name = name
        self.kwargs = kwargs
        self.trace_id = kwargs.get("trace_id")


def _scope_name(serialized: Mapping[str, Any] | None, kwargs: Mapping[str, Any]) -> str:
    name = kwargs.get("name")
    if isinstance(name, str) and name:
        return name
    if serialized:
        name = serialized.get("name")
        if isinstance(name, str) and name:
            return name
        ids = serialized.get("id")
        if isinstance(ids, list) and ids and isinstance(ids[-1], str):
            return ids[-1]
    return "unknown"


class LlmtallyCallbackHandler(_LCAsyncHandler):
    """Feeds llmtally handlers from LangChain runs; pass it in LangChain's ``callbacks``.

    Args:
        callbacks: llmtally handlers (``CostTracker()``, ``TokenCounter()``, seed handlers, your
            own ``AsyncCallbackHandler``), or a :class:`~llmtally.CallbackManager`.
        user_id: the user charged; a run's ``metadata["user_id"]`` wins over it.
        **context: more kwargs given to every llmtally event.

    >>> from llmtally import TokenCounter
    >>> handler = LlmtallyCallbackHandler([TokenCounter()], user_id="alice")
    >>> handler.errors
    0

    Pick it when your app already meters with llmtally handlers (stores, budgets, rate limits)
    and also calls models through LangChain; use the native callbacks below for numbers alone.
    """

    run_inline = True
    # Only a CallbackAbort gets out (on purpose); every other failure is caught here.
    raise_error = True

    def __init__(
        self,
        callbacks: Iterable[object] | CallbackManager | None = None,
        user_id: str | None = None,
        **context: Any,
    ) -> None:
        super().__init__()
        self.manager = (
            callbacks if isinstance(callbacks, CallbackManager) else CallbackManager(callbacks)
        )
        if user_id is not None:
            context["user_id"] = user_id
        self._context = context
        self._runs: OpenRuns[str, _OpenCall | _OpenScope] = OpenRuns(
            MAX_OPEN_RUNS, "LangChain runs", _end_evicted
        )
        self._lock = threading.Lock()
        self._failed = FailureGuard("LlmtallyCallbackHandler")

    # -- bookkeeping ------------------------------------------------------------------------

    @property
    def errors(self) -> int:
        """The handler's own failures (isolated, logged)."""
        return self._failed.errors

    @property
    def evicted_runs(self) -> int:
        """Runs past ``MAX_OPEN_RUNS`` open at once (an LLM call among them ended as
        abandoned)."""
        return self._runs.evicted

    def _put(self, key: str, run: _OpenCall | _OpenScope) -> None:
        self._runs.put(key, run)

    def _pop(self, run_id: Any) -> _OpenCall | _OpenScope | None:
        return self._runs.pop(_run_key(run_id))

    def _links(
        self, run_id: UUID, parent_run_id: UUID | None, metadata: Mapping[str, Any] | None
    ) -> tuple[dict[str, Any], Any]:
        """The context kwargs of a run, and its parent's trace id when LangChain gave one."""
        kwargs = dict(self._context)
        if metadata:
            user = metadata.get("user_id")
            # Any id but None or "": the manager applies the identity rule (0 is "0").
            if user is not None and not (isinstance(user, str) and not str.__len__(user)):
                kwargs["user_id"] = user
        key = _run_key(run_id)
        kwargs["run_id"] = key
        trace: Any = None
        if parent_run_id is not None:
            parent_key = _run_key(parent_run_id)
            kwargs["parent_run_id"] = parent_key
            parent = self._runs.get(parent_key)
            trace = parent.trace_id if parent is not None else parent_key
        return kwargs, trace

    # -- LLM runs -----------------------------------------------------------------------------

    async def _start_llm(
        self,
        messages: list[dict[str, Any]],
        serialized: dict[str, Any],
        run_id: UUID,
        parent_run_id: UUID | None,
        metadata: dict[str, Any] | None,
        kwargs: dict[str, Any],
        text: bool = False,
    ) -> None:
        model, provider = _model_and_provider(serialized, metadata, kwargs)
        context, trace = self._links(run_id, parent_run_id, metadata)
        context["request_id"] = context["run_id"]
        if trace is not None:
            context["trace_id"] = trace
        call = self.manager.llm_call(messages, provider=provider, model=model, **context)
        # A CallbackAbort here stops the LangChain run, on purpose; the call ends in another
        # callback, maybe in another task.
        await call.start()
        batch = _batch_size(kwargs) if text else 1
        self._put(context["run_id"], _OpenCall(call, call.context.get("trace_id"), batch))

    async def on_chat_model_start(
        self,
        serialized: dict[str, Any],
        messages: list[list[BaseMessage]],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Open an llmtally LLM call for a chat model run."""
        try:
            converted = [_message_dict(m) for m in messages[0]] if messages else []
            await self._start_llm(converted, serialized, run_id, parent_run_id, metadata, kwargs)
        except CallbackAbort:
            raise
        except Exception as exc:
            self._failed("on_chat_model_start", exc)

    async def on_llm_start(
        self,
        serialized: dict[str, Any],
        prompts: list[str],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Open an llmtally LLM call for a text LLM run (the prompt as one user message)."""
        try:
            converted = [{"role": "user", "content": p} for p in prompts if isinstance(p, str)]
            await self._start_llm(
                converted, serialized, run_id, parent_run_id, metadata, kwargs, text=True
            )
        except CallbackAbort:
            raise
        except Exception as exc:
            self._failed("on_llm_start", exc)

    async def on_llm_new_token(
        self,
        token: str | list[str | dict[str, Any]],
        *,
        chunk: Any = None,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """A streamed token: ``call.chunk(text)`` (first one sets the time to first token),
        with the usage the chunk's message carries (LangChain's chunks carry deltas, summed),
        so a stream abandoned mid-way ends with the usage seen so far."""
        try:
            run = self._runs.get(_run_key(run_id))
            if isinstance(run, _OpenCall):
                text = token if isinstance(token, str) else _text_of(token)
                found = getattr(getattr(chunk, "message", None), "usage_metadata", None)
                usage = {"usage_metadata": found} if found else None
                await run.call.chunk(text, usage=usage)
        except CallbackAbort as abort:
            logger.debug("abort %r on a stream chunk ignored: the run already started", abort)
        except Exception as exc:
            self._failed("on_llm_new_token", exc)

    async def on_llm_end(
        self,
        response: LLMResult,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """End the call with the run's usage (``usage_metadata``, else ``token_usage``)."""
        try:
            run = self._pop(run_id)
            if not isinstance(run, _OpenCall):
                return
            call = run.call
            message, text, model = _generation_parts(response)
            if model and call.model == "unknown":
                call.model = model
            usage_metadata = getattr(message, "usage_metadata", None)
            if usage_metadata:
                # A plain dict reads in about a tenth of the time of the pydantic message.
                call.set_response({"usage_metadata": usage_metadata, "content": text})
            else:
                token_usage = _token_usage(response)
                if token_usage is not None:
                    call.set_response({"usage": token_usage, "content": text})
                elif _batch_share(response, message, run.batch_size):
                    # Runs 2..n of a batch: LangChain gives the batch's usage to the first run
                    # and an explicit empty token_usage to the others, which is zero, not unknown.
                    call.set_response({"usage": _ZERO_USAGE, "content": text})
                elif message is not None:
                    call.set_response(message)  # no usage: estimated from its content
                elif text:
                    call.set_response({"content": text})
            await call.end()
        except CallbackAbort as abort:
            logger.debug("abort %r at the end of a run ignored: the run is over", abort)
        except Exception as exc:
            self._failed("on_llm_end", exc)

    async def on_llm_error(
        self,
        error: BaseException,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """End the call with the error (counted in ``errors``, or ``timeouts``)."""
        try:
            run = self._pop(run_id)
            if isinstance(run, _OpenCall):
                await run.call.fail(error)
        except CallbackAbort as abort:
            logger.debug("abort %r after a failed run ignored", abort)
        except Exception as exc:
            self._failed("on_llm_error", exc)

    # -- chains, tools, retrievers ------------------------------------------------------------

    async def _start_scope(
        self,
        kind: str,
        event: str,
        args: tuple[Any, ...],
        name: str,
        run_id: UUID,
        parent_run_id: UUID | None,
        metadata: dict[str, Any] | None,
    ) -> None:
        kwargs, trace = self._links(run_id, parent_run_id, metadata)
        if parent_run_id is None:
            outer = current_run()  # an enclosing llmtally scope of the app, if any
            if outer is not None:
                kwargs = {**outer, **kwargs, "parent_run_id": outer["run_id"]}
                kwargs["run_id"] = _run_key(run_id)
            else:
                kwargs["parent_run_id"] = None
        kwargs["trace_id"] = (
            trace if trace is not None else kwargs.get("trace_id") or kwargs["run_id"]
        )
        self._put(kwargs["run_id"], _OpenScope(kind, name, kwargs))
        await self.manager.dispatch(event, *args, **kwargs)

    async def _end_scope(self, kind: str, run_id: UUID, result: Any, failed: bool) -> None:
        run = self._pop(run_id)
        if not isinstance(run, _OpenScope) or run.kind != kind:
            return
        prefix: tuple[Any, ...] = (run.name,) if kind == "tool" else ()
        event = f"on_{kind}_{'error' if failed else 'end'}"
        await self.manager.dispatch(event, *prefix, result, **run.kwargs)

    async def on_chain_start(
        self,
        serialized: dict[str, Any],
        inputs: dict[str, Any],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """``on_chain_start(chain_name)`` with LangChain's run ids."""
        try:
            name = _scope_name(serialized, kwargs)
            await self._start_scope(
                "chain", "on_chain_start", (name,), name, run_id, parent_run_id, metadata
            )
        except CallbackAbort:
            raise
        except Exception as exc:
            self._failed("on_chain_start", exc)

    async def on_chain_end(
        self,
        outputs: dict[str, Any],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """``on_chain_end(outputs)``."""
        await self._guarded_end("chain", "on_chain_end", run_id, outputs, False)

    async def on_chain_error(
        self,
        error: BaseException,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """``on_chain_error(error)``."""
        await self._guarded_end("chain", "on_chain_error", run_id, error, True)

    async def on_tool_start(
        self,
        serialized: dict[str, Any],
        input_str: str,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        inputs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """``on_tool_start(tool_name, args)`` (args: the tool's inputs, else its input string)."""
        try:
            name = _scope_name(serialized, kwargs)
            args = inputs if inputs is not None else input_str
            await self._start_scope(
                "tool", "on_tool_start", (name, args), name, run_id, parent_run_id, metadata
            )
        except CallbackAbort:
            raise
        except Exception as exc:
            self._failed("on_tool_start", exc)

    async def on_tool_end(
        self,
        output: Any,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """``on_tool_end(tool_name, output)``."""
        await self._guarded_end("tool", "on_tool_end", run_id, output, False)

    async def on_tool_error(
        self,
        error: BaseException,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """``on_tool_error(tool_name, error)``."""
        await self._guarded_end("tool", "on_tool_error", run_id, error, True)

    async def on_retriever_start(
        self,
        serialized: dict[str, Any],
        query: str,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """``on_retrieval_start(query)``."""
        try:
            name = _scope_name(serialized, kwargs)
            await self._start_scope(
                "retrieval", "on_retrieval_start", (query,), name, run_id, parent_run_id, metadata
            )
        except CallbackAbort:
            raise
        except Exception as exc:
            self._failed("on_retriever_start", exc)

    async def on_retriever_end(
        self,
        documents: Sequence[Any],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """``on_retrieval_end(documents)``."""
        await self._guarded_end("retrieval", "on_retriever_end", run_id, documents, False)

    async def on_retriever_error(
        self,
        error: BaseException,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """``on_retrieval_error(error)``."""
        await self._guarded_end("retrieval", "on_retriever_error", run_id, error, True)

    async def on_agent_action(
        self,
        action: Any,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """``on_agent_step(action)``, in the agent's chain run."""
        try:
            run = self._runs.get(_run_key(run_id))
            context = run.kwargs if isinstance(run, _OpenScope) else {**self._context}
            await self.manager.dispatch("on_agent_step", action, **context)
        except CallbackAbort as abort:
            logger.debug("abort %r on an agent step ignored", abort)
        except Exception as exc:
            self._failed("on_agent_action", exc)

    async def _guarded_end(
        self, kind: str, event: str, run_id: UUID, result: Any, failed: bool
    ) -> None:
        try:
            await self._end_scope(kind, run_id, result, failed)
        except CallbackAbort as abort:
            logger.debug("abort %r at %s ignored: the run is over", abort, event)
        except Exception as exc:
            self._failed(event, exc)

    @property
    def open_runs(self) -> int:
        """LangChain runs started and not yet ended."""
        return len(self._runs)


# ---------------------------------------------------------------------------------------------
# LangChain-native callbacks.

_F = TypeVar("_F", bound=Callable[..., Any])


def _isolated(method: _F) -> _F:
    """Never let the callback's own failure reach LangChain: log once, count."""

    @functools.wraps(method)
    def wrapper(self: _NativeCallback, *args: Any, **kwargs: Any) -> None:
        try:
            method(self, *args, **kwargs)
        except Exception as exc:
            self._own_failure(method.__name__, exc)

    return cast(_F, wrapper)


class _Start:
    __slots__ = ("batch_size", "first_token_at", "messages", "model", "provider", "started_at")

    def __init__(
        self,
        model: str | None,
        provider: str | None,
        messages: Any,
        started_at: float,
        batch_size: int = 1,
    ) -> None:
        self.model = model
        self.provider = provider
        self.messages = messages
        self.started_at = started_at
        self.batch_size = batch_size
        self.first_token_at: float | None = None


def _forget(start: object) -> None:
    """A native callback's run pushed out of the registry: nothing to end (its end, if it comes,
    is still counted, without the start's model and prompt)."""


class _NativeCallback(BaseCallbackHandler):
    """The shared part of the LangChain-native callbacks: the runs' start records (in the same
    bounded registry as :class:`LlmtallyCallbackHandler`), a lock, failure isolation, and the
    reading of a finished run into llmtally's normalized response dict, which the subclasses
    hand to a tracker of :mod:`llmtally.trackers` (one counting stack for both kinds)."""

    run_inline = True
    raise_error = False
    #: Whether the prompt is kept until the end of the run (to estimate usage when absent).
    _keep_messages: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.RLock()
        self._starts: OpenRuns[str, _Start] = OpenRuns(MAX_OPEN_RUNS, "LangChain runs", _forget)
        self._guard = FailureGuard(type(self).__name__)
        self.bad_input = 0
        self._clock: Callable[[], float] = time.perf_counter

    @property
    def callback_errors(self) -> int:
        """The callback's own failures (isolated, never raised into LangChain)."""
        return self._guard.errors

    def _own_failure(self, event: str, exc: BaseException) -> None:
        with self._lock:
            self._guard(event, exc)

    def _start(
        self,
        run_id: Any,
        model: str | None,
        provider: str | None,
        messages: Any,
        batch_size: int = 1,
    ) -> None:
        kept = messages if self._keep_messages else None
        self._starts.put(_run_key(run_id), _Start(model, provider, kept, self._clock(), batch_size))

    def _end(self, run_id: Any) -> _Start | None:
        return self._starts.pop(_run_key(run_id))

    @_isolated
    def on_chat_model_start(
        self,
        serialized: dict[str, Any],
        messages: list[list[BaseMessage]],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        model, provider = _model_and_provider(serialized, metadata, kwargs)
        converted = None
        if self._keep_messages and messages:
            converted = [_message_dict(m) for m in messages[0]]
        self._start(run_id, model, provider, converted)

    @_isolated
    def on_llm_start(
        self,
        serialized: dict[str, Any],
        prompts: list[str],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        model, provider = _model_and_provider(serialized, metadata, kwargs)
        converted = None
        if self._keep_messages:
            converted = [{"role": "user", "content": p} for p in prompts if isinstance(p, str)]
        self._start(run_id, model, provider, converted, _batch_size(kwargs))

    def _usage(self, response: LLMResult, start: _Start | None) -> tuple[Usage, bool, str]:
        """``(usage, estimated, model)`` of a finished run."""
        message, text, found_model = _generation_parts(response)
        model = found_model or (start.model if start is not None else None) or "unknown"
        try:
            usage = _reported_usage(response, message, start.batch_size if start else 1)
        except BadUsage as exc:
            with self._lock:
                self.bad_input += 1
            logger.warning("bad usage in a LangChain result skipped (estimated): %s", exc)
            usage = None
        if usage is not None:
            return usage, False, model
        messages = start.messages if start is not None else None
        estimate_model = model if model != "unknown" else None
        return _estimated_usage(messages, text, estimate_model), True, model

    def _finished(
        self, response: LLMResult, run_id: Any
    ) -> tuple[dict[str, Any], dict[str, Any], _Start | None]:
        """A finished run as the normalized response dict a tracker's ``on_llm_end`` takes
        (priced from the table when the provider gave no cost), the context kwargs
        (``provider``, ``model``), and its start record."""
        now = self._clock()
        start = self._end(run_id)
        usage, estimated, model = self._usage(response, start)
        provider = (start.provider if start is not None else None) or "unknown"
        duration = now - start.started_at if start is not None else 0.0
        out = make_response(usage, None, estimated, None, provider, model, duration, "")
        problem = price_response(out, provider)
        if problem is not None:
            with self._lock:
                self.bad_input += 1
            logger.warning("cost of a LangChain run not computed: %s", problem)
        return out, {"provider": provider, "model": model}, start

    def _failed(self, run_id: Any) -> dict[str, Any]:
        """The context kwargs of a failed run (its start record dropped)."""
        start = self._end(run_id)
        if start is None:
            return {"provider": "unknown", "model": "unknown"}
        return {"provider": start.provider or "unknown", "model": start.model or "unknown"}


def _token_counts(c: Mapping[str, Any], estimated: int) -> dict[str, int]:
    """A tracker's counts under this callback's names (``input``/``output`` with the
    ``prompt``/``completion`` aliases)."""
    return {
        "total_tokens": c["total_tokens"],
        "input_tokens": c["prompt_tokens"],
        "output_tokens": c["completion_tokens"],
        "prompt_tokens": c["prompt_tokens"],
        "completion_tokens": c["completion_tokens"],
        "cached_tokens": c["cached_tokens"],
        "cache_write_tokens": c["cache_write_tokens"],
        "reasoning_tokens": c["reasoning_tokens"],
        "requests": c["requests"],
        "estimated_requests": estimated,
        "errors": c["errors"],
        "timeouts": c["timeouts"],
    }


class TokenCountingCallback(_NativeCallback):
    """Token totals of every LangChain LLM run it sees, and per model and provider, kept in a
    :class:`~llmtally.TokenCounter` (``tracker``; capped by ``max_keys``/``max_bytes``, later
    models counted under ``"<other>"``).

    Provider-reported usage (``usage_metadata``, else ``llm_output["token_usage"]``) wins; a run
    without it is estimated from its prompt and output (counted in ``estimated_requests``).
    ``input_tokens`` (= ``prompt_tokens``) include cache reads and writes, ``output_tokens``
    (= ``completion_tokens``) include reasoning. Failed runs are counted in ``errors`` and
    ``timeouts`` per model.

    >>> counter = TokenCountingCallback()
    >>> counter.total_tokens, counter.prompt_tokens, counter.completion_tokens
    (0, 0, 0)
    """

    _keep_messages = True

    def __init__(self, *, max_keys: int = MAX_KEYS, max_bytes: int = MAX_BYTES) -> None:
        super().__init__()
        self.tracker = TokenCounter(max_keys=max_keys, max_bytes=max_bytes)
        self.estimated_requests = 0
        self._estimated: Counter[tuple[str, str]] = Counter()

    @_isolated
    def on_llm_end(
        self,
        response: LLMResult,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        out, context, _ = self._finished(response, run_id)
        with self._lock:
            self.tracker._track_end(out, context)
            if out["estimated"]:
                self.estimated_requests += 1
                key = (context["provider"], context["model"])
                if key not in self._estimated and len(self._estimated) >= MAX_MODELS:
                    key = (context["provider"], OTHER)
                self._estimated[key] += 1

    @_isolated
    def on_llm_error(
        self,
        error: BaseException,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        context = self._failed(run_id)
        with self._lock:
            self.tracker._track_error(error, context)

    @property
    def input_tokens(self) -> int:
        return self.tracker.prompt_tokens

    @property
    def output_tokens(self) -> int:
        return self.tracker.completion_tokens

    @property
    def total_tokens(self) -> int:
        return self.tracker.total_tokens

    @property
    def cached_tokens(self) -> int:
        return self.tracker.cached_tokens

    @property
    def cache_write_tokens(self) -> int:
        return self.tracker.cache_write_tokens

    @property
    def reasoning_tokens(self) -> int:
        return self.tracker.reasoning_tokens

    @property
    def requests(self) -> int:
        return self.tracker.requests

    prompt_tokens = input_tokens
    completion_tokens = output_tokens

    def _estimated_by(self, part: int) -> Counter[str]:
        out: Counter[str] = Counter()
        for key, n in self._estimated.items():
            out[key[part]] += n
        return out

    def by_model(self) -> dict[str, dict[str, int]]:
        """Counts per model (the response's model name when it reports one)."""
        with self._lock:
            estimated = self._estimated_by(1)
            return {m: _token_counts(c, estimated[m]) for m, c in self.tracker.by_model().items()}

    def by_provider(self) -> dict[str, dict[str, int]]:
        """Counts per provider (LangChain's ``ls_provider``)."""
        with self._lock:
            estimated = self._estimated_by(0)
            return {
                p: _token_counts(c, estimated[p]) for p, c in self.tracker.by_provider().items()
            }

    @property
    def provider_usage(self) -> dict[str, dict[str, int]]:
        """:meth:`by_provider` (the seed's attribute)."""
        return self.by_provider()

    def summary(self) -> dict[str, int]:
        """Every total, with ``prompt_tokens``/``completion_tokens`` as aliases."""
        with self._lock:
            return _token_counts(self.tracker.summary(), self.estimated_requests)


class CostTrackingCallback(_NativeCallback):
    """Cost of every LangChain LLM run, in total and per model and provider, kept in a
    :class:`~llmtally.CostTracker` (``tracker``; capped like it) and priced from llmtally's price
    table (``register_model`` overrides included); a cost the provider reports wins.

    Runs of a model without a price are counted in ``unpriced_requests`` (their tokens still
    in the per-model numbers), never priced at 0. ``budget_usd`` with ``on_alert`` calls
    ``on_alert(dict)`` once when the total crosses the budget.

    >>> CostTrackingCallback().total_cost
    0.0
    """

    _keep_messages = True

    def __init__(
        self,
        *,
        budget_usd: float | None = None,
        on_alert: Callable[[dict[str, Any]], Any] | None = None,
        max_keys: int = MAX_KEYS,
        max_bytes: int = MAX_BYTES,
    ) -> None:
        super().__init__()
        if budget_usd is not None and not budget_usd > 0:
            raise ValueError(f"budget_usd must be > 0, not {budget_usd!r}")
        if on_alert is not None and not callable(on_alert):
            raise ValueError(f"on_alert must be callable, not {type(on_alert).__name__}")
        self.budget_usd = budget_usd
        self._on_alert = on_alert
        self._alerted = False
        self.tracker = CostTracker(max_keys=max_keys, max_bytes=max_bytes)

    @_isolated
    def on_llm_end(
        self,
        response: LLMResult,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        out, context, _ = self._finished(response, run_id)
        alert = None
        with self._lock:
            self.tracker._track_end(out, context)
            budget = self.budget_usd
            if (
                budget is not None
                and not self._alerted
                and out["cost_estimate"] is not None
                and self.tracker.total_cost_pusd >= budget * PUSD_PER_USD
            ):
                self._alerted = True
                alert = {"total_cost": self.total_cost, "budget_usd": budget, "model": out["model"]}
        if alert is not None and self._on_alert is not None:
            self._on_alert(alert)

    @_isolated
    def on_llm_error(
        self,
        error: BaseException,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        context = self._failed(run_id)
        with self._lock:
            self.tracker._track_error(error, context)

    @property
    def total_cost(self) -> float:
        """USD of the priced runs (exact sum in pico-USD underneath)."""
        return self.tracker.total_cost

    @property
    def total_cost_pusd(self) -> int:
        return self.tracker.total_cost_pusd

    @property
    def unpriced_requests(self) -> int:
        return self.tracker.unpriced_requests

    @property
    def priced_requests(self) -> int:
        return self.tracker.request_count - self.tracker.unpriced_requests

    @property
    def unpriced_models(self) -> list[str]:
        return self.tracker.unpriced_models

    def by_model(self) -> dict[str, dict[str, Any]]:
        """``cost_usd``, ``cost_pusd``, ``requests``, the token counts, ``errors`` and
        ``timeouts`` per model."""
        with self._lock:
            return self.tracker.by_model()

    @property
    def provider_costs(self) -> dict[str, float]:
        """USD per provider with priced runs (the seed's attribute)."""
        with self._lock:
            by = self.tracker.by_provider()
        return {p: c["cost_usd"] for p, c in by.items() if c["cost_pusd"]}

    def summary(self) -> dict[str, Any]:
        return {
            "total_cost": self.total_cost,
            "priced_requests": self.priced_requests,
            "unpriced_requests": self.unpriced_requests,
            "unpriced_models": self.unpriced_models,
        }


class PerformanceCallback(_NativeCallback):
    """Latency p50/p95/p99, time to first token, tokens/s and requests/min of LangChain LLM
    runs, per model, in llmtally's fixed-memory histograms (:class:`~llmtally.PerformanceTracker`).

    >>> PerformanceCallback().stats()["requests"]
    0
    """

    def __init__(self) -> None:
        super().__init__()
        self.tracker = PerformanceTracker()

    @_isolated
    def on_llm_new_token(
        self,
        token: str | list[str | dict[str, Any]],
        *,
        chunk: Any = None,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        start = self._starts.get(_run_key(run_id))
        if start is not None and start.first_token_at is None:
            start.first_token_at = self._clock()

    @_isolated
    def on_llm_end(
        self,
        response: LLMResult,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        now = self._clock()
        start = self._end(run_id)
        if start is None:
            return
        message, _, found_model = _generation_parts(response)
        completion: int | None = None
        try:
            usage = _reported_usage(response, message, start.batch_size)
            completion = usage.completion_tokens if usage is not None else None
        except BadUsage:
            completion = None
        context: dict[str, Any] = {
            "model": found_model or start.model or "unknown",
            "duration_ms": (now - start.started_at) * 1000.0,
        }
        if start.first_token_at is not None:
            context["ttft_ms"] = (start.first_token_at - start.started_at) * 1000.0
        with self._lock:
            self.tracker._track_end({"completion_tokens": completion}, context)

    @_isolated
    def on_llm_error(
        self,
        error: BaseException,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        start = self._end(run_id)
        model = (start.model if start is not None else None) or "unknown"
        with self._lock:
            self.tracker._track_error(error, {"model": model})

    def stats(self, model: str | None = None) -> dict[str, Any]:
        """``requests``, ``errors``, ``latency_p50_ms``/``p95``/``p99``, ``ttft_p50_ms``,
        ``tokens_per_s``, ``requests_per_min``; for one model or all."""
        with self._lock:
            return self.tracker.stats(model)

    @property
    def requests_per_minute(self) -> int:
        return int(self.stats()["requests_per_min"])

    def baseline(self) -> dict[str, Any]:
        """A snapshot for :meth:`detect_regressions`."""
        with self._lock:
            return self.tracker.baseline()

    def detect_regressions(
        self, baseline: Mapping[str, Any] | str | Path, *, tolerance: float = 0.2
    ) -> list[dict[str, Any]]:
        """Percentiles slower (or tokens/s lower) than ``baseline`` by more than ``tolerance``."""
        with self._lock:
            return self.tracker.detect_regressions(baseline, tolerance=tolerance)


class _Stream:
    __slots__ = ("first_at", "model", "started_at", "tokens")

    def __init__(self, started_at: float, model: str | None) -> None:
        self.started_at = started_at
        self.model = model
        self.first_at: float | None = None
        self.tokens: list[str] = []


class StreamingCallback(_NativeCallback):
    """Streamed tokens of LangChain runs: ``on_token(token)`` per token, the text aggregated per
    run, time to first token, and ``on_complete(summary)`` once per run (``text``, ``chunks``,
    ``ttft_ms``, ``duration_ms``, ``model``, ``error``; ``text`` is the response's text when
    nothing was streamed). The last ``max_completed`` summaries stay
    in ``completed``. A failing ``on_token``/``on_complete`` is counted in ``callback_errors``
    and never stops the stream.

    >>> seen = []
    >>> StreamingCallback(on_token=seen.append).chunks
    0
    """

    def __init__(
        self,
        on_token: Callable[[str], Any] | None = None,
        on_complete: Callable[[dict[str, Any]], Any] | None = None,
        *,
        max_completed: int = 1000,
        on_token_callback: Callable[[str], Any] | None = None,
    ) -> None:
        super().__init__()
        on_token = on_token or on_token_callback
        for name, fn in (("on_token", on_token), ("on_complete", on_complete)):
            if fn is not None and not callable(fn):
                raise ValueError(f"{name} must be callable, not {type(fn).__name__}")
        self._on_token = on_token
        self._on_complete = on_complete
        self._streams: dict[Any, _Stream] = {}
        self.completed: deque[dict[str, Any]] = deque(maxlen=max_completed)
        self.chunks = 0
        self.stream_errors = 0

    @_isolated
    def on_chat_model_start(
        self,
        serialized: dict[str, Any],
        messages: list[list[BaseMessage]],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        model, _ = _model_and_provider(serialized, metadata, kwargs)
        self._open(run_id, model)

    @_isolated
    def on_llm_start(
        self,
        serialized: dict[str, Any],
        prompts: list[str],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        model, _ = _model_and_provider(serialized, metadata, kwargs)
        self._open(run_id, model)

    def _open(self, run_id: Any, model: str | None) -> None:
        with self._lock:
            if len(self._streams) >= MAX_OPEN_RUNS:
                self._streams.pop(next(iter(self._streams)))
            self._streams[run_id] = _Stream(self._clock(), model)

    @_isolated
    def on_llm_new_token(
        self,
        token: str | list[str | dict[str, Any]],
        *,
        chunk: Any = None,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        text = token if isinstance(token, str) else _text_of(token)
        with self._lock:
            stream = self._streams.get(run_id)
            if stream is None:
                stream = self._streams[run_id] = _Stream(self._clock(), None)
            if stream.first_at is None:
                stream.first_at = self._clock()
            stream.tokens.append(text)
            self.chunks += 1
        if self._on_token is not None:
            try:
                self._on_token(text)
            except Exception as exc:
                self._own_failure("on_token", exc)

    def text(self, run_id: Any) -> str:
        """The text streamed so far in an open run."""
        with self._lock:
            stream = self._streams.get(run_id)
            return "".join(stream.tokens) if stream is not None else ""

    def _close(self, run_id: Any, error: BaseException | None, final_text: str = "") -> None:
        now = self._clock()
        with self._lock:
            stream = self._streams.pop(run_id, None)
            if error is not None:
                self.stream_errors += 1
        if stream is None:
            return
        summary = {
            "run_id": run_id,
            "model": stream.model,
            "text": "".join(stream.tokens) or final_text,
            "chunks": len(stream.tokens),
            "ttft_ms": None
            if stream.first_at is None
            else (stream.first_at - stream.started_at) * 1000.0,
            "duration_ms": (now - stream.started_at) * 1000.0,
            "error": None if error is None else type(error).__name__,
        }
        self.completed.append(summary)
        if self._on_complete is not None:
            self._on_complete(summary)

    @_isolated
    def on_llm_end(
        self,
        response: LLMResult,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        self._close(run_id, None, _generation_parts(response)[1])

    @_isolated
    def on_llm_error(
        self,
        error: BaseException,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        self._close(run_id, error)


class DefectAnalysisCallback(_NativeCallback):
    """Error classes and rates of LangChain LLM runs per model (timeouts apart), and tool
    failures per tool. Runs are counted in a :class:`~llmtally.TokenCounter` (``tracker``,
    capped like it); error classes are kept for at most ``MAX_MODELS`` models and tool failures
    for as many (tool, error) pairs, later ones under ``"<other>"``.

    >>> DefectAnalysisCallback().error_rate()
    0.0
    """

    def __init__(self, *, max_keys: int = MAX_KEYS, max_bytes: int = MAX_BYTES) -> None:
        super().__init__()
        self.tracker = TokenCounter(max_keys=max_keys, max_bytes=max_bytes)
        self._error_types: dict[str, Counter[str]] = {}
        self._tools: OpenRuns[str, str] = OpenRuns(MAX_OPEN_RUNS, "LangChain tool runs", _forget)
        self.tool_errors: Counter[str] = Counter()

    @_isolated
    def on_llm_end(
        self,
        response: LLMResult,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        start = self._end(run_id)
        _, _, found_model = _generation_parts(response)
        model = found_model or (start.model if start is not None else None) or "unknown"
        provider = (start.provider if start is not None else None) or "unknown"
        with self._lock:
            self.tracker._track_call({"provider": provider, "model": model})

    @_isolated
    def on_llm_error(
        self,
        error: BaseException,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        context = self._failed(run_id)
        with self._lock:
            self.tracker._track_error(error, context)
            model = context["model"]
            if model not in self._error_types and len(self._error_types) >= MAX_MODELS:
                model = OTHER
            self._error_types.setdefault(model, Counter())[type(error).__name__] += 1

    @_isolated
    def on_tool_start(
        self,
        serialized: dict[str, Any],
        input_str: str,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        inputs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        self._tools.put(_run_key(run_id), _scope_name(serialized, kwargs))

    @_isolated
    def on_tool_end(self, output: Any, *, run_id: UUID, **kwargs: Any) -> Any:
        self._tools.pop(_run_key(run_id))

    @_isolated
    def on_tool_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> Any:
        name = self._tools.pop(_run_key(run_id)) or "unknown"
        key = f"{name}:{type(error).__name__}"
        with self._lock:
            if key not in self.tool_errors and len(self.tool_errors) >= MAX_MODELS:
                key = OTHER
            self.tool_errors[key] += 1

    def error_rate(self, model: str | None = None) -> float:
        """Failed runs (errors and timeouts) over all runs; 0.0 before any."""
        stats = self.stats()
        entries = list(stats.values()) if model is None else [stats.get(model, {})]
        requests = sum(e.get("requests", 0) for e in entries)
        failed = sum(e.get("errors", 0) + e.get("timeouts", 0) for e in entries)
        return failed / requests if requests else 0.0

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per model: ``requests`` (ended and failed runs), ``errors``, ``timeouts``,
        ``error_rate``, ``error_types``."""
        with self._lock:
            out = {}
            for model, c in self.tracker.by_model().items():
                failed = c["errors"] + c["timeouts"]
                requests = c["requests"] + failed
                out[model] = {
                    "requests": requests,
                    "errors": c["errors"],
                    "timeouts": c["timeouts"],
                    "error_rate": failed / requests if requests else 0.0,
                    "error_types": dict(self._error_types.get(model, {})),
                }
            return out


# ---------------------------------------------------------------------------------------------
# CompositeCallback.

_IGNORE: dict[str, str | None] = {
    "on_llm_start": "ignore_llm",
    "on_chat_model_start": "ignore_chat_model",
    "on_llm_new_token": "ignore_llm",
    "on_llm_end": "ignore_llm",
    "on_llm_error": "ignore_llm",
    "on_chain_start": "ignore_chain",
    "on_chain_end": "ignore_chain",
    "on_chain_error": "ignore_chain",
    "on_tool_start": "ignore_agent",
    "on_tool_end": "ignore_agent",
    "on_tool_error": "ignore_agent",
    "on_agent_action": "ignore_agent",
    "on_agent_finish": "ignore_agent",
    "on_retriever_start": "ignore_retriever",
    "on_retriever_end": "ignore_retriever",
    "on_retriever_error": "ignore_retriever",
    "on_retry": "ignore_retry",
    "on_custom_event": "ignore_custom_event",
    "on_text": None,
}


class CompositeCallback(_LCAsyncHandler):
    """Several LangChain callbacks behind one: each event goes to every child in order (sync
    children called inline, async ones awaited), each child's failure isolated and counted in
    ``errors[child_index]``. A child's ``ignore_*`` flags and ``raise_error`` are honoured.

    >>> composite = CompositeCallback([TokenCountingCallback(), CostTrackingCallback()])
    >>> sorted(composite.report())
    ['CostTrackingCallback', 'TokenCountingCallback']
    """

    run_inline = True
    raise_error = True  # only for children that asked for it (``raise_error=True``)

    def __init__(self, callbacks: Iterable[BaseCallbackHandler] = ()) -> None:
        super().__init__()
        self.callbacks: list[BaseCallbackHandler] = []
        self.errors: list[int] = []
        for callback in callbacks:
            self.add(callback)

    def add(self, callback: BaseCallbackHandler) -> None:
        """Add a child callback."""
        if not isinstance(callback, BaseCallbackHandler):
            raise TypeError(
                f"a LangChain callback handler is needed, not {type(callback).__name__}"
            )
        self.callbacks = [*self.callbacks, callback]
        self.errors = [*self.errors, 0]

    def remove(self, callback: BaseCallbackHandler) -> None:
        """Remove a child callback (no-op when absent)."""
        keep = [i for i, c in enumerate(self.callbacks) if c is not callback]
        self.callbacks = [self.callbacks[i] for i in keep]
        self.errors = [self.errors[i] for i in keep]

    async def _fan_out(self, event: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ignore = _IGNORE.get(event)
        for index, child in enumerate(self.callbacks):
            if ignore is not None and getattr(child, ignore, False):
                continue
            try:
                await self._call(child, event, args, kwargs)
            except Exception as exc:
                if index < len(self.errors):
                    self.errors[index] += 1
                if getattr(child, "raise_error", False):
                    raise
                logger.warning(
                    "CompositeCallback child %s.%s failed (isolated): %r",
                    type(child).__name__,
                    event,
                    exc,
                )

    @staticmethod
    async def _call(
        child: BaseCallbackHandler, event: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        try:
            result = getattr(child, event)(*args, **kwargs)
            if inspect.isawaitable(result):
                await result
        except NotImplementedError:
            if event != "on_chat_model_start" or getattr(child, "ignore_llm", False):
                return
            prompts = [get_buffer_string(m) for m in args[1]]
            result = child.on_llm_start(args[0], prompts, **kwargs)
            if inspect.isawaitable(result):
                await result

    def report(self) -> dict[str, Any]:
        """Each child's ``summary()`` (or ``stats()``), by class name."""
        out: dict[str, Any] = {}
        for child in self.callbacks:
            getter = getattr(child, "summary", None) or getattr(child, "stats", None)
            if callable(getter):
                try:
                    out[type(child).__name__] = getter()
                except Exception as exc:
                    out[type(child).__name__] = {"error": repr(exc)}
        return out


def _forward(event: str) -> Callable[..., Any]:
    async def method(self: CompositeCallback, *args: Any, **kwargs: Any) -> None:
        await self._fan_out(event, args, kwargs)

    method.__name__ = method.__qualname__ = event
    method.__doc__ = f"Call ``{event}`` on every child, each isolated."
    return method


for _event in _IGNORE:
    setattr(CompositeCallback, _event, _forward(_event))
del _event
