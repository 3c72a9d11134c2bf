"""Agent, tool, chain and retrieval scopes; nesting through run_id/parent_run_id."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import llmtally
from llmtally import CallbackManager

from helpers import MESSAGES, Recorder


async def test_nested_scopes_link_run_ids_and_share_the_trace() -> None:
    rec = Recorder()
    manager = CallbackManager([rec])
    async with manager.agent_run("book a flight", user_id="alice", trace_id="t-1") as agent:
        await agent.step({"action": "search"})
        async with manager.chain_run("planner") as chain:
            async with manager.retrieval("flights to Paris") as retrieval:
                retrieval.set_result(["doc1", "doc2"])
            async with manager.tool_call("search", {"q": "CDG"}) as tool:
                tool.set_result({"flights": 3})
            async with manager.llm_call(MESSAGES, model="gpt-4o") as call:
                call.set_response({"prompt_tokens": 5, "completion_tokens": 2})
            chain.set_result("plan")
        agent.set_result("booked")
    assert llmtally.current_run() is None
    by_event = {event: kwargs for event, _, kwargs in rec.events}
    assert rec.names() == [
        "on_agent_start",
        "on_agent_step",
        "on_chain_start",
        "on_retrieval_start",
        "on_retrieval_end",
        "on_tool_start",
        "on_tool_end",
        "on_llm_start",
        "on_llm_end",
        "on_chain_end",
        "on_agent_end",
    ]
    agent_kw, chain_kw = by_event["on_agent_start"], by_event["on_chain_start"]
    assert agent_kw["parent_run_id"] is None
    assert chain_kw["parent_run_id"] == agent.run_id == agent_kw["run_id"]
    for event in ("on_retrieval_start", "on_tool_start", "on_llm_start"):
        assert by_event[event]["parent_run_id"] == chain.run_id
    for _, _, kwargs in rec.events:
        assert kwargs["trace_id"] == "t-1"
        assert kwargs["user_id"] == "alice"  # inherited from the agent run
    assert by_event["on_llm_end"]["run_id"] == call.run_id
    assert rec.of("on_agent_step")[0][0] == ({"action": "search"},)
    assert rec.of("on_tool_start")[0][0] == ("search", {"q": "CDG"})
    assert rec.of("on_tool_end")[0][0] == ("search", {"flights": 3})
    assert rec.of("on_retrieval_end")[0][0] == (["doc1", "doc2"],)
    assert rec.of("on_chain_end")[0][0] == ("plan",)
    assert rec.of("on_agent_end")[0][0] == ("booked",)


async def test_inner_context_overrides_inherited_values() -> None:
    rec = Recorder()
    manager = CallbackManager([rec])
    async with manager.agent_run("g", user_id="alice"):
        async with manager.llm_call(MESSAGES, user_id="bob"):
            pass
    assert rec.of("on_llm_start")[0][1]["user_id"] == "bob"


@pytest.mark.parametrize(
    ("opener", "error_event", "prefix"),
    [
        (lambda m: m.agent_run("g"), "on_agent_error", ()),
        (lambda m: m.chain_run("c"), "on_chain_error", ()),
        (lambda m: m.tool_call("t", {}), "on_tool_error", ("t",)),
        (lambda m: m.retrieval("q"), "on_retrieval_error", ()),
    ],
)
async def test_scope_errors_fire_and_reraise(
    opener: Any, error_event: str, prefix: tuple[str, ...]
) -> None:
    rec = Recorder()
    manager = CallbackManager([rec])
    boom = ValueError("x")
    with pytest.raises(ValueError):
        async with opener(manager):
            raise boom
    args, _ = rec.of(error_event)[0]
    assert args == (*prefix, boom)
    assert len(rec.events) == 2


async def test_concurrent_tasks_keep_their_own_context() -> None:
    rec = Recorder()
    manager = CallbackManager([rec])

    async def user_flow(user: str) -> None:
        async with manager.agent_run("g", user_id=user):
            await asyncio.sleep(0.001)
            async with manager.llm_call(MESSAGES):
                await asyncio.sleep(0)

    await asyncio.gather(*(user_flow(f"u{i}") for i in range(20)))
    agents = {kw["run_id"]: kw["user_id"] for _, kw in rec.of("on_agent_start")}
    llm_starts = rec.of("on_llm_start")
    assert len(llm_starts) == 20
    for _, kwargs in llm_starts:
        assert agents[kwargs["parent_run_id"]] == kwargs["user_id"]


async def test_abort_in_scope_start_propagates() -> None:
    class Refuse(llmtally.AsyncCallbackHandler):
        async def on_tool_start(self, tool_name: str, args: Any, **kwargs: Any) -> None:
            raise llmtally.CallbackAbort("tool not allowed")

    seen = Recorder()
    manager = CallbackManager([seen, Refuse()])
    with pytest.raises(llmtally.CallbackAbort):
        async with manager.tool_call("rm", {"path": "/"}):
            pytest.fail("the tool must not run")
    assert llmtally.current_run() is None
    # The handler that saw the start hears of the refusal (as it would for an LLM call).
    assert len(seen.of("on_tool_start")) == 1
    (((tool_name, error), kwargs),) = seen.of("on_tool_error")
    assert tool_name == "rm" and isinstance(error, llmtally.CallbackAbort)
    assert kwargs["aborted"] is True


async def test_llm_call_keeps_a_framework_given_run_id_and_parent_run_id() -> None:
    rec = Recorder()
    manager = CallbackManager([rec])
    async with manager.llm_call(
        MESSAGES, request_id="lc-run", run_id="lc-run", parent_run_id="lc-chain"
    ) as call:
        call.set_response({"prompt_tokens": 5, "completion_tokens": 2})
    assert call.run_id == "lc-run"
    for _, _, kwargs in rec.events:
        assert (kwargs["run_id"], kwargs["parent_run_id"]) == ("lc-run", "lc-chain")
    # Inside an llmtally scope, a given parent still wins; without one, the scope is the parent.
    async with manager.chain_run("outer") as chain:
        async with manager.llm_call(MESSAGES, parent_run_id="p", run_id="r") as inner:
            inner.set_response({"prompt_tokens": 1, "completion_tokens": 1})
        async with manager.llm_call(MESSAGES) as plain:
            plain.set_response({"prompt_tokens": 1, "completion_tokens": 1})
    ends = [k for _, k in rec.of("on_llm_end")]
    assert (ends[1]["run_id"], ends[1]["parent_run_id"]) == ("r", "p")
    assert ends[2]["parent_run_id"] == chain.run_id
    assert ends[2]["run_id"] == plain.run_id == plain.request_id
