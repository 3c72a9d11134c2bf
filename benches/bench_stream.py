"""B7: the per-chunk cost of a stream: reading a chunk's usage and folding it into what the stream
reported so far (``llmtally.usage.merge_stream_usage``), and ``LLMCall.record_chunk`` around it.

pytest benches/bench_stream.py --benchmark-only --benchmark-group-by group

Most chunks carry no usage (text deltas): they must stay as cheap as a lookup. A round runs
10,000 chunks.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from llmtally import CallbackManager
from llmtally.usage import merge_stream_usage

OPS = 10_000

START = {
    "type": "message_start",
    "message": {
        "usage": {
            "input_tokens": 50,
            "output_tokens": 1,
            "cache_read_input_tokens": 10_000,
            "cache_creation_input_tokens": 300,
            "cache_creation": {"ephemeral_5m_input_tokens": 100, "ephemeral_1h_input_tokens": 200},
        }
    },
}
CHUNKS: dict[str, Any] = {
    "openai-text": {
        "id": "c",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": "Hello"}, "finish_reason": None}],
    },
    "anthropic-text": {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "text_delta", "text": "Hello"},
    },
    "anthropic-message-delta": {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn"},
        "usage": {"input_tokens": 50, "output_tokens": 120},
    },
    "gemini-usage": {
        "candidates": [{"content": {"parts": [{"text": "Hello"}]}}],
        "usageMetadata": {
            "promptTokenCount": 10_050,
            "candidatesTokenCount": 40,
            "thoughtsTokenCount": 80,
            "cachedContentTokenCount": 10_000,
            "totalTokenCount": 10_170,
        },
    },
}


@pytest.mark.benchmark(group="stream-merge")
@pytest.mark.parametrize("shape", list(CHUNKS))
def test_merge_stream_usage(benchmark: Any, shape: str) -> None:
    """One chunk folded into the usage seen so far (after a message_start)."""
    previous = merge_stream_usage(None, START)
    chunk = CHUNKS[shape]

    def run() -> None:
        for _ in range(OPS):
            merge_stream_usage(previous, chunk)

    benchmark(run)


@pytest.mark.benchmark(group="stream-record-chunk")
@pytest.mark.parametrize("shape", list(CHUNKS))
def test_record_chunk(benchmark: Any, shape: str) -> None:
    """``record_chunk`` on an open call: text and usage of one chunk, no event fired."""
    loop = asyncio.new_event_loop()
    try:
        call = CallbackManager([]).llm_call(None, provider="anthropic")
        loop.run_until_complete(call.start())
        call.record_chunk(START)
        chunk = CHUNKS[shape]
        record = call.record_chunk

        def run() -> None:
            for _ in range(OPS):
                record(chunk)

        benchmark(run)
        loop.run_until_complete(call.end())
    finally:
        loop.close()
