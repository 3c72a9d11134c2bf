"""Stream usage merged field by field, through the real openai and anthropic SDKs against a
loopback server that streams the providers' documented shapes (fakellm's ``x-fake-usage``
variants): cache reads and writes (with their 5-minute/1-hour split) survive a message_delta
that leaves them out, running usage is not summed, thinking tokens are reasoning tokens."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest

from fakellm import FakeLLM
from llmtally import CostTracker, TokenCounter, instrument

from helpers import Recorder

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
# Bundled prices of claude-haiku-4-5, USD per 1M tokens: input 1, output 5, cache read 0.1,
# cache write (5 min) 1.25, cache write (1 h) 2.
HAIKU = "claude-haiku-4-5"
# 50 uncached input + 10,000 cache reads + 100 five-minute writes + 200 one-hour writes, 120 out.
HAIKU_COST = (50 * 1 + 10_000 * 0.1 + 100 * 1.25 + 200 * 2 + 120 * 5) / 1e6  # 0.002175
CACHE_COUNTS = (10_470, 10_350, 120, 10_000, 300, 0)  # total, prompt, completion, reads, writes, r.


@pytest.fixture
def fake() -> Iterator[FakeLLM]:
    server = FakeLLM()
    yield server
    server.close()


def counts(response: dict[str, Any]) -> tuple[Any, ...]:
    keys = ("tokens_used", "prompt_tokens", "completion_tokens", "cached_tokens")
    more = ("cache_write_tokens", "reasoning_tokens")
    return tuple(response.get(k) for k in (*keys, *more))


def ends(rec: Recorder) -> list[dict[str, Any]]:
    return [response for (response,), _ in rec.of("on_llm_end")]


@pytest.mark.parametrize("variant", ["output-only", "input-repeated", "cumulative", "null-cache"])
async def test_anthropic_stream_keeps_cache_reads_writes_and_the_1h_split(
    fake: FakeLLM, variant: str
) -> None:
    rec, cost, tokens = Recorder(), CostTracker(), TokenCounter()
    client = instrument(
        anthropic.AsyncAnthropic(api_key="k", base_url=fake.url, max_retries=0),
        [rec, cost, tokens],
        user_id="ann",
    )
    headers = {"x-fake-usage": variant}
    stream = await client.messages.create(
        model=HAIKU, max_tokens=100, messages=MESSAGES, stream=True, extra_headers=headers
    )
    async for _ in stream:
        pass
    async with client.messages.stream(
        model=HAIKU, max_tokens=100, messages=MESSAGES, extra_headers=headers
    ) as helper:
        final = await helper.get_final_message()
    # The SDK's own accumulator agrees: it merges field by field too.
    assert (final.usage.input_tokens, final.usage.cache_read_input_tokens) == (50, 10_000)
    assert final.usage.cache_creation_input_tokens == 300
    message = await client.messages.create(
        model=HAIKU, max_tokens=100, messages=MESSAGES, extra_headers=headers
    )
    assert message.usage.cache_read_input_tokens == 10_000
    found = ends(rec)
    assert [counts(r) for r in found] == [CACHE_COUNTS] * 3  # stream, helper, whole message
    assert [r["estimated"] for r in found] == [False] * 3
    # 1-hour writes at the 1-hour price: 0.002175 each, not 0.002025 (1 h writes priced as 5 min),
    # nor 0.00065 (cache reads and writes lost: prompt 50).
    assert [r["cost_estimate"] for r in found] == [pytest.approx(HAIKU_COST, abs=1e-12)] * 3
    assert cost.total_cost == pytest.approx(3 * HAIKU_COST, abs=1e-12)
    assert (tokens.prompt_tokens, tokens.cached_tokens, tokens.cache_write_tokens) == (
        3 * 10_350,
        3 * 10_000,
        3 * 300,
    )
    await client.close()


async def test_anthropic_thinking_tokens_are_reasoning_inside_the_output(fake: FakeLLM) -> None:
    rec, tokens = Recorder(), TokenCounter()
    client = instrument(
        anthropic.AsyncAnthropic(api_key="k", base_url=fake.url, max_retries=0), [rec, tokens]
    )
    headers = {"x-fake-usage": "thinking"}
    stream = await client.messages.create(
        model=HAIKU, max_tokens=100, messages=MESSAGES, stream=True, extra_headers=headers
    )
    async for _ in stream:
        pass
    await client.messages.create(
        model=HAIKU, max_tokens=100, messages=MESSAGES, extra_headers=headers
    )
    # 120 output tokens, 90 of them thinking: reasoning is a subset of the completion.
    assert [counts(r) for r in ends(rec)] == [(10_470, 10_350, 120, 10_000, 300, 90)] * 2
    assert (tokens.completion_tokens, tokens.reasoning_tokens) == (240, 180)
    await client.close()


async def test_openai_running_usage_in_every_chunk_is_not_summed(fake: FakeLLM) -> None:
    """Running (cumulative) usage in every chunk: the last one holds; the cache detail only the
    first chunk carried is kept."""
    rec = Recorder()
    client = instrument(
        openai.AsyncOpenAI(api_key="k", base_url=fake.url + "/v1", max_retries=0), [rec]
    )
    stream = await client.chat.completions.create(
        model="gpt-4o",
        messages=MESSAGES,  # type: ignore[arg-type]
        stream=True,
        extra_headers={"x-fake-usage": "continuous"},
    )
    async for _ in stream:
        pass
    assert [counts(r) for r in ends(rec)] == [(1500, 1200, 300, 1024, 0, 0)]
    await client.close()


async def test_openai_shaped_reasoning_beside_the_completion_is_folded_in(fake: FakeLLM) -> None:
    """A gateway in front of Gemini: completion 0, reasoning 60, total 81 = 21 + 0 + 60."""
    rec = Recorder()
    client = instrument(
        openai.AsyncOpenAI(api_key="k", base_url=fake.url + "/v1", max_retries=0), [rec]
    )
    headers = {"x-fake-usage": "sibling-reasoning"}
    await client.chat.completions.create(
        model="gemini-2.5-flash",
        messages=MESSAGES,  # type: ignore[arg-type]
        extra_headers=headers,
    )
    stream = await client.chat.completions.create(
        model="gemini-2.5-flash",
        messages=MESSAGES,  # type: ignore[arg-type]
        stream=True,
        extra_headers=headers,
    )
    async for _ in stream:
        pass
    found = ends(rec)
    assert [counts(r) for r in found] == [(81, 21, 60, 0, 0, 60)] * 2
    assert [r["estimated"] for r in found] == [False] * 2
    await client.close()
