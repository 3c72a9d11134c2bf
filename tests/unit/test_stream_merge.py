"""Stream usage merged field by field in every shape (a later event never erases an earlier
field; cumulative reports are not summed, deltas are), and reasoning from every shape."""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

import pytest
from langchain_core.messages import AIMessage, AIMessageChunk
from langchain_core.messages.ai import add_usage

from llmtally import CallbackManager
from llmtally.usage import BadUsage, Usage, extract_usage, merge_stream_usage

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


# -- every stream shape: cumulative shapes replaced field by field, deltas added ----------------


def fold(*chunks: Any) -> Usage | None:
    usage: Usage | None = None
    for chunk in chunks:
        usage = merge_stream_usage(usage, chunk)
    return usage


def split(u: Usage | None) -> tuple[Any, ...]:
    assert u is not None
    return (
        u.total_tokens,
        u.prompt_tokens,
        u.completion_tokens,
        u.cached_tokens,
        u.cache_write_tokens,
        u.reasoning_tokens,
    )


def test_a_chunk_without_usage_returns_the_same_record() -> None:
    seen = merge_stream_usage(None, START)
    text = {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "Hi"}}
    assert merge_stream_usage(seen, text) is seen
    assert merge_stream_usage(None, text) is None
    assert (
        merge_stream_usage(seen, {"choices": [{"delta": {"content": "x"}}], "usage": None}) is seen
    )


def test_openai_running_usage_replaces_and_keeps_the_cache_detail() -> None:
    def chunk(usage: dict[str, Any] | None) -> dict[str, Any]:
        return {"object": "chat.completion.chunk", "choices": [], "usage": usage}

    first = {
        "prompt_tokens": 1200,
        "completion_tokens": 1,
        "prompt_tokens_details": {"cached_tokens": 1024},
    }
    last = {"prompt_tokens": 1200, "completion_tokens": 300, "total_tokens": 1500}
    last_details = {**last, "completion_tokens_details": {"reasoning_tokens": 256}}
    assert split(fold(chunk(first), chunk(None), chunk(last))) == (1500, 1200, 300, 1024, 0, 0)
    assert split(fold(chunk(first), chunk(last_details))) == (1500, 1200, 300, 1024, 0, 256)
    # a later completion without a total: the total is the merged sum, not the earlier total
    assert split(fold(chunk(last), chunk({"completion_tokens": 310}))) == (1510, 1200, 310, 0, 0, 0)


def test_responses_events_without_usage_do_not_erase_the_completed_usage() -> None:
    usage = {
        "input_tokens": 900,
        "output_tokens": 400,
        "total_tokens": 1300,
        "input_tokens_details": {"cached_tokens": 512},
        "output_tokens_details": {"reasoning_tokens": 320},
    }
    created = {"type": "response.created", "response": {"usage": None}}
    delta = {"type": "response.output_text.delta", "delta": "Paris."}
    completed = {"type": "response.completed", "response": {"usage": usage}}
    assert split(fold(created, delta, completed, delta)) == (1300, 900, 400, 512, 0, 320)


def test_gemini_running_counts_replace_field_by_field() -> None:
    def chunk(**meta: int) -> dict[str, Any]:
        return {"candidates": [{"content": {"parts": [{"text": "x"}]}}], "usageMetadata": meta}

    chunks = [
        chunk(promptTokenCount=10_050, cachedContentTokenCount=10_000, totalTokenCount=10_050),
        chunk(
            promptTokenCount=10_050,
            candidatesTokenCount=5,
            thoughtsTokenCount=80,
            totalTokenCount=10_135,
        ),
        # the last chunk leaves the thoughts and the cache out: kept, not erased
        chunk(promptTokenCount=10_050, candidatesTokenCount=40, totalTokenCount=10_170),
    ]
    assert split(fold(*chunks)) == (10_170, 10_050, 120, 10_000, 0, 80)


