"""LangChain runs' usage, with real langchain-core: a text-completion batch's runs after the first
(``token_usage: {}``, on purpose, from ``LLMResult.flatten()``) count as the zero LangChain meant;
an empty ``token_usage`` anywhere else is a provider that reported nothing, estimated."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("langchain_core")

from langchain_core.language_models.llms import BaseLLM
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult, Generation, LLMResult

import llmtally
from llmtally.langchain import LlmtallyCallbackHandler, TokenCountingCallback

from fakechat import FakeChat
from helpers import Recorder

PROMPTS = ["What is the capital of France?", "And of Italy?", "And of Spain?"]
MODEL = "gpt-3.5-turbo-instruct"  # bundled price: 1.5 in, 2 out (USD per 1M tokens)


class BatchLLM(BaseLLM):
    """A text-completion model whose provider reports one usage for the whole batch."""

    token_usage: dict[str, int] = {"prompt_tokens": 300, "completion_tokens": 30}
    model_name: str = MODEL

    @property
    def _llm_type(self) -> str:
        return "batch"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.model_name}  # as langchain-openai's OpenAI: the run's model

    def _generate(self, prompts: list[str], *args: Any, **kwargs: Any) -> LLMResult:
        return LLMResult(
            generations=[[Generation(text=f"Answer number {i}.")] for i in range(len(prompts))],
            llm_output={"token_usage": dict(self.token_usage), "model_name": MODEL},
        )


def handlers() -> tuple[llmtally.TokenCounter, llmtally.CostTracker, Recorder, list[Any]]:
    tokens, cost, rec = llmtally.TokenCounter(), llmtally.CostTracker(), Recorder()
    return tokens, cost, rec, [LlmtallyCallbackHandler([tokens, cost, rec])]


def ends(rec: Recorder) -> list[dict[str, Any]]:
    return [response for (response,), _ in rec.of("on_llm_end")]


@pytest.mark.parametrize("sync", [False, True], ids=["agenerate", "generate"])
async def test_a_batch_of_three_books_exactly_the_providers_300_30(sync: bool) -> None:
    # What LangChain hands each run: the batch's usage to the first, {} to the others.
    flat = BatchLLM()._generate(PROMPTS).flatten()
    assert [r.llm_output["token_usage"] for r in flat if r.llm_output] == [
        {"prompt_tokens": 300, "completion_tokens": 30},
        {},
        {},
    ]
    tokens, cost, rec, callbacks = handlers()
    native = TokenCountingCallback()
    if sync:
        BatchLLM().generate(PROMPTS, callbacks=[*callbacks, native])
    else:
        await BatchLLM().agenerate(PROMPTS, callbacks=[*callbacks, native])
    assert (tokens.prompt_tokens, tokens.completion_tokens, tokens.total_tokens) == (300, 30, 330)
    assert tokens.requests == 3 and cost.request_count == 3
    assert [r["estimated"] for r in ends(rec)] == [False] * 3
    assert sorted(r["tokens_used"] for r in ends(rec)) == [0, 0, 330]
    assert cost.total_cost == pytest.approx((300 * 1.5 + 30 * 2) / 1e6, abs=1e-12)
    assert (native.prompt_tokens, native.completion_tokens, native.requests) == (300, 30, 3)
    assert native.estimated_requests == 0


async def test_a_single_completion_with_an_empty_token_usage_is_estimated() -> None:
    """A streamed text completion: langchain-openai's token_usage stays {} when the provider
    sent none. That run is the whole call, not a share of a batch: estimated, never 0."""
    _, _, rec, callbacks = handlers()
    native = TokenCountingCallback()
    model = BatchLLM(token_usage={})
    await model.agenerate(PROMPTS[:1], callbacks=[*callbacks, native])
    (response,) = ends(rec)
    assert response["estimated"] is True
    assert response["prompt_tokens"] > 0 and response["completion_tokens"] > 0
    assert native.estimated_requests == 1 and native.total_tokens > 0


async def test_a_batch_without_usage_information_is_estimated() -> None:
    class NoOutput(BatchLLM):
        def _generate(self, prompts: list[str], *args: Any, **kwargs: Any) -> LLMResult:
            return LLMResult(generations=[[Generation(text="Paris.")] for _ in prompts])

    _, _, rec, callbacks = handlers()
    await NoOutput().agenerate(PROMPTS, callbacks=callbacks)
    assert [r["estimated"] for r in ends(rec)] == [True] * 3
    assert all(r["prompt_tokens"] > 0 for r in ends(rec))


class EmptyUsageChat(FakeChat):
    """A chat model whose integration writes ``token_usage: {}`` when the provider sent none.
    Chat runs are not flattened: that {} is no usage, not a batch share."""

    async def _agenerate(self, messages: list[BaseMessage], *args: Any, **kwargs: Any) -> Any:
        message = AIMessage(content="Paris.")
        return ChatResult(
            generations=[ChatGeneration(message=message)], llm_output={"token_usage": {}}
        )


async def test_a_chat_run_with_an_empty_token_usage_is_estimated() -> None:
    _, _, rec, callbacks = handlers()
    native = TokenCountingCallback()
    model = EmptyUsageChat()
    await model.abatch(PROMPTS, config={"callbacks": [*callbacks, native]})
    assert [r["estimated"] for r in ends(rec)] == [True] * 3
    assert all(r["completion_tokens"] > 0 for r in ends(rec))
    assert native.estimated_requests == 3
