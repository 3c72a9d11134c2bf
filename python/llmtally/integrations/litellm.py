"""LiteLLM integration: :class:`LlmtallyLogger`, a LiteLLM ``CustomLogger`` that feeds llmtally
handlers from ``litellm.completion`` / ``litellm.acompletion`` calls (text completions,
embeddings and the Responses API take the same path; chat completions are what the tests
cover).

Install with the ``[litellm]`` extra; this module imports ``litellm`` and is never imported by
``llmtally`` itself.

How LiteLLM's hooks are used (as read in, and tested against, LiteLLM 1.106):

- **Start.** Async calls (``acompletion``, ...): ``async_pre_call_deployment_hook``, which LiteLLM
  awaits in the caller's task before the request, for every ``CustomLogger`` in
  ``litellm.callbacks``; an exception raised there propagates to the caller, so a
  ``CallbackAbort`` (``BudgetExceeded``, ``RateLimited``) stops the call. Sync calls
  (``completion``) start at their end: LiteLLM catches whatever its sync start hook
  (``log_pre_api_call``) raises, so nothing can stop a sync call, and handling that hook would
  cost every call a hop to the handlers' thread. A refusal at that start is logged and counted
  in ``unstoppable_aborts``, and the call's usage is counted. (LiteLLM never calls
  ``async_log_pre_api_call`` in these versions.)
- **End.** ``async_log_success_event`` / ``async_log_failure_event`` for async calls;
  ``log_success_event`` (on a LiteLLM logging thread) / ``log_failure_event`` for sync ones.
  Streams are counted once, at the end, from the response LiteLLM assembles (with the final
  usage chunk); per-chunk stream events are not forwarded.
- **Once.** The call's ``litellm_call_id`` is its ``request_id`` and ``run_id``: whatever
  combination of sync and async hooks LiteLLM fires, and however often, a call is counted once
  (an end for a call already ended is ignored and counted in ``duplicates``). An end whose
  start was not seen (the logger added while the call ran, or given only through the
  ``callbacks=`` argument of one call, which LiteLLM's deployment hook does not see) opens and
  ends the call at once, with LiteLLM's own start and end times.

Usage comes from the response's ``usage`` (else the ``standard_logging_object``): prompt and
completion tokens, cache reads (``prompt_tokens_details.cached_tokens``), cache writes
(``cache_creation_input_tokens``), reasoning (``completion_tokens_details.reasoning_tokens``).
LiteLLM's ``response_cost`` is a provider-reported cost: it wins over llmtally's price table
(``cost_source: "provider"``). The user charged is ``metadata["user_id"]`` of the call, else its
``user`` parameter, else the logger's ``user_id``.

Sync hooks run the llmtally handlers on one background event loop (a daemon thread shared by all
loggers); async hooks run them in the caller's loop. Nothing but a ``CallbackAbort`` at the start
of an async call ever reaches LiteLLM: failures are logged and counted in ``errors``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from litellm.integrations.custom_logger import CustomLogger

from llmtally._calls import LLMCall
from llmtally._ids import new_id
from llmtally._runtime import runner
from llmtally.dispatch import CallbackManager
from llmtally.errors import CallbackAbort
from llmtally.integrations._runs import FailureGuard, OpenRuns

__all__ = ["LlmtallyLogger"]

logger = logging.getLogger("llmtally")

MAX_OPEN_CALLS = 100_000
"""Calls tracked at once per logger; past it the oldest open call is forgotten (counted)."""

MAX_ENDED_CALLS = 100_000
"""Ended call ids remembered per logger, so a repeated end event is recognised."""

_ASYNC_PARAMS = (
    "acompletion",
    "atext_completion",
    "aembedding",
    "aresponses",
    "aimage_generation",
    "atranscription",
    "aspeech",
    "arerank",
    "aanthropic_messages",
    "agenerate_content",
    "agenerate_content_stream",
    "arealtime",
    "allm_passthrough_route",
)
_METERED_CALL_TYPES = frozenset(
    {
        "completion",
        "acompletion",
        "text_completion",
        "atext_completion",
        "embedding",
        "aembedding",
        "responses",
        "aresponses",
        "anthropic_messages",
        "aanthropic_messages",
    }
)

_T = TypeVar("_T")


# ---------------------------------------------------------------------------------------------
# Reading LiteLLM's kwargs and responses.


def _get(obj: Any, key: str) -> Any:
    """``obj[key]`` for a mapping, else ``obj.key``; ``None`` when absent.

    LiteLLM's responses are pydantic models: a field is read from the instance's ``__dict__``
    (or its extras), and a name the class does not have is absent at once, without pydantic's
    ``__getattr__`` raising and catching (which cost most of this module's time per call)."""
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(key)
    fields = getattr(obj, "__dict__", None)
    if fields is not None and key in fields:
        return fields[key]
    if isinstance(obj, Mapping):
        return obj.get(key)
    if fields is not None:
        extra = getattr(obj, "__pydantic_extra__", None)
        if extra is not None and key in extra:
            return extra[key]
        if not hasattr(type(obj), key) and hasattr(type(obj), "__pydantic_fields__"):
            return None
    try:
        return getattr(obj, key, None)
    except Exception:  # a pydantic model may raise on an odd attribute
        return None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _call_id(kwargs: Mapping[str, Any]) -> str | None:
    """LiteLLM's ``litellm_call_id`` of the call (the same on every hook of one call)."""
    found = _str(kwargs.get("litellm_call_id"))
    if found is None:
        found = _str(_get(kwargs.get("litellm_params"), "litellm_call_id"))
    if found is None:
        found = _str(_get(kwargs.get("standard_logging_object"), "litellm_call_id"))
    return found


def _is_async_request(kwargs: Mapping[str, Any]) -> bool:
    params = kwargs.get("litellm_params")
    if not isinstance(params, Mapping):
        return False
    return any(params.get(name) is True for name in _ASYNC_PARAMS)


def _metadata_of(kwargs: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The call's ``metadata``: a top-level kwarg at the start, ``litellm_params["metadata"]``
    in the log events."""
    metadata = kwargs.get("metadata")
    if isinstance(metadata, Mapping):
        return metadata
    metadata = _get(kwargs.get("litellm_params"), "metadata")
    return metadata if isinstance(metadata, Mapping) else None


def _user_of(kwargs: Mapping[str, Any]) -> Any:
    """The user a call charges: ``metadata["user_id"]`` (any value but ``None`` or ``""``: the
    manager applies the identity rule, so ``0`` is ``"0"``), else LiteLLM's ``user``."""
    metadata = _metadata_of(kwargs)
    if metadata is not None:
        given = metadata.get("user_id")
        if given is not None and not (isinstance(given, str) and not str.__len__(given)):
            return given
    found = _str(kwargs.get("user"))
    if found is None:
        found = _str(_get(kwargs.get("optional_params"), "user"))
    return found


def _model_and_provider(kwargs: Mapping[str, Any], model: Any = None) -> tuple[str, str | None]:
    """``("gpt-4o", "openai")`` from LiteLLM's ``custom_llm_provider`` and ``model`` (a
    ``provider/model`` name is split)."""
    name = _str(model) or _str(kwargs.get("model")) or "unknown"
    provider = _str(kwargs.get("custom_llm_provider")) or _str(
        _get(kwargs.get("litellm_params"), "custom_llm_provider")
    )
    if "/" in name:
        prefix, rest = name.split("/", 1)
        if provider is None or provider == prefix:
            provider, name = prefix, rest
    return name, provider


def _messages_of(kwargs: Mapping[str, Any], messages: Any = None) -> Any:
    """The prompt as a chat message list (an embedding's or text completion's input as one user
    message)."""
    if messages is None:
        messages = kwargs.get("messages")
    if messages is not None:
        return messages
    text = kwargs.get("input")
    if text is None:
        text = kwargs.get("prompt")
    if isinstance(text, str):
        return [{"role": "user", "content": text}]
    if isinstance(text, list) and all(isinstance(t, str) for t in text):
        return [{"role": "user", "content": t} for t in text]
    return None


def _max_tokens(kwargs: Mapping[str, Any]) -> int | None:
    for source in (kwargs, kwargs.get("optional_params")):
        for key in ("max_completion_tokens", "max_tokens"):
            value = _get(source, key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def _count(value: Any) -> Any:
    """A token count as LiteLLM gave it (``None`` is 0); anything else is left for the manager
    to validate, so a bad count is skipped and counted as bad input, never coerced."""
    return 0 if value is None else value


def _content_of(response: Any) -> str | None:
    choices = _get(response, "choices")
    if isinstance(choices, list) and choices:
        first = choices[0]
        text = _get(_get(first, "message"), "content")
        if text is None:
            text = _get(first, "text")
        return text if isinstance(text, str) else None
    return None


def _provider_cost(kwargs: Mapping[str, Any], response: Any) -> Any:
    """LiteLLM's ``response_cost`` (USD), from the log kwargs, else the response's hidden
    params, else the standard logging payload.

    A model LiteLLM cannot price has ``response_cost: None`` in the kwargs but ``0.0`` in the
    standard logging payload (with ``response_cost_failure_debug_info``): that 0.0 is not a
    cost, so the kwargs' ``None`` is final and the price table is used instead.
    """
    if "response_cost" in kwargs:
        return kwargs["response_cost"]
    cost = _get(_get(response, "_hidden_params"), "response_cost")
    if cost is None:
        slo = kwargs.get("standard_logging_object")
        if _get(slo, "response_cost_failure_debug_info") is None:
            cost = _get(slo, "response_cost")
    return cost


def response_dict(kwargs: Mapping[str, Any], response: Any) -> dict[str, Any] | None:
    """The llmtally response dict (``tokens_used``, ``prompt_tokens``, ``completion_tokens``,
    ``cached_tokens``, ``cache_write_tokens``, ``reasoning_tokens``, ``cost_estimate``,
    ``content``) of a LiteLLM success event, or ``None`` when LiteLLM reported no usage.

    Subsets stay subsets: LiteLLM's ``prompt_tokens`` already includes cache reads and writes
    (Anthropic's siblings are folded in by LiteLLM), its ``completion_tokens`` the reasoning.
    """
    usage = _get(response, "usage")
    slo = kwargs.get("standard_logging_object")
    if usage is None or (
        _get(usage, "prompt_tokens") is None and _get(usage, "completion_tokens") is None
    ):
        usage = _get(_get(slo, "metadata"), "usage_object")
    if usage is None and slo is not None and _get(slo, "total_tokens") is not None:
        usage = slo
    if usage is None:
        return None
    prompt = _get(usage, "prompt_tokens")
    if prompt is None:
        prompt = _get(usage, "input_tokens")  # Responses API shape
    completion = _get(usage, "completion_tokens")
    if completion is None:
        completion = _get(usage, "output_tokens")
    if prompt is None and completion is None:
        return None
    prompt_details = _get(usage, "prompt_tokens_details") or _get(usage, "input_tokens_details")
    completion_details = _get(usage, "completion_tokens_details") or _get(
        usage, "output_tokens_details"
    )
    cached = _get(prompt_details, "cached_tokens")
    if cached is None:
        cached = _get(usage, "cache_read_input_tokens")
    cache_write = _get(usage, "cache_creation_input_tokens")
    if cache_write is None:
        cache_write = _get(prompt_details, "cache_write_tokens")
    if cache_write is None:
        cache_write = _get(prompt_details, "cache_creation_tokens")
    out: dict[str, Any] = {
        "prompt_tokens": _count(prompt),
        "completion_tokens": _count(completion),
        "cached_tokens": _count(cached),
        "cache_write_tokens": _count(cache_write),
        "reasoning_tokens": _count(_get(completion_details, "reasoning_tokens")),
    }
    total = _get(usage, "total_tokens")
    if total is not None:
        out["tokens_used"] = total
    cost = _provider_cost(kwargs, response)
    if isinstance(cost, int | float) and not isinstance(cost, bool):
        out["cost_estimate"] = float(cost)
    content = _content_of(response)
    if content is not None:
        out["content"] = content
    return out


def _error_of(kwargs: Mapping[str, Any], response: Any) -> BaseException:
    exc = kwargs.get("exception")
    if isinstance(exc, BaseException):
        return exc
    if isinstance(response, BaseException):
        return response
    return RuntimeError(_str(kwargs.get("traceback_exception")) or "LiteLLM call failed")


def _elapsed_s(start: Any, end: Any) -> float | None:
    if isinstance(start, datetime.datetime) and isinstance(end, datetime.datetime):
        try:
            elapsed = (end - start).total_seconds()
        except TypeError:  # naive and aware
            return None
        return elapsed if elapsed >= 0 else None
    return None


# ---------------------------------------------------------------------------------------------
# The background loop the sync hooks run on.


_runner = runner  # the shared background loop of sync code


# ---------------------------------------------------------------------------------------------
# LlmtallyLogger.


class _Open:
    __slots__ = ("aborted", "call")

    def __init__(self, call: LLMCall, aborted: bool) -> None:
        self.call = call
        self.aborted = aborted


class LlmtallyLogger(CustomLogger):
    """Feeds llmtally handlers from LiteLLM calls; put it in ``litellm.callbacks``.

    Args:
        callbacks: llmtally handlers (``CostTracker()``, ``TokenCounter()``, seed handlers,
            ``BudgetLimiter``, your own ``AsyncCallbackHandler``), or a
            :class:`~llmtally.CallbackManager`.
        user_id: the user charged when a call names none (its ``metadata["user_id"]`` or
            ``user`` parameter win).
        sync_timeout_s: how long a sync LiteLLM hook waits for the handlers (``None``: no
            bound); past it they go on in the background.
        **context: more kwargs given to every llmtally event.

    >>> from llmtally import TokenCounter
    >>> LlmtallyLogger([TokenCounter()], user_id="alice").errors
    0
    """

    def __init__(
        self,
        callbacks: Iterable[object] | CallbackManager | None = None,
        user_id: str | None = None,
        *,
        sync_timeout_s: float | None = 30.0,
        **context: Any,
    ) -> None:
        super().__init__()
        self.manager = (
            callbacks if isinstance(callbacks, CallbackManager) else CallbackManager(callbacks)
        )
        self.user_id = user_id
        self.sync_timeout_s = sync_timeout_s
        self._context = context
        self._open: OpenRuns[str, _Open] = OpenRuns(
            MAX_OPEN_CALLS, "LiteLLM calls", lambda run: run.call.abandon_soon()
        )
        self._ended: OrderedDict[str, bool] = OrderedDict()
        self._lock = threading.Lock()
        self._failed = FailureGuard("LlmtallyLogger")
        self.duplicates = 0
        self.unstoppable_aborts = 0
        self._ending = 0  # end events being handled (their call is no longer in _open)

    # -- bookkeeping ------------------------------------------------------------------------

    @property
    def errors(self) -> int:
        """The logger's own failures (isolated, logged)."""
        return self._failed.errors

    @property
    def evicted_calls(self) -> int:
        """Calls past ``MAX_OPEN_CALLS`` open at once, ended as abandoned."""
        return self._open.evicted

    def _put(self, key: str, run: _Open, kwargs: Mapping[str, Any] | None = None) -> None:
        self._open.put(key, run)
        logging_obj = None if kwargs is None else kwargs.get("litellm_logging_obj")
        if logging_obj is not None:
            # LiteLLM fires nothing for a stream its consumer drops (a break, a client gone):
            # its logging object lives as long as the stream and its success or failure
            # handler; collected with the call still open, the call ends as abandoned.
            with contextlib.suppress(TypeError):  # not weak-referenceable: ended at exit
                finalizer = weakref.finalize(logging_obj, self._dropped, key)
                finalizer.atexit = False  # type: ignore[misc, unused-ignore]  # older typeshed

    def _dropped(self, key: str) -> None:
        run = self._open.pop(key)
        if run is not None:
            run.call.abandon_soon()

    def _take(self, key: str, success: bool) -> tuple[_Open | None, bool]:
        """Pop the open call ``key`` and remember how it ended: ``(call, already_ended)``.

        A call already ended is ended again only by a success after a failure (LiteLLM's
        retries keep the ``litellm_call_id``: the failed attempt and the one that succeeded
        are each counted once)."""
        with self._lock:
            ended = self._ended
            run = self._open.pop(key)
            if run is None:
                before = ended.get(key)
                if before is not None and not (success and before is False):
                    return None, True
            ended[key] = success
            ended.move_to_end(key)
            if len(ended) > MAX_ENDED_CALLS:
                ended.popitem(last=False)
            return run, False

    def _busy(self, delta: int) -> None:
        with self._lock:
            self._ending += delta

    @property
    def open_calls(self) -> int:
        """LiteLLM calls started and not yet ended."""
        return len(self._open)

    async def drain(self, timeout_s: float = 10.0) -> bool:
        """Wait until every call seen starting has ended (LiteLLM logs success in a task, or
        on a thread for sync calls, after the call has returned): ``False`` past
        ``timeout_s``. Use it before reading totals right after a call, or at shutdown."""
        deadline = time.monotonic() + timeout_s
        while len(self._open) or self._ending:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.001)
        return True

    def _context_of(self, kwargs: Mapping[str, Any], key: str) -> dict[str, Any]:
        context = dict(self._context)
        user = _user_of(kwargs)
        if user is None:
            user = self.user_id
        if user is not None:
            context["user_id"] = user
        context["request_id"] = key
        context["run_id"] = key
        limit = _max_tokens(kwargs)
        if limit is not None and "max_tokens" not in context:
            context["max_tokens"] = limit
        return context

    async def _begin(
        self, kwargs: Mapping[str, Any], key: str, messages: Any = None, model: Any = None
    ) -> _Open:
        """Open an llmtally call (``on_llm_start``); a ``CallbackAbort`` propagates, with the
        call left unopened."""
        name, provider = _model_and_provider(kwargs, model)
        call = self.manager.llm_call(
            _messages_of(kwargs, messages),
            provider=provider,
            model=name,
            **self._context_of(kwargs, key),
        )
        await call.start()  # the call ends in another hook, maybe in another task or thread
        return _Open(call, False)

    async def _begin_unstoppable(
        self, kwargs: Mapping[str, Any], key: str, messages: Any = None, model: Any = None
    ) -> _Open:
        """Open a call LiteLLM will make whatever the handlers say: an abort is logged, and the
        call is still counted when it ends."""
        name, provider = _model_and_provider(kwargs, model)
        call = self.manager.llm_call(
            _messages_of(kwargs, messages),
            provider=provider,
            model=name,
            **self._context_of(kwargs, key),
        )
        try:
            await call.start(stoppable=False)
        except CallbackAbort as abort:
            self.unstoppable_aborts += 1
            logger.warning(
                "%s at the start of LiteLLM call %s: LiteLLM does not let a callback stop this "
                "call (sync, or the logger is not in litellm.callbacks); its usage is counted",
                type(abort).__name__,
                key,
            )
            return _Open(call, True)
        return _Open(call, False)

    # -- start ------------------------------------------------------------------------------

    async def async_pre_call_deployment_hook(
        self, kwargs: dict[str, Any], call_type: Any
    ) -> dict[str, Any] | None:
        """Start of an async call (awaited by LiteLLM before the request, in the caller's
        task): ``on_llm_start``. A ``CallbackAbort`` stops the call, on purpose."""
        try:
            kind = getattr(call_type, "value", call_type)
            if kind is not None and kind not in _METERED_CALL_TYPES:
                return None
            key = _call_id(kwargs)
            if key is None:
                return None
            with self._lock:
                if key in self._open:  # a retry of the same call: the open call goes on
                    return None
            run = await self._begin(kwargs, key)
            self._put(key, run, kwargs)
        except CallbackAbort:
            raise
        except Exception as exc:
            self._failed("async_pre_call_deployment_hook", exc)
        return None

    # -- end --------------------------------------------------------------------------------

    async def _succeed(
        self, kwargs: Mapping[str, Any], response: Any, start_time: Any, end_time: Any
    ) -> None:
        key = _call_id(kwargs)
        if key is None:  # no id, no dedupe: counted as a call of its own
            key = new_id()
        run, ended = self._take(key, True)
        if ended:
            self.duplicates += 1
            logger.debug("LiteLLM call %s already ended: this end is ignored", key)
            return
        if run is None:
            run = await self._begin_unstoppable(kwargs, key)
        call = run.call
        model, provider = _model_and_provider(kwargs)
        if call.model == "unknown" and model != "unknown":
            call.model = model
        if call.provider == "unknown" and provider is not None:
            call.provider = provider
        found = response_dict(kwargs, response)
        if found is not None:
            call.set_response(found)
        elif response is not None:
            call.set_response(response)  # no usage reported: read, else estimated
        elapsed = _elapsed_s(start_time, end_time)
        if elapsed is not None:
            call.started_at = time.perf_counter() - elapsed  # LiteLLM's own latency
        await call.end()

    async def _fail(
        self, kwargs: Mapping[str, Any], response: Any, start_time: Any, end_time: Any
    ) -> None:
        error = _error_of(kwargs, response)
        key = _call_id(kwargs)
        if key is None:
            return
        run, ended = self._take(key, False)
        if ended:
            self.duplicates += 1
            return
        if run is None:
            if isinstance(error, CallbackAbort):
                return  # our own abort at the start: the handlers already saw it
            run = await self._begin_unstoppable(kwargs, key)
        elapsed = _elapsed_s(start_time, end_time)
        if elapsed is not None:
            run.call.started_at = time.perf_counter() - elapsed
        await run.call.fail(error)

    async def async_log_success_event(
        self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        """End of an async call (streams: once, with the assembled response)."""
        self._busy(1)
        try:
            await self._succeed(kwargs, response_obj, start_time, end_time)
        except CallbackAbort as abort:
            logger.debug("abort %r at the end of a LiteLLM call ignored: it is over", abort)
        except Exception as exc:
            self._failed("async_log_success_event", exc)
        finally:
            self._busy(-1)

    async def async_log_failure_event(
        self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        """A failed async call: ``on_llm_error`` (``errors``, or ``timeouts``)."""
        self._busy(1)
        try:
            await self._fail(kwargs, response_obj, start_time, end_time)
        except CallbackAbort as abort:
            logger.debug("abort %r after a failed LiteLLM call ignored", abort)
        except Exception as exc:
            self._failed("async_log_failure_event", exc)
        finally:
            self._busy(-1)

    def log_success_event(
        self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        """End of a sync call (LiteLLM calls it from a logging thread)."""
        try:
            _runner.run(
                self.async_log_success_event(kwargs, response_obj, start_time, end_time),
                self.sync_timeout_s,
            )
        except Exception as exc:
            self._failed("log_success_event", exc)

    def log_failure_event(
        self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        """A failed sync call."""
        try:
            _runner.run(
                self.async_log_failure_event(kwargs, response_obj, start_time, end_time),
                self.sync_timeout_s,
            )
        except Exception as exc:
            self._failed("log_failure_event", exc)
