"""A LangChain chat model that answers without a network, with ``usage_metadata`` (on the last
chunk when streamed), for the LangChain integration tests and bench."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.language_models.base import LangSmithParams
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult

USAGE: UsageMetadata = {"input_tokens": 100, "output_tokens": 20, "total_tokens": 120}


class FakeChat(BaseChatModel):
    """Replies ``reply``; ``usage`` is its ``usage_metadata`` (``None``: none reported);
    ``fail`` is raised instead of answering."""

    model_name: str = "gpt-4o-mini"
    provider: str = "openai"
    reply: str = "Paris is the capital of France."
    usage: UsageMetadata | None = USAGE
    fail: Exception | None = None
    #: Stream the usage in two parts, as Anthropic's models do: the input on the first chunk,
    #: the output on the last (LangChain sums the chunks' ``usage_metadata``).
    split_usage: bool = False

    @property
    def _llm_type(self) -> str:
        return "fake-chat"

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = self.provider
        params["ls_model_name"] = self.model_name
        return params

    def _message(self) -> AIMessage:
        if self.fail is not None:
            raise self.fail
        return AIMessage(
            content=self.reply,
            usage_metadata=self.usage,
            response_metadata={"model_name": self.model_name},
        )

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return ChatResult(generations=[ChatGeneration(message=self._message())])

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return ChatResult(generations=[ChatGeneration(message=self._message())])

    def _pieces(self) -> list[ChatGenerationChunk]:
        words = self.reply.split(" ")
        pieces = [w if i == 0 else " " + w for i, w in enumerate(words)]
        chunks = []
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            usage = self.usage if last else None
            if self.split_usage and self.usage is not None and (i == 0 or last):
                if i == 0:
                    n = self.usage["input_tokens"]
                    usage = {"input_tokens": n, "output_tokens": 0, "total_tokens": n}
                else:
                    n = self.usage["output_tokens"]
                    usage = {"input_tokens": 0, "output_tokens": n, "total_tokens": n}
            chunks.append(
                ChatGenerationChunk(
                    message=AIMessageChunk(
                        content=piece,
                        usage_metadata=usage,
                        response_metadata={"model_name": self.model_name} if last else {},
                    )
                )
            )
        return chunks

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        for chunk in self._pieces():
            if run_manager is not None:
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk
        if self.fail is not None:
            raise self.fail

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        for chunk in self._pieces():
            if run_manager is not None:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk
        if self.fail is not None:
            raise self.fail