def test_gemini_sdk_objects_and_thoughts_counted_inside_the_candidates() -> None:
    # google-genai objects use snake_case attributes
    meta = SimpleNamespace(
        prompt_token_count=20,
        candidates_token_count=198,
        thoughts_token_count=405,
        total_token_count=623,
    )
    assert split(extract_usage(SimpleNamespace(usage_metadata=meta))) == (623, 20, 603, 0, 0, 405)
    # some Vertex versions count thoughts inside the candidates: prompt + candidates == total
    inside = {
        "promptTokenCount": 20,
        "candidatesTokenCount": 603,
        "thoughtsTokenCount": 405,
        "totalTokenCount": 623,
    }
    assert split(extract_usage({"usageMetadata": inside})) == (623, 20, 603, 0, 0, 405)
    with_tool = {**inside, "toolUsePromptTokenCount": 7, "totalTokenCount": 630}
    assert split(extract_usage({"usageMetadata": with_tool})) == (630, 20, 603, 0, 0, 405)


def test_langchain_chunk_deltas_are_added_as_aimessagechunk_addition_does() -> None:
    chunks = [
        AIMessageChunk(
            content="",
            usage_metadata={
                "input_tokens": 1200,
                "output_tokens": 0,
                "total_tokens": 1200,
                "input_token_details": {"cache_read": 1000, "cache_creation": 150},
            },
        ),
        AIMessageChunk(
            content="Par",
            usage_metadata={"input_tokens": 0, "output_tokens": 10, "total_tokens": 10},
        ),
        AIMessageChunk(content="is."),
        AIMessageChunk(
            content="",
            usage_metadata={
                "input_tokens": 0,
                "output_tokens": 290,
                "total_tokens": 290,
                "output_token_details": {"reasoning": 256},
            },
        ),
    ]
    merged = fold(*chunks)
    assert split(merged) == (1500, 1200, 300, 1000, 150, 256)
    summed = chunks[0] + chunks[1] + chunks[2] + chunks[3]
    assert split(extract_usage(summed)) == split(merged)
    total = None
    for c in chunks:
        total = add_usage(total, c.usage_metadata)
    assert total is not None and split(extract_usage({"usage_metadata": total})) == split(merged)
    # a whole AIMessage carries the run's usage: it replaces, it is not added
    whole = AIMessage(content="Paris.", usage_metadata=summed.usage_metadata)  # type: ignore[arg-type]
    assert split(fold(*chunks, whole)) == split(merged)


def test_a_later_report_contradicting_the_merged_parts_wins_whole() -> None:
    first = {
        "usage": {
            "prompt_tokens": 1200,
            "completion_tokens": 1,
            "prompt_tokens_details": {"cached_tokens": 1024},
        }
    }
    smaller = {"usage": {"prompt_tokens": 500, "completion_tokens": 300}}
    assert split(fold(first, smaller)) == (800, 500, 300, 0, 0, 0)


async def test_a_chunk_with_bad_usage_is_skipped_and_the_earlier_usage_kept() -> None:
    rec = Recorder()
    manager = CallbackManager([rec])
    async with manager.llm_call(None, provider="anthropic", model="claude-sonnet-4") as call:
        await call.chunk(START)
        with pytest.raises(BadUsage):
            merge_stream_usage(call.usage, delta({"output_tokens": -5}))
        await call.chunk(delta({"output_tokens": -5}))
        await call.chunk(delta({"output_tokens": 120}))
    (response,), _ = rec.of("on_llm_end")[0]
    assert (response["prompt_tokens"], response["completion_tokens"]) == (10_350, 120)
    assert (await manager.health())["bad_input"] >= 1


def anthropic_usage() -> Any:
    import anthropic.types as at

    if not hasattr(at, "OutputTokensDetails"):  # SDK releases before thinking-token details
        pytest.skip(f"anthropic {at.__name__} has no OutputTokensDetails")
    return at.Usage(
        input_tokens=40,
        output_tokens=900,
        output_tokens_details=at.OutputTokensDetails(thinking_tokens=850),  # type: ignore[attr-defined]
    )


def litellm_usage() -> Any:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network
    types = pytest.importorskip("litellm.types.utils")
    return types.Usage(
        prompt_tokens=40,
        completion_tokens=900,
        total_tokens=940,
        completion_tokens_details=types.CompletionTokensDetailsWrapper(reasoning_tokens=850),
    )


