"""Usage normalization: one record per call, whatever shape the provider reported.

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

from typing import Any

from llmtally._core import BadUsage, Usage, extract_text, extract_usage

__all__ = ["MAX_TOKENS", "BadUsage", "Usage", "extract_text", "extract_usage", "merge_stream_usage"]

MAX_TOKENS = 10**12
"""Token counts must be integers in ``[0, MAX_TOKENS)``."""


def _get(obj: Any, key: str) -> Any:
    if isinstance(obj, dict):
        return obj.get(key)
    if obj is None:
        return None
    return getattr(obj, key, None)


def merge_stream_usage(previous: Usage | None, chunk: Any) -> Usage | None:
    """Fold the usage a stream chunk carries into what the stream reported so far.

    OpenAI and Responses streams report usage once, at the end (it replaces nothing). Anthropic
    reports input and cache counts in ``message_start`` and cumulative counts in each
    ``message_delta``: merged field by field, as Anthropic's own accumulator does, so a field a
    delta leaves out (or sends as null) keeps its earlier value, the 5-minute/1-hour split of
    cache writes included.

    Raises:
        BadUsage: when the chunk's usage cannot be trusted.
    """
    found = extract_usage(chunk)
    if found is None:
        return previous
    if previous is None or _get(chunk, "type") != "message_delta":
        return found
    usage = _get(chunk, "usage")
    cached = previous.cached_tokens
    write = previous.cache_write_tokens
    write_1h = previous.cache_write_1h_tokens
    uncached = (previous.prompt_tokens or 0) - cached - write
    if _get(usage, "input_tokens") is not None:
        uncached = _get(usage, "input_tokens")
    if _get(usage, "cache_read_input_tokens") is not None:
        cached = found.cached_tokens
    if _get(usage, "cache_creation_input_tokens") is not None:
        write = found.cache_write_tokens
    if _get(_get(usage, "cache_creation"), "ephemeral_1h_input_tokens") is not None:
        write_1h = found.cache_write_1h_tokens
    completion = found.completion_tokens
    if _get(usage, "output_tokens") is None:
        completion = previous.completion_tokens
    reasoning = previous.reasoning_tokens
    if _get(_get(usage, "output_tokens_details"), "thinking_tokens") is not None:
        reasoning = found.reasoning_tokens
    prompt = uncached + cached + write
    return Usage(
        total_tokens=prompt + (completion or 0),
        prompt_tokens=prompt,
        completion_tokens=completion,
        cached_tokens=cached,
        cache_write_tokens=write,
        cache_write_1h_tokens=min(write_1h, write),
        reasoning_tokens=min(reasoning, completion or 0),
        cost_usd=found.cost_usd if found.cost_usd is not None else previous.cost_usd,
    )
