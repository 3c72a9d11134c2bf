"""instrument(): the real openai and anthropic SDKs against a loopback server."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest

import llmtally
from fakellm import FakeLLM
from llmtally import CostTracker, instrument

from helpers import Recorder

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def fake() -> Iterator[FakeLLM]:
    server = FakeLLM()
    yield server
    server.close()


def counts(response: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(
        response.get(k)
        for k in ("tokens_used", "prompt_tokens", "completion_tokens", "cached_tokens",
                  "cache_write_tokens", "reasoning_tokens")
    )  # fmt: skip


async def test_openai_chat_completion(fake: FakeLLM) -> None:
    rec, cost = Recorder(), CostTracker()
    client = openai.AsyncOpenAI(api_key="k", base_url=fake.url + "/v1", max_retries=0)
    assert instrument(client, callbacks=[rec, cost], user_id="alice") is client
    assert instrument(client, callbacks=[rec]) is client  # idempotent: not wrapped twice
    result = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert result.choices[0].message.content == "Paris."
    assert rec.names() == ["on_llm_start", "on_llm_end"]
    (messages,), start = rec.of("on_llm_start")[0]
    assert messages == MESSAGES
    assert (start["provider"], start["model"], start["user_id"]) == ("openai", "gpt-4o", "alice")
    (response,), end = rec.of("on_llm_end")[0]
    assert counts(response) == (1500, 1200, 300, 1024, 0, 256)
    assert response["content"] == "Paris." and response["estimated"] is False
    assert response["cost_source"] == "table" and end["cost"] == 0.00472
    assert cost.by_user()["alice"]["cost_usd"] == 0.00472
    await client.close()


async def test_openai_stream_asks_for_usage_and_counts_it(fake: FakeLLM) -> None:
    rec = Recorder()
    client = instrument(
        openai.AsyncOpenAI(api_key="k", base_url=fake.url + "/v1", max_retries=0), [rec]
    )
    stream = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    texts = [c.choices[0].delta.content async for c in stream if c.choices]
    assert texts == ["Pa", "ris", ".", None]  # the finish chunk has an empty delta
    assert fake.requests[-1][1]["stream_options"] == {"include_usage": True}
    (response,), end = rec.of("on_llm_end")[0]
    assert counts(response) == (1500, 1200, 300, 1024, 0, 256)
    assert response["content"] == "Paris." and response["chunks"] == 5
    assert end["ttft_ms"] >= 0
    assert len(rec.of("on_llm_stream_chunk")) == 5
    assert llmtally.current_run() is None  # the stream did not stay the task's current scope
    await client.close()


async def test_openai_stream_without_usage_is_estimated(fake: FakeLLM) -> None:
    rec = Recorder()
    client = instrument(
        openai.AsyncOpenAI(api_key="k", base_url=fake.url + "/v1", max_retries=0), [rec]
    )
    stream = await client.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, stream=True, stream_options={"include_usage": False}
    )
    async with stream:
        async for _ in stream:
            pass
    (response,), _ = rec.of("on_llm_end")[0]
    assert response["estimated"] is True
    assert response["completion_tokens"] == llmtally.estimate_tokens("Paris.", "gpt-4o")
    assert response["prompt_tokens"] == llmtally.estimate_tokens(MESSAGES, "gpt-4o")
    await client.close()


async def test_openai_responses_api(fake: FakeLLM) -> None:
    rec = Recorder()
    client = instrument(
        openai.AsyncOpenAI(api_key="k", base_url=fake.url + "/v1", max_retries=0), [rec]
    )
    await client.responses.create(model="o4-mini", input="hi")
    stream = await client.responses.create(model="o4-mini", input="hi", stream=True)
    async for _ in stream:
        pass
    ends = rec.of("on_llm_end")
    assert [counts(r) for (r,), _ in ends] == [(1300, 900, 400, 512, 0, 320)] * 2
    assert ends[1][0][0]["content"] == "Paris."
    await client.close()


async def test_anthropic_messages_and_stream(fake: FakeLLM) -> None:
    rec = Recorder()
    client = instrument(
        anthropic.AsyncAnthropic(api_key="k", base_url=fake.url, max_retries=0),
        [rec],
        user_id="bob",
    )
    message = await client.messages.create(
        model="claude-house-model", max_tokens=100, messages=MESSAGES, system="Be brief."
    )
    assert message.content[0].text == "Paris."  # type: ignore[union-attr]
    stream = await client.messages.create(
        model="claude-house-model", max_tokens=100, messages=MESSAGES, stream=True
    )
    async for _ in stream:
        pass
    ends = rec.of("on_llm_end")
    # prompt = input 50 + cache reads 2000 + cache writes 300
    assert [counts(r) for (r,), _ in ends] == [(2470, 2350, 120, 2000, 300, 0)] * 2
    assert ends[1][0][0]["content"] == "Paris."
    (first_messages,), start = rec.of("on_llm_start")[0]
    assert first_messages[0] == {"role": "system", "content": "Be brief."}
    assert start["provider"] == "anthropic" and start["user_id"] == "bob"
    await client.close()


async def test_provider_error_fires_on_llm_error(fake: FakeLLM) -> None:
    rec = Recorder()
    client = instrument(
        openai.AsyncOpenAI(api_key="k", base_url=fake.url + "/v1", max_retries=0), [rec]
    )
    with pytest.raises(openai.InternalServerError):
        await client.chat.completions.create(model="fail", messages=MESSAGES)
    assert rec.names() == ["on_llm_start", "on_llm_error"]
    assert isinstance(rec.of("on_llm_error")[0][0][0], openai.InternalServerError)
    await client.close()


async def test_user_id_is_inherited_from_an_enclosing_scope(fake: FakeLLM) -> None:
    rec = Recorder()
    manager = llmtally.CallbackManager([rec])
    client = instrument(
        openai.AsyncOpenAI(api_key="k", base_url=fake.url + "/v1", max_retries=0), manager
    )
    async with manager.agent_run("answer", user_id="carol") as run:
        await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    start = rec.of("on_llm_start")[0][1]
    assert start["user_id"] == "carol" and start["parent_run_id"] == run.run_id
    await client.close()


def test_instrument_rejects_other_objects() -> None:
    with pytest.raises(TypeError):
        instrument(object(), [])