REASONING_SHAPES: dict[str, Any] = {
    "openai-chat": lambda: {
        "usage": {
            "prompt_tokens": 40,
            "completion_tokens": 900,
            "completion_tokens_details": {"reasoning_tokens": 850},
        }
    },
    "openai-responses": lambda: {
        "type": "response.completed",
        "response": {
            "usage": {
                "input_tokens": 40,
                "output_tokens": 900,
                "output_tokens_details": {"reasoning_tokens": 850},
            }
        },
    },
    "anthropic-message": lambda: {
        "type": "message",
        "usage": {
            "input_tokens": 40,
            "output_tokens": 900,
            "output_tokens_details": {"thinking_tokens": 850},
        },
    },
    "anthropic-sdk-object": lambda: SimpleNamespace(type="message", usage=anthropic_usage()),
    "gemini": lambda: {
        "usageMetadata": {
            "promptTokenCount": 40,
            "candidatesTokenCount": 50,
            "thoughtsTokenCount": 850,
        }
    },
    "langchain": lambda: AIMessage(
        content="",
        usage_metadata={
            "input_tokens": 40,
            "output_tokens": 900,
            "total_tokens": 940,
            "output_token_details": {"reasoning": 850},
        },
    ),
    "litellm": lambda: SimpleNamespace(usage=litellm_usage()),
    "openai-sibling": lambda: {
        "usage": {
            "prompt_tokens": 40,
            "completion_tokens": 50,
            "total_tokens": 940,
            "completion_tokens_details": {"reasoning_tokens": 850},
        }
    },
    "llmtally-dict": lambda: {
        "prompt_tokens": 40,
        "completion_tokens": 900,
        "reasoning_tokens": 850,
    },
}


@pytest.mark.parametrize("shape", list(REASONING_SHAPES))
async def test_thinking_and_reasoning_tokens_of_every_shape_are_reasoning_inside_the_completion(
    shape: str,
) -> None:
    body = REASONING_SHAPES[shape]()
    assert split(extract_usage(body)) == (940, 40, 900, 0, 0, 850)
    rec = Recorder()
    async with CallbackManager([rec]).llm_call(None) as call:
        call.set_response(body)
    async with CallbackManager([rec]).llm_call(None) as call:
        await call.chunk(body)  # the same report as the one usage-carrying chunk of a stream
    assert [
        (r["completion_tokens"], r["reasoning_tokens"]) for (r,), _ in rec.of("on_llm_end")
    ] == [(900, 850)] * 2


# -- Amazon Bedrock Converse ---------------------------------------------------------------------
# The documented shape: inputTokens excludes the cache reads and writes (siblings), totalTokens
# includes them (AWS's prompt-caching example: 4 + 500 + 1,534 = 2,038).

CONVERSE = {
    "output": {"message": {"role": "assistant", "content": [{"text": "Paris."}]}},
    "stopReason": "end_turn",
    "usage": {
        "inputTokens": 4,
        "outputTokens": 500,
        "totalTokens": 2038,
        "cacheReadInputTokens": 0,
        "cacheWriteInputTokens": 1534,
    },
}


def test_a_bedrock_converse_response_folds_the_cache_into_the_prompt() -> None:
    usage = extract_usage(CONVERSE)
    assert usage == Usage(
        total_tokens=2038,
        prompt_tokens=1538,
        completion_tokens=500,
        cached_tokens=0,
        cache_write_tokens=1534,
    )


async def test_a_bedrock_converse_stream_is_counted_from_its_metadata_event() -> None:
    events: list[dict[str, Any]] = [
        {"messageStart": {"role": "assistant"}},
        {"contentBlockDelta": {"delta": {"text": "Par"}, "contentBlockIndex": 0}},
        {"contentBlockDelta": {"delta": {"text": "is."}, "contentBlockIndex": 0}},
        {"messageStop": {"stopReason": "end_turn"}},
        {
            "metadata": {
                "usage": {
                    "inputTokens": 10,
                    "outputTokens": 20,
                    "totalTokens": 130,
                    "cacheReadInputTokenCount": 100,
                },
                "metrics": {"latencyMs": 412},
            }
        },
    ]
    merged = None
    for event in events:
        merged = merge_stream_usage(merged, event)
    assert merged == Usage(
        total_tokens=130, prompt_tokens=110, completion_tokens=20, cached_tokens=100
    )
    rec = Recorder()
    async with CallbackManager([rec]).llm_call(provider="bedrock", model="amazon.nova-pro") as call:
        for event in events:
            await call.chunk(event)
    (response,), _ = rec.of("on_llm_end")[0]
    assert (response["tokens_used"], response["prompt_tokens"], response["cached_tokens"]) == (
        130,
        110,
        100,
    )
    assert response["estimated"] is False
