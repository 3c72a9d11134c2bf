"""Anthropic stream usage merged field by field: a later event never erases an earlier field."""

from __future__ import annotations

from typing import Any

import pytest

from llmtally import CallbackManager

from helpers import Recorder

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


def delta(usage: dict[str, Any]) -> dict[str, Any]:
    return {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": usage}


@pytest.mark.parametrize(
    "last",
    [
        {"output_tokens": 120},  # the older format: output only
        {"input_tokens": 50, "output_tokens": 120},  # input repeated, no cache fields
        {  # the current format: every field, cumulative
            "input_tokens": 50,
            "output_tokens": 120,
            "cache_read_input_tokens": 10_000,
            "cache_creation_input_tokens": 300,
        },
        {"input_tokens": 50, "output_tokens": 120, "cache_read_input_tokens": None},
    ],
    ids=["output-only", "input-repeated", "cumulative", "null-cache"],
)
async def test_a_delta_keeps_the_cache_counts_and_their_split(last: dict[str, Any]) -> None:
    rec = Recorder()
    manager = CallbackManager([rec])
    async with manager.llm_call(None, provider="anthropic", model="claude-sonnet-4") as call:
        await call.chunk(START)
        await call.chunk(delta({"output_tokens": 60}))
        await call.chunk(delta(last))
    (response,), _ = rec.of("on_llm_end")[0]
    assert response["estimated"] is False
    assert response["prompt_tokens"] == 10_350  # 50 uncached + 10,000 reads + 300 writes
    assert (response["cached_tokens"], response["cache_write_tokens"]) == (10_000, 300)
    assert response["completion_tokens"] == 120 and response["tokens_used"] == 10_470
    assert call.usage is not None and call.usage.cache_write_1h_tokens == 200


async def test_a_later_cumulative_count_replaces_not_adds() -> None:
    rec = Recorder()
    async with CallbackManager([rec]).llm_call(None, provider="anthropic") as call:
        await call.chunk(START)
        await call.chunk(delta({"input_tokens": 70, "output_tokens": 10}))
        await call.chunk(delta({"output_tokens": 20, "cache_read_input_tokens": 12_000}))
    (response,), _ = rec.of("on_llm_end")[0]
    assert response["prompt_tokens"] == 70 + 12_000 + 300
    assert response["completion_tokens"] == 20


async def test_anthropic_thinking_tokens_are_reasoning_inside_the_output() -> None:
    rec = Recorder()
    manager = CallbackManager([rec])
    message = {
        "type": "message",
        "content": [{"type": "text", "text": "Paris."}],
        "usage": {
            "input_tokens": 40,
            "output_tokens": 900,
            "output_tokens_details": {"thinking_tokens": 850},
        },
    }
    async with manager.llm_call(None, provider="anthropic", model="claude-sonnet-4") as call:
        call.set_response(message)
    async with manager.llm_call(None, provider="anthropic", model="claude-sonnet-4") as call:
        await call.chunk(START)
        await call.chunk(
            delta({"output_tokens": 900, "output_tokens_details": {"thinking_tokens": 850}})
        )
    ends = [response for (response,), _ in rec.of("on_llm_end")]
    assert [(r["completion_tokens"], r["reasoning_tokens"]) for r in ends] == [(900, 850)] * 2
