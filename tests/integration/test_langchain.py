"""llmtally.langchain against the real langchain-core, with a fake chat model (no network)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

pytest.importorskip("langchain_core")

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.documents import Document
from langchain_core.messages import BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.retrievers import BaseRetriever
from langchain_core.tools import tool

import llmtally
from llmtally.errors import CallbackAbort
from llmtally.langchain import (
    CompositeCallback,
    CostTrackingCallback,
    DefectAnalysisCallback,
    LlmtallyCallbackHandler,
    PerformanceCallback,
    StreamingCallback,
    TokenCountingCallback,
)

from fakechat import FakeChat
from helpers import Failing, Recorder

QUESTION = "What is the capital of France?"
REPLY = "Paris is the capital of France."
# FakeChat streams REPLY word by word (6 chunks); langchain-core >= 1.0 adds an empty last chunk,
# and fires a new-token event for each chunk it yields.
CHUNKS = len(list(FakeChat().stream(QUESTION)))
# gpt-4o-mini: 0.15 USD / 1M input, 0.075 cached input, 0.60 output.
COST_PUSD = 100 * 150_000 + 20 * 600_000  # 27 micro-USD


def config(*callbacks: Any, **extra: Any) -> Any:
    return {"callbacks": list(callbacks), **extra}


# ---------------------------------------------------------------------------------------------
# LlmtallyCallbackHandler


async def test_usage_is_counted_once_per_run_keyed_by_the_langchain_run_id() -> None:
    rec, cost, tokens = Recorder(), llmtally.CostTracker(), llmtally.TokenCounter()
    handler = LlmtallyCallbackHandler([rec, cost, tokens], user_id="alice", team="search")
    model = FakeChat()
    result = await model.ainvoke(QUESTION, config=config(handler))
    assert result.content == REPLY
    await model.ainvoke(QUESTION, config=config(handler))

    assert rec.names() == ["on_llm_start", "on_llm_end"] * 2
    (messages,), start = rec.of("on_llm_start")[0]
    assert messages == [{"role": "user", "content": QUESTION}]
    run_ids = set()
    for (response,), kwargs in rec.of("on_llm_end"):
        uuid.UUID(kwargs["run_id"])  # LangChain's run id ...
        assert kwargs["request_id"] == kwargs["run_id"]  # ... is the request id
        assert kwargs["parent_run_id"] is None
        assert (kwargs["provider"], kwargs["model"]) == ("openai", "gpt-4o-mini")
        assert (kwargs["user_id"], kwargs["team"]) == ("alice", "search")
        assert response["tokens_used"] == 120
        assert (response["prompt_tokens"], response["completion_tokens"]) == (100, 20)
        assert response["estimated"] is False
        assert response["cost_pusd"] == COST_PUSD
        assert response["content"] == REPLY
        run_ids.add(kwargs["run_id"])
    assert len(run_ids) == 2
    assert start["run_id"] == rec.of("on_llm_end")[0][1]["run_id"]
    assert (tokens.requests, tokens.total_tokens, tokens.prompt_tokens) == (2, 240, 200)
    assert (cost.request_count, cost.total_cost_pusd) == (2, 2 * COST_PUSD)
    assert cost.by_user()["alice"]["requests"] == 2
    assert handler.open_runs == 0
    health = await handler.manager.health()
    assert (health["llm_calls"], health["duplicates"], health["errors"]) == (2, 0, 0)


async def test_a_replayed_end_for_the_same_run_is_not_counted_again() -> None:
    tokens = llmtally.TokenCounter()
    handler = LlmtallyCallbackHandler([tokens])
    run_id = uuid.uuid4()
    message = FakeChat()._message()
    result = llmtally_result(message)
    await handler.on_chat_model_start({}, [[]], run_id=run_id, metadata={"ls_provider": "openai"})
    await handler.on_llm_end(result, run_id=run_id)
    await handler.on_llm_end(result, run_id=run_id)  # unknown run now: ignored
    assert (tokens.requests, tokens.total_tokens) == (1, 120)
    assert handler.errors == 0


def llmtally_result(message: Any) -> Any:
    from langchain_core.outputs import LLMResult

    return LLMResult(generations=[[ChatGeneration(message=message)]])


async def test_cache_reads_are_inside_input_tokens_and_priced_at_the_cache_price() -> None:
    usage: Any = {
        "input_tokens": 100,
        "output_tokens": 20,
        "total_tokens": 120,
        "input_token_details": {"cache_read": 60},
        "output_token_details": {"reasoning": 5},
    }
    rec, tokens = Recorder(), llmtally.TokenCounter()
    native_tokens, native_cost = TokenCountingCallback(), CostTrackingCallback()
    handler = LlmtallyCallbackHandler([rec, tokens])
    await FakeChat(usage=usage).ainvoke(
        QUESTION, config=config(handler, native_tokens, native_cost)
    )
    (response,), _ = rec.of("on_llm_end")[0]
    assert (response["prompt_tokens"], response["cached_tokens"]) == (100, 60)
    assert (response["completion_tokens"], response["reasoning_tokens"]) == (20, 5)
    expected = 40 * 150_000 + 60 * 75_000 + 20 * 600_000  # 22.5 micro-USD
    assert response["cost_pusd"] == expected
    assert (tokens.prompt_tokens, tokens.cached_tokens, tokens.total_tokens) == (100, 60, 120)
    assert (native_tokens.input_tokens, native_tokens.cached_tokens) == (100, 60)
    assert (native_tokens.output_tokens, native_tokens.reasoning_tokens) == (20, 5)
    assert native_cost.total_cost_pusd == expected


async def test_stream_usage_comes_from_the_final_chunk() -> None:
    rec, tokens = Recorder(), llmtally.TokenCounter()
    handler = LlmtallyCallbackHandler([rec, tokens])
    chunks = [c async for c in FakeChat().astream(QUESTION, config=config(handler))]
    assert "".join(str(c.content) for c in chunks) == REPLY
    names = rec.names()
    assert names[0] == "on_llm_start" and names[-1] == "on_llm_end"
    streamed = [args[0] for args, _ in rec.of("on_llm_stream_chunk")]
    assert "".join(streamed) == REPLY and len(streamed) == len(chunks) == CHUNKS
    (response,), kwargs = rec.of("on_llm_end")[0]
    assert (response["tokens_used"], response["estimated"]) == (120, False)
    assert response["chunks"] == CHUNKS and response["time_to_first_token"] > 0
    assert kwargs["ttft_ms"] > 0
    assert (tokens.requests, tokens.total_tokens) == (1, 120)  # once, not per chunk


@pytest.mark.parametrize("stream", [True, False])
async def test_a_run_without_usage_is_estimated_never_zero(stream: bool) -> None:
    rec = Recorder()
    handler = LlmtallyCallbackHandler([rec])
    native = TokenCountingCallback()
    model = FakeChat(usage=None)
    if stream:
        _ = [c async for c in model.astream(QUESTION, config=config(handler, native))]
    else:
        await model.ainvoke(QUESTION, config=config(handler, native))
    (response,), _ = rec.of("on_llm_end")[0]
    prompt = llmtally.estimate_tokens([{"role": "user", "content": QUESTION}], "gpt-4o-mini")
    completion = llmtally.estimate_tokens(REPLY, "gpt-4o-mini")
    assert response["estimated"] is True
    assert (response["prompt_tokens"], response["completion_tokens"]) == (prompt, completion)
    assert prompt > 0 and completion > 0
    assert (native.input_tokens, native.output_tokens) == (prompt, completion)
    assert native.estimated_requests == 1


class OlderChat(FakeChat):
    """Reports usage the pre-``usage_metadata`` way, in ``llm_output["token_usage"]``."""

    async def _agenerate(self, messages: list[BaseMessage], *args: Any, **kwargs: Any) -> Any:
        message = FakeChat(usage=None)._message()
        usage = {"prompt_tokens": 30, "completion_tokens": 7, "total_tokens": 37}
        return ChatResult(
            generations=[ChatGeneration(message=message)], llm_output={"token_usage": usage}
        )


async def test_older_models_usage_from_llm_output_token_usage() -> None:
    rec, native = Recorder(), TokenCountingCallback()
    await OlderChat().ainvoke(QUESTION, config=config(LlmtallyCallbackHandler([rec]), native))
    (response,), _ = rec.of("on_llm_end")[0]
    assert (response["prompt_tokens"], response["completion_tokens"]) == (30, 7)
    assert response["estimated"] is False
    assert (native.prompt_tokens, native.completion_tokens, native.total_tokens) == (30, 7, 37)


async def test_errors_and_timeouts_are_counted_and_reraised_by_langchain() -> None:
    rec, tokens = Recorder(), llmtally.TokenCounter()
    handler = LlmtallyCallbackHandler([rec, tokens])
    with pytest.raises(RuntimeError, match="provider down"):
        await FakeChat(fail=RuntimeError("provider down")).ainvoke(QUESTION, config=config(handler))
    with pytest.raises(TimeoutError):
        await FakeChat(fail=TimeoutError()).ainvoke(QUESTION, config=config(handler))
    errors = rec.of("on_llm_error")
    assert [type(args[0]) for args, _ in errors] == [RuntimeError, TimeoutError]
    assert errors[0][1]["request_id"] == errors[0][1]["run_id"]
    assert tokens.summary()["errors"] == 1 and tokens.summary()["timeouts"] == 1
    assert tokens.requests == 0
    health = await handler.manager.health()
    assert (health["llm_errors"], health["llm_timeouts"]) == (1, 1)
    assert handler.open_runs == 0


async def test_a_chain_gives_chain_and_llm_events_linked_by_langchain_run_ids() -> None:
    rec = Recorder()
    handler = LlmtallyCallbackHandler([rec], user_id="alice")
    chain = ChatPromptTemplate.from_messages([("user", "Capital of {country}?")]) | FakeChat()
    result = await chain.ainvoke({"country": "France"}, config=config(handler))
    assert result.content == REPLY
    assert rec.names() == [
        "on_chain_start",
        "on_chain_start",
        "on_chain_end",
        "on_llm_start",
        "on_llm_end",
        "on_chain_end",
    ]
    (seq_name,), seq = rec.of("on_chain_start")[0]
    (prompt_name,), prompt = rec.of("on_chain_start")[1]
    (messages,), llm = rec.of("on_llm_start")[0]
    assert (seq_name, prompt_name) == ("RunnableSequence", "ChatPromptTemplate")
    assert seq["parent_run_id"] is None
    assert prompt["parent_run_id"] == llm["parent_run_id"] == seq["run_id"]
    assert len({seq["run_id"], prompt["run_id"], llm["run_id"]}) == 3
    assert messages == [{"role": "user", "content": "Capital of France?"}]
    for _, _, kwargs in rec.events:
        assert kwargs["trace_id"] == seq["run_id"]
        assert kwargs["user_id"] == "alice"
    (outputs,), end = rec.of("on_chain_end")[-1]
    assert end["run_id"] == seq["run_id"] and outputs.content == REPLY


async def test_inside_an_llmtally_scope_the_langchain_root_becomes_its_child() -> None:
    rec = Recorder()
    manager = llmtally.CallbackManager([rec])
    handler = LlmtallyCallbackHandler(manager)
    chain = ChatPromptTemplate.from_messages([("user", "{q}")]) | FakeChat()
    async with manager.agent_run("answer", user_id="carol") as agent:
        await chain.ainvoke({"q": QUESTION}, config=config(handler))
    (_,), seq = rec.of("on_chain_start")[0]
    assert seq["parent_run_id"] == agent.run_id
    assert seq["user_id"] == "carol"
    assert rec.of("on_llm_end")[0][1]["user_id"] == "carol"


class Docs(BaseRetriever):
    def _get_relevant_documents(self, query: str, *, run_manager: Any) -> list[Document]:
        return [Document(page_content=f"about {query}")]


@tool
def capital(country: str) -> str:
    """The capital of a country."""
    if country == "Atlantis":
        raise ValueError("no such country")
    return "Paris"


async def test_tools_and_retrievers_map_to_tool_and_retrieval_events() -> None:
    rec = Recorder()
    handler = LlmtallyCallbackHandler([rec])
    assert await capital.ainvoke({"country": "France"}, config=config(handler)) == "Paris"
    with pytest.raises(ValueError, match="no such country"):
        await capital.ainvoke({"country": "Atlantis"}, config=config(handler))
    docs = await Docs().ainvoke("France", config=config(handler))
    assert rec.names() == [
        "on_tool_start",
        "on_tool_end",
        "on_tool_start",
        "on_tool_error",
        "on_retrieval_start",
        "on_retrieval_end",
    ]
    (name, args), start = rec.of("on_tool_start")[0]
    assert (name, args) == ("capital", {"country": "France"})
    (name, output), end = rec.of("on_tool_end")[0]
    assert name == "capital" and output == "Paris" and end["run_id"] == start["run_id"]
    (name, error), _ = rec.of("on_tool_error")[0]
    assert name == "capital" and isinstance(error, ValueError)
    assert rec.of("on_retrieval_start")[0][0] == ("France",)
    assert rec.of("on_retrieval_end")[0][0] == (docs,)


async def test_a_failing_llmtally_handler_never_breaks_the_langchain_call() -> None:
    failing, tokens = Failing(), llmtally.TokenCounter()
    handler = LlmtallyCallbackHandler([failing, tokens])
    result = await FakeChat().ainvoke(QUESTION, config=config(handler))
    assert result.content == REPLY
    assert failing.calls == 2 and tokens.total_tokens == 120
    assert (await handler.manager.health())["errors"] == 2
    # The adapter's own failure (a result it cannot read) is logged and counted too.
    run_id = uuid.uuid4()
    await handler.on_chat_model_start({}, [[]], run_id=run_id)
    await handler.on_llm_end(object(), run_id=run_id)  # type: ignore[arg-type]
    assert handler.errors == 1


async def test_a_callback_abort_at_the_start_stops_the_run_on_purpose() -> None:
    class Refuse(llmtally.AsyncCallbackHandler):
        async def on_llm_start(self, messages: Any, **kwargs: Any) -> None:
            raise CallbackAbort("over budget")

    tokens = llmtally.TokenCounter()
    handler = LlmtallyCallbackHandler([Refuse(), tokens])
    with pytest.raises(CallbackAbort, match="over budget"):
        await FakeChat().ainvoke(QUESTION, config=config(handler))
    assert tokens.requests == 0 and handler.open_runs == 0


async def test_the_run_metadata_user_id_is_charged() -> None:
    cost = llmtally.CostTracker()
    handler = LlmtallyCallbackHandler([cost], user_id="default")
    await FakeChat().ainvoke(QUESTION, config=config(handler, metadata={"user_id": "bob"}))
    await FakeChat().ainvoke(QUESTION, config=config(handler))
    by_user = cost.by_user()
    assert by_user["bob"]["cost_usd"] * 1e12 == pytest.approx(COST_PUSD)
    assert by_user["default"]["requests"] == 1


def test_sync_invoke_and_threads_count_exactly() -> None:
    tokens = llmtally.TokenCounter()
    handler = LlmtallyCallbackHandler([tokens])
    native = TokenCountingCallback()
    FakeChat().invoke(QUESTION, config=config(handler, native))
    # batch() runs the calls on a thread pool.
    FakeChat().batch([QUESTION] * 40, config=config(native))
    assert (tokens.requests, tokens.total_tokens) == (1, 120)
    assert (native.requests, native.total_tokens) == (41, 41 * 120)


# ---------------------------------------------------------------------------------------------
# LangChain-native callbacks


async def test_token_counting_callback_totals_and_per_model() -> None:
    counter = TokenCountingCallback()
    await FakeChat().ainvoke(QUESTION, config=config(counter))
    _ = [c async for c in FakeChat().astream(QUESTION, config=config(counter))]
    other: Any = {"input_tokens": 7, "output_tokens": 3, "total_tokens": 10}
    await FakeChat(model_name="claude-haiku-4-5", provider="anthropic", usage=other).ainvoke(
        QUESTION, config=config(counter)
    )
    assert isinstance(counter, BaseCallbackHandler)
    assert (counter.input_tokens, counter.output_tokens, counter.total_tokens) == (207, 43, 250)
    assert (counter.prompt_tokens, counter.completion_tokens) == (207, 43)
    by_model = counter.by_model()
    assert by_model["gpt-4o-mini"]["total_tokens"] == 240
    assert by_model["gpt-4o-mini"]["requests"] == 2
    assert by_model["claude-haiku-4-5"]["input_tokens"] == 7
    assert counter.provider_usage["anthropic"]["total_tokens"] == 10
    assert counter.summary()["requests"] == 3 and counter.callback_errors == 0


async def test_cost_tracking_callback_prices_from_the_table_and_counts_unpriced() -> None:
    alerts: list[dict[str, Any]] = []
    cost = CostTrackingCallback(budget_usd=0.00005, on_alert=alerts.append)
    await FakeChat().ainvoke(QUESTION, config=config(cost))
    assert alerts == []
    await FakeChat().ainvoke(QUESTION, config=config(cost))
    await FakeChat(model_name="in-house-model-x", provider="acme").ainvoke(
        QUESTION, config=config(cost)
    )
    assert cost.total_cost_pusd == 2 * COST_PUSD
    assert cost.total_cost == pytest.approx(54e-6)
    assert (cost.priced_requests, cost.unpriced_requests) == (2, 1)
    assert cost.unpriced_models == ["in-house-model-x"]
    assert cost.by_model()["gpt-4o-mini"]["cost_pusd"] == 2 * COST_PUSD
    assert cost.by_model()["in-house-model-x"]["total_tokens"] == 120
    assert cost.provider_costs == {"openai": pytest.approx(54e-6)}
    assert len(alerts) == 1 and alerts[0]["budget_usd"] == 0.00005


async def test_cost_tracking_callback_uses_registered_prices() -> None:
    llmtally.register_model("lc-test-model", input_price=1.0, output_price=2.0)
    cost = CostTrackingCallback()
    await FakeChat(model_name="lc-test-model", provider="acme").ainvoke(
        QUESTION, config=config(cost)
    )
    assert cost.total_cost_pusd == 100 * 1_000_000 + 20 * 2_000_000


async def test_performance_callback_latency_percentiles_and_throughput() -> None:
    perf = PerformanceCallback()
    for _ in range(5):
        await FakeChat().ainvoke(QUESTION, config=config(perf))
    _ = [c async for c in FakeChat().astream(QUESTION, config=config(perf))]
    with pytest.raises(RuntimeError):
        await FakeChat(fail=RuntimeError("x")).ainvoke(QUESTION, config=config(perf))
    stats = perf.stats()
    assert (stats["requests"], stats["errors"]) == (6, 1)
    assert 0 < stats["latency_p50_ms"] <= stats["latency_p95_ms"] <= stats["latency_p99_ms"]
    assert stats["ttft_p50_ms"] is not None  # the streamed run
    assert perf.requests_per_minute == 6
    assert perf.stats("gpt-4o-mini")["requests"] == 6
    assert perf.detect_regressions(perf.baseline()) == []


async def test_streaming_callback_aggregates_tokens_and_isolates_user_code() -> None:
    seen: list[str] = []
    summaries: list[dict[str, Any]] = []
    stream = StreamingCallback(on_token=seen.append, on_complete=summaries.append)
    _ = [c async for c in FakeChat().astream(QUESTION, config=config(stream))]
    assert "".join(seen) == REPLY and stream.chunks == CHUNKS
    (summary,) = summaries
    assert summary["text"] == REPLY and summary["chunks"] == CHUNKS
    assert 0 <= summary["ttft_ms"] <= summary["duration_ms"]
    assert summary["error"] is None

    def broken(token: str) -> None:
        raise RuntimeError("ui gone")

    flaky = StreamingCallback(on_token=broken)
    chunks = [c async for c in FakeChat().astream(QUESTION, config=config(flaky))]
    assert len(chunks) == CHUNKS and flaky.callback_errors == CHUNKS
    assert flaky.completed[-1]["text"] == REPLY

    with pytest.raises(RuntimeError, match="cut"):
        _ = [
            c
            async for c in FakeChat(fail=RuntimeError("cut")).astream(
                QUESTION, config=config(stream)
            )
        ]
    assert stream.stream_errors == 1
    assert stream.completed[-1]["error"] == "RuntimeError"
    assert stream.completed[-1]["text"] == REPLY  # what arrived before the failure


async def test_defect_analysis_callback_error_classes_and_rates_per_model() -> None:
    defects = DefectAnalysisCallback()
    await FakeChat().ainvoke(QUESTION, config=config(defects))
    for exc in (ValueError("bad"), ValueError("worse"), TimeoutError()):
        with pytest.raises(type(exc)):
            await FakeChat(fail=exc).ainvoke(QUESTION, config=config(defects))
    await FakeChat(model_name="other").ainvoke(QUESTION, config=config(defects))
    with pytest.raises(ValueError):
        await capital.ainvoke({"country": "Atlantis"}, config=config(defects))
    stats = defects.stats()
    assert stats["gpt-4o-mini"] == {
        "requests": 4,
        "errors": 2,
        "timeouts": 1,
        "error_rate": 0.75,
        "error_types": {"ValueError": 2, "TimeoutError": 1},
    }
    assert stats["other"]["error_rate"] == 0.0
    assert defects.error_rate() == 3 / 5
    assert defects.tool_errors == {"capital:ValueError": 1}


async def test_composite_callback_isolates_a_failing_child() -> None:
    class Broken(BaseCallbackHandler):
        def on_llm_end(self, response: Any, **kwargs: Any) -> None:
            raise RuntimeError("child bug")

    tokens, cost = TokenCountingCallback(), CostTrackingCallback()
    composite = CompositeCallback([Broken(), tokens, cost])
    handler_tokens = llmtally.TokenCounter()
    composite.add(LlmtallyCallbackHandler([handler_tokens]))  # an async child
    result = await FakeChat().ainvoke(QUESTION, config=config(composite))
    assert result.content == REPLY
    assert composite.errors == [1, 0, 0, 0]
    assert tokens.total_tokens == 120 and handler_tokens.total_tokens == 120
    assert cost.total_cost_pusd == COST_PUSD
    report = composite.report()
    assert report["TokenCountingCallback"]["total_tokens"] == 120
    assert report["CostTrackingCallback"]["priced_requests"] == 1
    composite.remove(tokens)
    await FakeChat().ainvoke(QUESTION, config=config(composite))
    assert tokens.total_tokens == 120 and cost.total_cost_pusd == 2 * COST_PUSD
    assert composite.errors == [2, 0, 0]


async def test_composite_callback_falls_back_to_on_llm_start_for_text_only_children() -> None:
    class TextOnly(BaseCallbackHandler):
        def __init__(self) -> None:
            self.prompts: list[str] = []

        def on_llm_start(self, serialized: Any, prompts: list[str], **kwargs: Any) -> None:
            self.prompts.extend(prompts)

    child = TextOnly()
    await FakeChat().ainvoke(QUESTION, config=config(CompositeCallback([child])))
    assert child.prompts == [f"Human: {QUESTION}"]


async def test_a_text_completion_batch_is_counted_once_with_the_providers_usage() -> None:
    """LangChain gives a batch's usage to its first run and an explicit empty token_usage to the
    others: that is zero, not unknown (estimating those runs over-counted the batch)."""
    from langchain_core.language_models.llms import BaseLLM
    from langchain_core.outputs import Generation, LLMResult

    class BatchLLM(BaseLLM):
        @property
        def _llm_type(self) -> str:
            return "batch"

        def _generate(self, prompts: list[str], *args: Any, **kwargs: Any) -> LLMResult:
            return LLMResult(
                generations=[[Generation(text=f"Answer number {i}.")] for i in range(len(prompts))],
                llm_output={
                    "token_usage": {"prompt_tokens": 300, "completion_tokens": 30},
                    "model_name": "gpt-3.5-turbo-instruct",
                },
            )

    tokens, native, rec = llmtally.TokenCounter(), TokenCountingCallback(), Recorder()
    prompts = ["What is the capital of France?", "And of Italy?", "And of Spain?"]
    await BatchLLM().agenerate(prompts, callbacks=[LlmtallyCallbackHandler([tokens, rec]), native])
    assert tokens.requests == 3
    assert (tokens.prompt_tokens, tokens.completion_tokens, tokens.total_tokens) == (300, 30, 330)
    assert [r["estimated"] for (r,), _ in rec.of("on_llm_end")] == [False] * 3
    assert (native.prompt_tokens, native.completion_tokens) == (300, 30)


# ---------------------------------------------------------------------------------------------
# The native callbacks are adapters over llmtally's trackers: the same numbers, the same caps.


async def test_native_callbacks_count_what_the_trackers_count_through_the_manager() -> None:
    tokens, cost = llmtally.TokenCounter(), llmtally.CostTracker()
    handler = LlmtallyCallbackHandler([tokens, cost])
    native_tokens, native_cost = TokenCountingCallback(), CostTrackingCallback()
    cache: Any = {
        "input_tokens": 100,
        "output_tokens": 20,
        "total_tokens": 120,
        "input_token_details": {"cache_read": 60},
        "output_token_details": {"reasoning": 5},
    }
    both = config(handler, native_tokens, native_cost)
    await FakeChat().ainvoke(QUESTION, config=both)
    await FakeChat(usage=cache).ainvoke(QUESTION, config=both)
    _ = [c async for c in FakeChat().astream(QUESTION, config=both)]
    await FakeChat(usage=None).ainvoke(QUESTION, config=both)  # estimated on both paths
    await FakeChat(model_name="in-house-model-x", provider="acme").ainvoke(QUESTION, config=both)
    with pytest.raises(TimeoutError):
        await FakeChat(fail=TimeoutError()).ainvoke(QUESTION, config=both)

    assert native_tokens.tracker.summary() == tokens.summary()
    assert native_tokens.summary()["requests"] == tokens.requests == 5
    assert native_tokens.estimated_requests == 1
    assert native_tokens.cached_tokens == 60 and native_tokens.reasoning_tokens == 5
    assert native_tokens.by_model()["gpt-4o-mini"]["timeouts"] == 1
    assert native_cost.total_cost_pusd == cost.total_cost_pusd
    assert native_cost.by_model() == cost.by_model()
    assert (native_cost.priced_requests, native_cost.unpriced_requests) == (4, 1)
    assert native_cost.unpriced_models == cost.unpriced_models == ["in-house-model-x"]
    # gpt-4o-mini: 40 uncached + 60 cached input, 20 output (the 5 reasoning inside).
    cached_pusd = 40 * 150_000 + 60 * 75_000 + 20 * 600_000
    estimated = cost.by_model()["gpt-4o-mini"]["cost_pusd"] - 2 * COST_PUSD - cached_pusd
    assert estimated > 0  # the estimated run is priced too, never 0
    assert native_cost.callback_errors == native_tokens.callback_errors == 0


async def test_native_callbacks_keep_memory_bounded_whatever_the_model_names() -> None:
    counter = TokenCountingCallback(max_keys=10)
    cost = CostTrackingCallback(max_keys=10)
    defects = DefectAnalysisCallback(max_keys=10)
    for i in range(25):
        await FakeChat(model_name=f"m{i}").ainvoke(QUESTION, config=config(counter, cost, defects))
    by_model = counter.by_model()
    assert len(by_model) == 11 and by_model["<other>"]["requests"] == 15
    assert counter.total_tokens == 25 * 120 and counter.tracker.overflowed == 15
    assert len(cost.by_model()) == 11 and cost.tracker.overflowed == 15
    assert sum(s["requests"] for s in defects.stats().values()) == 25
    assert defects.stats()["<other>"]["requests"] == 15


def test_a_native_callbacks_open_runs_are_bounded() -> None:
    from llmtally.integrations import langchain as lc

    counter = TokenCountingCallback()
    counter._starts.capacity = 3
    for _ in range(5):  # five starts whose end never comes
        counter.on_chat_model_start({}, [[]], run_id=uuid.uuid4())
    assert len(counter._starts) == 3 and counter._starts.evicted == 2
    assert lc.MAX_OPEN_RUNS == 100_000


async def test_a_streams_usage_reaches_the_call_chunk_by_chunk() -> None:
    rec, tokens = Recorder(), llmtally.TokenCounter()
    handler = LlmtallyCallbackHandler([rec, tokens])
    _ = [c async for c in FakeChat(split_usage=True).astream(QUESTION, config=config(handler))]
    assert (tokens.prompt_tokens, tokens.completion_tokens, tokens.total_tokens) == (100, 20, 120)

    # Abandoned after two chunks: the input reported on the first chunk is kept, the output
    # is the estimate of the two words received, and the call says so.
    stream = FakeChat(split_usage=True).astream(QUESTION, config=config(handler))
    async for i, _chunk in _enumerate(stream):
        if i == 1:
            break
    await stream.aclose()
    assert len(rec.of("on_llm_end")) == 2 and rec.of("on_llm_error") == []
    assert handler.open_runs == 0
    last_response = rec.of("on_llm_end")[-1][0][0]
    assert last_response["finish_reason"] == "abandoned" and last_response["estimated"] is True
    assert last_response["prompt_tokens"] == 100
    assert 0 < last_response["completion_tokens"] < 20


async def _enumerate(stream: Any) -> Any:
    i = 0
    async for item in stream:
        yield i, item
        i += 1
