"""Pure-Python reference implementation of usage normalization: the oracle the Rust
``llmtally._core.extract_usage`` is tested against (same rules, same results).

Usage normalization: one record per call, whatever shape the provider reported.

Subsets are subsets (as in the OpenTelemetry GenAI conventions): cache reads and cache writes are
part of ``prompt_tokens``, reasoning is part of ``completion_tokens``. Providers that report them
as siblings (Anthropic's ``cache_read_input_tokens`` beside ``input_tokens``, Gemini's
``thoughtsTokenCount`` beside ``candidatesTokenCount``) are folded in.

Accepted shapes, as plain dicts (the provider's JSON body) or SDK objects with the same
attributes: OpenAI chat completions and chunks, OpenAI Responses (and ``response.completed``
events), Anthropic messages and stream events, Gemini ``usageMetadata``, LangChain
``usage_metadata``, DeepSeek cache fields, LiteLLM ``response_cost``, and llmtally's own response
dict (``tokens_used``, ``prompt_tokens``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["MAX_TOKENS", "BadUsage", "Usage", "extract_text", "extract_usage"]

MAX_TOKENS = 10**12
"""Token counts must be integers in ``[0, MAX_TOKENS)``."""


class BadUsage(Exception):
    """Usage that cannot be trusted (wrong type, out of range, inconsistent)."""


@dataclass(slots=True)
class Usage:
    """A normalized usage record. ``None`` means the provider did not say."""

    total_tokens: int
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    cache_write_1h_tokens: int = 0
    reasoning_tokens: int = 0
    cost_usd: float | None = None
    warning: str | None = None


def _get(obj: Any, key: str) -> Any:
    if type(obj) is dict:
        return obj.get(key)
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(key)
    return getattr(obj, key, None)


def _count(value: Any, name: str) -> int:
    if type(value) is int and 0 <= value < MAX_TOKENS:
        return value
    if type(value) is int:
        raise BadUsage(f"{name}={value} is outside [0, 10**12)")
    raise BadUsage(f"{name} must be an int, not {type(value).__name__}")


def _opt(obj: Any, key: str) -> int | None:
    value = _get(obj, key)
    return None if value is None else _count(value, key)


def _cost(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadUsage(f"cost must be a number, not {type(value).__name__}")
    if not (0 <= value < 1e9):
        raise BadUsage(f"cost={value} is out of range")
    return float(value)


def _build(
    total: int | None,
    prompt: int | None,
    completion: int | None,
    cached: int = 0,
    cache_write: int = 0,
    reasoning: int = 0,
    cost: float | None = None,
    cache_write_1h: int = 0,
) -> Usage:
    warning = None
    if prompt is not None and completion is None and total is not None and total >= prompt:
        completion = total - prompt  # a whole and one part given: the other is known
    if prompt is not None and completion is not None:
        split = prompt + completion
        if total is None:
            total = split
        elif total != split:
            warning = f"tokens_used={total} disagrees with prompt+completion={split}"
    elif total is None:
        if prompt is None and completion is None:
            raise BadUsage("usage has no token counts")
        total = (prompt or 0) + (completion or 0)
        if prompt is None or completion is None:
            # One side only: the other is unknown, not zero.
            pass
    for name, value in (("total", total), ("prompt", prompt), ("completion", completion)):
        if value is not None and value >= MAX_TOKENS:
            raise BadUsage(f"{name} of {value} tokens is outside [0, 10**12)")
    if prompt is not None and cached + cache_write > prompt:
        raise BadUsage(
            f"cache reads {cached} + cache writes {cache_write} exceed prompt_tokens {prompt}"
        )
    if completion is not None and reasoning > completion:
        raise BadUsage(f"reasoning_tokens {reasoning} exceed completion_tokens {completion}")
    if cache_write_1h > cache_write:
        raise BadUsage(f"1h cache writes {cache_write_1h} exceed cache writes {cache_write}")
    return Usage(
        total_tokens=total,
        prompt_tokens=prompt,
        completion_tokens=completion,
        cached_tokens=cached,
        cache_write_tokens=cache_write,
        cache_write_1h_tokens=cache_write_1h,
        reasoning_tokens=reasoning,
        cost_usd=cost,
        warning=warning,
    )


def _sibling_reasoning(
    total: int | None, prompt: int | None, completion: int | None, reasoning: int
) -> int | None:
    """The completion, with reasoning folded in when the total says it was reported beside it
    (total == prompt + completion + reasoning, not prompt + completion)."""
    if total is None or prompt is None or completion is None or reasoning <= 0:
        return completion
    if total != prompt + completion and total == prompt + completion + reasoning:
        return completion + reasoning
    return completion


def _getter(obj: Any) -> Any:
    """A ``key -> value or None`` lookup for a dict or an SDK object."""
    if isinstance(obj, dict):
        return obj.get
    return lambda key: getattr(obj, key, None)


def _opt_of(get: Any, key: str) -> int | None:
    value = get(key)
    if value is None:
        return None
    if type(value) is int and 0 <= value < MAX_TOKENS:
        return value
    return _count(value, key)


def _from_usage_block(usage: Any, anthropic: bool) -> Usage:
    """Normalize a provider ``usage`` block (OpenAI chat, OpenAI Responses, Anthropic)."""
    get = _getter(usage)
    cost = get("cost")
    if cost is not None:
        cost = _cost(cost)
    prompt = _opt_of(get, "prompt_tokens")
    completion = _opt_of(get, "completion_tokens")
    if prompt is not None or completion is not None:
        # OpenAI chat completions (and compatible: DeepSeek, Groq, Mistral, vLLM, LiteLLM).
        cached = reasoning = None
        details = get("prompt_tokens_details")
        if details is not None:
            cached = _opt(details, "cached_tokens")
        if cached is None:
            cached = _opt_of(get, "prompt_cache_hit_tokens")  # DeepSeek
        cdetails = get("completion_tokens_details")
        if cdetails is not None:
            reasoning = _opt(cdetails, "reasoning_tokens")
        total = _opt_of(get, "total_tokens")
        completion = _sibling_reasoning(total, prompt, completion, reasoning or 0)
        return _build(total, prompt, completion, cached or 0, 0, reasoning or 0, cost)
    input_tokens = _opt_of(get, "input_tokens")
    output_tokens = _opt_of(get, "output_tokens")
    cache_read = _opt_of(get, "cache_read_input_tokens")
    cache_creation = _opt_of(get, "cache_creation_input_tokens")
    if anthropic or cache_read is not None or cache_creation is not None:
        # Anthropic: input_tokens excludes cache reads and writes; fold them in.
        cache_read = cache_read or 0
        cache_creation = cache_creation or 0
        write_1h = 0
        creation = get("cache_creation")
        if creation is not None:
            write_1h = _opt(creation, "ephemeral_1h_input_tokens") or 0
        if input_tokens is None and output_tokens is None:
            raise BadUsage("usage has no token counts")
        prompt = (input_tokens or 0) + cache_read + cache_creation
        thinking = 0
        out_details = get("output_tokens_details")
        if out_details is not None:
            thinking = _opt(out_details, "thinking_tokens") or 0
        return _build(
            None, prompt, output_tokens, cache_read, cache_creation, thinking, cost, write_1h
        )
    # OpenAI Responses API, LangChain usage_metadata: input includes cached reads.
    cached = reasoning = None
    cache_write = 0
    idetails = get("input_tokens_details")
    if idetails is not None:
        cached = _opt(idetails, "cached_tokens")
        cache_write = _opt(idetails, "cache_write_tokens") or 0
    odetails = get("output_tokens_details")
    if odetails is not None:
        reasoning = _opt(odetails, "reasoning_tokens")
    lc_in = get("input_token_details")
    if lc_in is not None:
        cached = _opt(lc_in, "cache_read")
        cache_write = _opt(lc_in, "cache_creation") or 0
    lc_out = get("output_token_details")
    if lc_out is not None:
        reasoning = _opt(lc_out, "reasoning")
    total = _opt_of(get, "total_tokens")
    output_tokens = _sibling_reasoning(total, input_tokens, output_tokens, reasoning or 0)
    return _build(
        total, input_tokens, output_tokens, cached or 0, cache_write, reasoning or 0, cost
    )


def _from_gemini(meta: Any) -> Usage:
    prompt = _opt(meta, "promptTokenCount")
    if prompt is None:
        prompt = _opt(meta, "prompt_token_count")
    candidates = _opt(meta, "candidatesTokenCount")
    if candidates is None:
        candidates = _opt(meta, "candidates_token_count")
    thoughts = _opt(meta, "thoughtsTokenCount")
    if thoughts is None:
        thoughts = _opt(meta, "thoughts_token_count")
    cached = _opt(meta, "cachedContentTokenCount")
    if cached is None:
        cached = _opt(meta, "cached_content_token_count")
    total = _opt(meta, "totalTokenCount")
    if total is None:
        total = _opt(meta, "total_token_count")
    if (
        prompt is not None
        and thoughts
        and total is not None
        and candidates is not None
        and candidates >= thoughts
    ):
        tool = _opt(meta, "toolUsePromptTokenCount")
        if tool is None:
            tool = _opt(meta, "tool_use_prompt_token_count")
        if prompt + candidates + (tool or 0) == total:
            candidates -= thoughts  # thoughts inside the candidates (some Vertex versions)
    completion = (
        None if candidates is None and thoughts is None else (candidates or 0) + (thoughts or 0)
    )
    return _build(total, prompt, completion, cached or 0, 0, thoughts or 0)


_OWN_KEYS = ("tokens_used", "prompt_tokens", "completion_tokens")


def extract_usage(obj: Any) -> Usage | None:
    """The usage reported in ``obj``, or ``None`` when it carries none.

    Raises:
        BadUsage: when a count is of the wrong type, outside ``[0, 10**12)``, or the subsets are
            inconsistent (for example cache reads larger than the prompt).
    """
    if obj is None:
        return None
    is_dict = isinstance(obj, dict)
    if is_dict:
        usage = obj.get("usage")
        if usage is not None and "tokens_used" not in obj:
            kind = obj.get("type")
            found = _from_usage_block(usage, anthropic=kind == "message")
            if found.cost_usd is None and ("response_cost" in obj or "_hidden_params" in obj):
                found.cost_usd = _provider_cost(obj)
            return found
    if is_dict and (
        "tokens_used" in obj or ("usage" not in obj and any(k in obj for k in _OWN_KEYS))
    ):
        # llmtally's own response dict.
        total = _opt(obj, "tokens_used")
        prompt = _opt(obj, "prompt_tokens")
        reasoning = _opt(obj, "reasoning_tokens") or 0
        return _build(
            total,
            prompt,
            _sibling_reasoning(total, prompt, _opt(obj, "completion_tokens"), reasoning),
            _opt(obj, "cached_tokens") or 0,
            _opt(obj, "cache_write_tokens") or 0,
            reasoning,
            _cost(obj.get("cost_estimate")),
            _opt(obj, "cache_write_1h_tokens") or 0,
        )
    kind = _get(obj, "type")
    if kind == "message_start":
        obj = _get(obj, "message")
        kind = "message"
    elif kind in ("response.completed", "response.incomplete", "response.failed"):
        obj = _get(obj, "response")
        kind = None
    usage = _get(obj, "usage")
    if usage is not None:
        found = _from_usage_block(usage, anthropic=kind in ("message", "message_delta"))
        if found.cost_usd is None:
            found.cost_usd = _provider_cost(obj)
        return found
    meta = _get(obj, "usage_metadata")
    if meta is None and is_dict:
        meta = obj.get("usageMetadata")
    if meta is not None:
        if _get(meta, "input_tokens") is not None or _get(meta, "output_tokens") is not None:
            return _from_usage_block(meta, anthropic=False)  # LangChain
        return _from_gemini(meta)
    return None


def _provider_cost(obj: Any) -> float | None:
    """A cost the provider (or LiteLLM) reported itself."""
    cost = _get(obj, "response_cost")
    if cost is None:
        hidden = _get(obj, "_hidden_params")
        if hidden is not None:
            cost = _get(hidden, "response_cost")
    return _cost(cost)


def extract_text(obj: Any) -> str | None:
    """The generated text in a response or a stream chunk, when there is any."""
    if isinstance(obj, str):
        return obj
    if obj is None:
        return None
    choices = _get(obj, "choices")
    if choices:
        try:
            first = choices[0]
        except (TypeError, IndexError, KeyError):
            return None
        part = _get(first, "delta") or _get(first, "message")
        if part is not None:
            content = _get(part, "content")
            return content if isinstance(content, str) else _join_parts(content)
        text = _get(first, "text")
        return text if isinstance(text, str) else None
    kind = _get(obj, "type")
    if kind == "content_block_delta":
        delta = _get(obj, "delta")
        text = _get(delta, "text")
        if text is None:
            text = _get(delta, "thinking")
        return text if isinstance(text, str) else None
    if isinstance(kind, str) and kind.startswith("response.") and kind.endswith(".delta"):
        delta = _get(obj, "delta")
        return delta if isinstance(delta, str) else None
    content = _get(obj, "content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return _join_parts(content)
    output_text = _get(obj, "output_text")
    if isinstance(output_text, str):
        return output_text
    output = _get(obj, "output")
    if isinstance(output, list):
        texts = []
        for item in output:
            text = _join_parts(_get(item, "content"))
            if text:
                texts.append(text)
        return "".join(texts) if texts else None
    return None


def _join_parts(parts: Any) -> str | None:
    if not isinstance(parts, list):
        return None
    texts = []
    for part in parts:
        if isinstance(part, str):
            texts.append(part)
            continue
        text = _get(part, "text")
        if isinstance(text, str):
            texts.append(text)
    return "".join(texts) if texts else None
