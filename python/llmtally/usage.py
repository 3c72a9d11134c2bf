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

    OpenAI and Responses streams report usage once, at the end; Anthropic reports input and
    cache counts in ``message_start`` and the cumulative output count in ``message_delta``
    (newer streams repeat the input counts there, and then those win).

    Raises:
        BadUsage: when the chunk's usage cannot be trusted.
    """
    found = extract_usage(chunk)
    if found is None:
        return previous
    if (
        previous is not None
        and _get(chunk, "type") == "message_delta"
        and _get(_get(chunk, "usage"), "input_tokens") is None
    ):
        return Usage(
            prompt_tokens=previous.prompt_tokens or 0,
            completion_tokens=found.completion_tokens,
            cached_tokens=previous.cached_tokens,
            cache_write_tokens=previous.cache_write_tokens,
            cache_write_1h_tokens=previous.cache_write_1h_tokens,
            cost_usd=previous.cost_usd,
        )
    return found
