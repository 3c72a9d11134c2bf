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

Reasoning reaches ``reasoning_tokens``, inside ``completion_tokens``, from every shape that
reports it: OpenAI ``completion_tokens_details.reasoning_tokens`` (LiteLLM too) and Responses
``output_tokens_details.reasoning_tokens``, Anthropic (and Bedrock/Vertex Anthropic bodies)
``output_tokens_details.thinking_tokens``, Gemini ``thoughtsTokenCount`` (added to the candidates,
or already inside them when the total says so), LangChain ``output_token_details.reasoning``. An
OpenAI-shaped report whose total is prompt + completion + reasoning (gateways in front of Gemini)
has its reasoning folded into the completion.

Streams: :func:`merge_stream_usage` (in the Rust core) folds each chunk's usage into what the
stream reported so far, field by field. Cumulative shapes (OpenAI chat chunks, Responses events,
Anthropic ``message_start``/``message_delta``, Gemini ``usageMetadata``) replace a field only when
a later report carries it; LangChain message-chunk deltas are added, as ``AIMessageChunk``
addition does. A field left out (or null) never erases an earlier value, and a cumulative count is
never summed twice.
"""

from __future__ import annotations

from llmtally._native import BadUsage, Usage, extract_text, extract_usage, merge_stream_usage

__all__ = ["MAX_TOKENS", "BadUsage", "Usage", "extract_text", "extract_usage", "merge_stream_usage"]

MAX_TOKENS = 10**12
"""Token counts must be integers in ``[0, MAX_TOKENS)``."""
