"""llm_call: the response dict, provider shapes, streaming, errors, bad input, dedupe."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from anthropic.types import (
    Message,
    RawContentBlockDeltaEvent,
    RawMessageDeltaEvent,
    RawMessageStartEvent,
)
from openai.types.chat import ChatCompletion, ChatCompletionChunk

import llmtally
from llmtally import CallbackManager

from helpers import MESSAGES, Recorder

OPENAI_BODY: dict[str, Any] = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "gpt-4o-2024-08-06",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Paris."},
            "finish_reason": "stop",
        }
    ],
    "usage": {
        "prompt_tokens": 1200,
        "completion_tokens": 300,
        "total_tokens": 1500,
        "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 256, "audio_tokens": 0},
    },
}

ANTHROPIC_BODY: dict[str, Any] = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-5-20250929",
    "content": [{"type": "text", "text": "Paris."}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {
        "input_tokens": 50,
        "output_tokens": 120,
        "cache_read_input_tokens": 2000,
        "cache_creation_input_tokens": 300,
        "cache_creation": {"ephemeral_5m_input_tokens": 100, "ephemeral_1h_input_tokens": 200},
    },
}

RESPONSES_BODY: dict[str, Any] = {
    "id": "resp_1",
    "object": "response",
    "model": "o4-mini",
    "output": [
        {"type": "message", "content": [{"type": "output_text", "text": "Paris."}]},
    ],
    "usage": {
        "input_tokens": 900,
        "output_tokens": 400,
        "total_tokens": 1300,
        "input_tokens_details": {"cached_tokens": 512},
        "output_tokens_details": {"reasoning_tokens": 320},
    },
}


async def run(obj: Any, **context: Any) -> tuple[llmtally.LLMCall, Recorder]:
    rec = Recorder()
    manager = CallbackManager([rec])
    async with manager.llm_call(MESSAGES, provider="p", model="m", **context) as call:
        call.set_response(obj)
    return call, rec


def counts(response: dict[str, Any]) -> tuple[Any, ...]:
    keys = (
        "tokens_used",
        "prompt_tokens",
        "completion_tokens",
        "cached_tokens",
        "cache_write_tokens",
        "reasoning_tokens",
    )
    return tuple(response.get(k) for k in keys)


async def test_openai_chat_body_keeps_subsets_inside_prompt_and_completion() -> None:
    call, rec = await run(OPENAI_BODY)
    response = call.response
    assert response is not None
    assert counts(response) == (1500, 1200, 300, 1024, 0, 256)
    assert response["content"] == "Paris."
    assert response["model"] == "gpt-4o-2024-08-06"
    assert response["provider"] == "p"
    assert response["estimated"] is False
    # Priced from the bundled table (gpt-4o: 2.50 in, 1.25 cached reads, 10.00 out per 1M):
    # 176 x 2.50 + 1024 x 1.25 + 300 x 10.00 = 4,720 micro-USD.
    assert response["cost_pusd"] == 4_720_000_000
    assert (response["cost_estimate"], response["cost_source"]) == (0.00472, "table")
    (resp,), kwargs = rec.of("on_llm_end")[0]
    assert resp is response
    assert kwargs["token_count"] == 1500
    assert kwargs["cost"] == 0.00472
    assert kwargs["duration_ms"] == pytest.approx(response["response_time"] * 1000)


async def test_openai_sdk_object_equals_its_json_body() -> None:
    call, _ = await run(ChatCompletion.model_validate(OPENAI_BODY))
    assert call.response is not None
    assert counts(call.response) == (1500, 1200, 300, 1024, 0, 256)
    assert call.response["content"] == "Paris."


async def test_anthropic_siblings_are_folded_into_prompt() -> None:
    call, _ = await run(ANTHROPIC_BODY)
    assert call.response is not None
    # prompt = input 50 + cache reads 2000 + cache writes 300
    assert counts(call.response) == (2470, 2350, 120, 2000, 300, 0)
    assert call.response["cache_write_1h_tokens"] == 200
    assert call.response["content"] == "Paris."
    usage = call.usage
    assert usage is not None and usage.cache_write_1h_tokens == 200


async def test_anthropic_sdk_object() -> None:
    call, _ = await run(Message.model_validate(ANTHROPIC_BODY))
    assert call.response is not None
    assert counts(call.response) == (2470, 2350, 120, 2000, 300, 0)


async def test_openai_responses_shape() -> None:
    call, _ = await run(RESPONSES_BODY)
    assert call.response is not None
    assert counts(call.response) == (1300, 900, 400, 512, 0, 320)
    assert call.response["content"] == "Paris."


async def test_gemini_thoughts_are_part_of_completion() -> None:
    body = {
        "candidates": [{"content": {"parts": [{"text": "Paris."}]}}],
        "usageMetadata": {
            "promptTokenCount": 100,
            "candidatesTokenCount": 20,
            "thoughtsTokenCount": 30,
            "cachedContentTokenCount": 40,
            "totalTokenCount": 150,
        },
    }
    call, _ = await run(body)
    assert call.response is not None
    assert counts(call.response) == (150, 100, 50, 40, 0, 30)


async def test_langchain_usage_metadata() -> None:
    class AIMessage:
        content = "Paris."
        usage_metadata = {
            "input_tokens": 350,
            "output_tokens": 240,
            "total_tokens": 590,
            "input_token_details": {"cache_read": 100, "cache_creation": 200},
            "output_token_details": {"reasoning": 200},
        }

    call, _ = await run(AIMessage())
    assert call.response is not None
    assert counts(call.response) == (590, 350, 240, 100, 200, 200)


async def test_own_response_dict_and_provider_cost() -> None:
    call, rec = await run(
        {"content": "hi", "prompt_tokens": 7, "completion_tokens": 3, "cost_estimate": 0.25}
    )
    assert call.response is not None
    assert counts(call.response) == (10, 7, 3, 0, 0, 0)
    assert call.response["cost_estimate"] == 0.25
    assert call.response["cost_source"] == "provider"
    assert rec.of("on_llm_end")[0][1]["cost"] == 0.25


async def test_litellm_response_cost_wins() -> None:
    body = dict(OPENAI_BODY, _hidden_params={"response_cost": 0.0042})
    call, _ = await run(body)
    assert call.response is not None
    assert call.response["cost_estimate"] == 0.0042
    assert call.response["cost_source"] == "provider"


async def test_total_only_leaves_split_unknown() -> None:
    call, _ = await run({"content": "x", "tokens_used": 42})
    assert call.response is not None
    assert call.response["tokens_used"] == 42
    assert "prompt_tokens" not in call.response and "completion_tokens" not in call.response


async def test_disagreeing_total_is_kept_and_warned() -> None:
    rec = Recorder()
    manager = CallbackManager([rec])
    async with manager.llm_call(MESSAGES) as call:
        call.set_response({"tokens_used": 20, "prompt_tokens": 10, "completion_tokens": 5})
    assert call.response is not None
    assert counts(call.response)[:3] == (20, 10, 5)
    assert (await manager.health())["usage_warnings"] == 1


@pytest.mark.parametrize(
    "usage",
    [
        {"prompt_tokens": -1, "completion_tokens": 5},
        {"prompt_tokens": 10**12, "completion_tokens": 5},
        {"prompt_tokens": 10.0, "completion_tokens": 5},
        {"prompt_tokens": "10", "completion_tokens": 5},
        {"prompt_tokens": True, "completion_tokens": 5},
        {
            "prompt_tokens": 10,
            "completion_tokens": 5,
            "prompt_tokens_details": {"cached_tokens": 11},
        },
        {
            "prompt_tokens": 10,
            "completion_tokens": 5,
            "completion_tokens_details": {"reasoning_tokens": 6},
        },
        {"prompt_tokens": 2**70, "completion_tokens": 5},
    ],
)
async def test_bad_counts_skip_the_usage_whole_and_count_bad_input(usage: dict[str, Any]) -> None:
    rec = Recorder()
    manager = CallbackManager([rec])
    async with manager.llm_call(MESSAGES) as call:
        call.set_response({"usage": usage, "choices": [{"message": {"content": "x"}}]})
    response = call.response
    assert response is not None
    assert "tokens_used" not in response and "prompt_tokens" not in response
    assert response["usage_error"]
    assert response["estimated"] is False
    (_, kwargs) = rec.of("on_llm_end")[0]
    assert kwargs["token_count"] is None
    health = await manager.health()
    assert health["bad_input"] == 1
    assert health["errors"] == 0


@pytest.mark.parametrize("obj", ["just text", 42, None, ["a", "b"], b"bytes"])
async def test_response_that_is_not_a_response_is_estimated_from_prompt(obj: Any) -> None:
    manager = CallbackManager([Recorder()])
    async with manager.llm_call(MESSAGES, model="gpt-4o") as call:
        call.set_response(obj)
    response = call.response
    assert response is not None
    assert response["estimated"] is True
    expected = llmtally.estimate_tokens(MESSAGES, "gpt-4o")
    assert response["prompt_tokens"] == expected > 0
    assert response["tokens_used"] == expected
    assert (await manager.health())["bad_input"] == 1


async def test_no_response_at_all_is_estimated_never_a_silent_zero() -> None:
    manager = CallbackManager([Recorder()])
    async with manager.llm_call(MESSAGES) as call:
        pass
    assert call.response is not None
    assert call.response["estimated"] is True
    assert call.response["prompt_tokens"] == llmtally.estimate_tokens(MESSAGES) > 0


async def test_malformed_messages_are_bad_input_not_an_exception() -> None:
    manager = CallbackManager([Recorder()])
    async with manager.llm_call([{"role": "user", "content": 5}, "x"]) as call:
        pass
    assert call.response is not None and call.response["estimated"] is True
    assert (await manager.health())["bad_input"] == 1


# -- streaming ---------------------------------------------------------------------------------


def openai_chunks(with_usage: bool) -> list[Any]:
    chunks: list[Any] = [
        ChatCompletionChunk.model_validate(
            {
                "id": "c",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": "gpt-4o",
                "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
            }
        )
        for text in ("The capital ", "of France ", "is Paris.")
    ]
    if with_usage:
        chunks.append(
            ChatCompletionChunk.model_validate(
                {
                    "id": "c",
                    "object": "chat.completion.chunk",
                    "created": 1,
                    "model": "gpt-4o",
                    "choices": [],
                    "usage": {"prompt_tokens": 14, "completion_tokens": 8, "total_tokens": 22},
                }
            )
        )
    return chunks


async def test_stream_with_final_usage_chunk() -> None:
    rec = Recorder()
    manager = CallbackManager([rec])
    async with manager.llm_call(MESSAGES, model="gpt-4o") as call:
        for chunk in openai_chunks(with_usage=True):
            await asyncio.sleep(0)
            await call.chunk(chunk)
    response = call.response
    assert response is not None
    assert counts(response)[:3] == (22, 14, 8)
    assert response["estimated"] is False
    assert response["content"] == "The capital of France is Paris."
    assert response["chunks"] == 4
    assert 0 <= response["time_to_first_token"] <= response["response_time"]
    assert len(rec.of("on_llm_stream_chunk")) == 4
    end_kwargs = rec.of("on_llm_end")[0][1]
    assert end_kwargs["ttft_ms"] == pytest.approx(response["time_to_first_token"] * 1000)


async def test_stream_without_usage_is_estimated() -> None:
    manager = CallbackManager([Recorder()])
    async with manager.llm_call(MESSAGES, model="gpt-4o") as call:
        for chunk in openai_chunks(with_usage=False):
            await call.chunk(chunk)
    response = call.response
    assert response is not None
    assert response["estimated"] is True
    assert response["prompt_tokens"] == llmtally.estimate_tokens(MESSAGES, "gpt-4o")
    assert response["completion_tokens"] == llmtally.estimate_tokens(
        "The capital of France is Paris.", "gpt-4o"
    )
    assert response["completion_tokens"] > 0


async def test_plain_text_chunks() -> None:
    manager = CallbackManager([])
    async with manager.llm_call(MESSAGES) as call:
        for piece in ("Hello", " world"):
            await call.chunk(piece)
    assert call.response is not None
    assert call.response["content"] == "Hello world"
    assert call.response["estimated"] is True


async def test_anthropic_stream_events_merge_input_and_output() -> None:
    events = [
        RawMessageStartEvent.model_validate(
            {
                "type": "message_start",
                "message": dict(
                    ANTHROPIC_BODY,
                    content=[],
                    usage={
                        "input_tokens": 50,
                        "output_tokens": 1,
                        "cache_read_input_tokens": 2000,
                        "cache_creation_input_tokens": 300,
                    },
                ),
            }
        ),
        RawContentBlockDeltaEvent.model_validate(
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": "Par"},
            }
        ),
        RawContentBlockDeltaEvent.model_validate(
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": "is."},
            }
        ),
        RawMessageDeltaEvent.model_validate(
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": 120},
            }
        ),
    ]
    manager = CallbackManager([])
    async with manager.llm_call(MESSAGES, provider="anthropic") as call:
        for event in events:
            await call.chunk(event)
    assert call.response is not None
    assert counts(call.response) == (2470, 2350, 120, 2000, 300, 0)
    assert call.response["content"] == "Paris."


async def test_bad_usage_in_a_chunk_is_counted_not_raised() -> None:
    manager = CallbackManager([])
    async with manager.llm_call(MESSAGES) as call:
        await call.chunk({"choices": [], "usage": {"prompt_tokens": -5, "completion_tokens": 1}})
        await call.chunk("text")
    assert call.response is not None and call.response["estimated"] is True
    assert (await manager.health())["bad_input"] == 1


# -- errors ------------------------------------------------------------------------------------


async def test_error_fires_on_llm_error_and_reraises() -> None:
    rec = Recorder()
    manager = CallbackManager([rec])
    boom = ConnectionError("provider down")
    with pytest.raises(ConnectionError) as info:
        async with manager.llm_call(MESSAGES, user_id="u1"):
            raise boom
    assert info.value is boom
    assert rec.names() == ["on_llm_start", "on_llm_error"]
    (error,), kwargs = rec.of("on_llm_error")[0]
    assert error is boom
    assert kwargs["user_id"] == "u1" and kwargs["duration_ms"] >= 0


# -- context kwargs and ids --------------------------------------------------------------------


async def test_context_kwargs_reach_every_event() -> None:
    rec = Recorder()
    manager = CallbackManager([rec])
    async with manager.llm_call(
        MESSAGES, provider="openai", model="gpt-4o", user_id="alice", tenant="acme"
    ) as call:
        await call.chunk("x")
        call.set_response(OPENAI_BODY)
    start, chunk, end = (kwargs for _, _, kwargs in rec.events)
    for kwargs in (start, chunk, end):
        assert kwargs["provider"] == "openai"
        assert kwargs["model"] == "gpt-4o"
        assert kwargs["user_id"] == "alice"
        assert kwargs["tenant"] == "acme"
        assert kwargs["request_id"] == call.request_id
        assert kwargs["run_id"] == call.run_id
        assert kwargs["trace_id"] == call.run_id  # a root call starts its own trace
        assert kwargs["parent_run_id"] is None
    assert {"token_count", "cost", "duration_ms"} <= end.keys()
    assert "token_count" not in start


async def test_provider_and_model_default_to_unknown_and_no_user_id_is_absent() -> None:
    rec = Recorder()
    async with CallbackManager([rec]).llm_call(MESSAGES):
        pass
    kwargs = rec.of("on_llm_start")[0][1]
    assert (kwargs["provider"], kwargs["model"]) == ("unknown", "unknown")
    assert "user_id" not in kwargs


async def test_generated_request_ids_are_unique() -> None:
    manager = CallbackManager([])
    ids = set()
    for _ in range(1000):
        async with manager.llm_call(MESSAGES) as call:
            pass
        ids.add(call.request_id)
    assert len(ids) == 1000


async def test_same_request_id_is_counted_once() -> None:
    rec = Recorder()
    manager = CallbackManager([rec])
    for _ in range(3):
        async with manager.llm_call(MESSAGES, request_id="req-1") as call:
            call.set_response(OPENAI_BODY)
    ends = rec.of("on_llm_end")
    assert len(ends) == 1
    assert ends[0][1]["request_id"] == "req-1"
    # A request already counted is not started again either: no handler waits for an end
    # (a budget reservation, an open span) that never comes.
    assert len(rec.of("on_llm_start")) == 1
    assert call.duplicate is True
    health = await manager.health()
    assert (health["llm_calls"], health["duplicates"]) == (1, 2)
    async with manager.llm_call(MESSAGES, request_id="req-2") as call:
        call.set_response(OPENAI_BODY)
    assert len(rec.of("on_llm_end")) == 2
    assert len(rec.of("on_llm_start")) == 2


async def test_a_failed_request_retried_with_its_id_is_counted() -> None:
    rec = Recorder()
    manager = CallbackManager([rec])
    with pytest.raises(RuntimeError):
        async with manager.llm_call(MESSAGES, request_id="retry-1"):
            raise RuntimeError("provider down")
    async with manager.llm_call(MESSAGES, request_id="retry-1") as call:
        call.set_response(OPENAI_BODY)
    assert len(rec.of("on_llm_start")) == 2
    assert len(rec.of("on_llm_error")) == 1 and len(rec.of("on_llm_end")) == 1
    assert call.duplicate is False


def test_request_window_is_bounded_by_count_and_age() -> None:
    from llmtally.dispatch import RequestWindow

    window = RequestWindow(capacity=3, ttl_s=10.0)
    assert [window.seen(r, 0.0) for r in "abc"] == [False, False, False]
    assert window.seen("a", 1.0) is True
    assert window.seen("d", 1.0) is False  # evicts "a", the oldest
    assert len(window) == 3
    assert window.seen("a", 2.0) is False
    assert window.seen("d", 20.0) is False  # everything older than 10 s has expired
    assert len(window) == 1


async def test_provider_cost_wins_and_unknown_models_stay_unpriced() -> None:
    call, _ = await run(dict(OPENAI_BODY, _hidden_params={"response_cost": 0.01}))
    assert call.response is not None
    assert (call.response["cost_estimate"], call.response["cost_source"]) == (0.01, "provider")
    rec = Recorder()
    manager = CallbackManager([rec])
    async with manager.llm_call(MESSAGES, model="my-selfhosted-llama") as c:
        c.set_response({"prompt_tokens": 10, "completion_tokens": 2})
    assert c.response is not None
    assert (c.response["cost_estimate"], c.response["cost_source"]) == (None, None)
    assert c.response["tokens_used"] == 12  # counted, never dropped
    assert llmtally.pricing.unpriced_models().get("my-selfhosted-llama", 0) >= 1


async def test_registered_model_prices_calls() -> None:
    llmtally.register_model("acme-7b", input_price=0.2, output_price=0.6)
    async with CallbackManager([]).llm_call(MESSAGES, model="acme-7b") as c:
        c.set_response({"prompt_tokens": 1000, "completion_tokens": 500})
    assert c.response is not None
    assert c.response["cost_pusd"] == 1000 * 200_000 + 500 * 600_000
    assert c.response["cost_source"] == "table"


async def test_a_response_that_raises_when_read_never_breaks_the_call() -> None:
    class Hostile:
        @property
        def usage(self) -> Any:
            raise RuntimeError("lazy attribute exploded")

    rec = Recorder()
    manager = CallbackManager([rec])
    async with manager.llm_call(MESSAGES, model="gpt-4o") as call:
        call.set_response(Hostile())
    assert call.response is not None
    assert call.response["estimated"] is True
    assert call.response["prompt_tokens"] == llmtally.estimate_tokens(MESSAGES, "gpt-4o")
    assert rec.names() == ["on_llm_start", "on_llm_end"]
    assert (await manager.health())["bad_input"] == 1


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (OPENAI_BODY, ("chatcmpl-1", "stop")),
        (ANTHROPIC_BODY, ("msg_1", "end_turn")),
        (
            {
                "responseId": "g-1",
                "candidates": [{"finishReason": "STOP"}],
                "usageMetadata": {"promptTokenCount": 4, "candidatesTokenCount": 2},
            },
            ("g-1", "STOP"),
        ),
        ({"usage": {"prompt_tokens": 4, "completion_tokens": 2}}, (None, None)),
    ],
)
async def test_the_response_id_and_finish_reason_are_carried(
    body: dict[str, Any], expected: tuple[str | None, str | None]
) -> None:
    """As dicts and SDK objects, through a user handler (eager dict) and through built-in
    handlers only (the dict built when read): the same ``response_id`` and ``finish_reason``."""
    objects: list[Any] = [body]
    if body is OPENAI_BODY:
        objects.append(ChatCompletion.model_validate(body))
    if body is ANTHROPIC_BODY:
        objects.append(Message.model_validate(body))
    for obj in objects:
        for handlers in ([Recorder()], [llmtally.TokenCounter()]):
            manager = CallbackManager(handlers)
            async with manager.llm_call(MESSAGES, model="gpt-4o") as call:
                call.set_response(obj)
            assert call.response is not None
            assert (call.response.get("response_id"), call.response.get("finish_reason")) == (
                expected
            )


async def test_an_id_llmtally_made_handed_back_is_counted_once() -> None:
    """A retry that reuses the request id llmtally generated for a counted call is a
    duplicate; one that reuses the id of a failed call is counted."""
    counter = llmtally.TokenCounter()
    rec = Recorder()
    for handlers in ([counter], [counter, rec]):  # the core path and the general one
        manager = CallbackManager(handlers)
        async with manager.llm_call(MESSAGES, model="gpt-4o") as first:
            first.set_response({"prompt_tokens": 4, "completion_tokens": 1})
        async with manager.llm_call(MESSAGES, model="gpt-4o", request_id=first.request_id) as again:
            again.set_response({"prompt_tokens": 4, "completion_tokens": 1})
        assert again.duplicate is True
        with pytest.raises(RuntimeError):
            async with manager.llm_call(MESSAGES, model="gpt-4o") as failed:
                raise RuntimeError("provider down")
        async with manager.llm_call(MESSAGES, model="gpt-4o", request_id=failed.request_id) as r:
            r.set_response({"prompt_tokens": 4, "completion_tokens": 1})
        assert r.duplicate is False
    assert counter.requests == 4 and counter.total_tokens == 20
    assert len(rec.of("on_llm_start")) == 3  # the handed-back counted id was not started
