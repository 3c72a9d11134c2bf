"""CompositeCallbackHandler and create_composite_callback (the seed API)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import llmtally
from llmtally import CallbackManager, CompositeCallbackHandler, create_composite_callback

from helpers import MESSAGES, Failing, Recorder


async def test_composite_used_directly_fans_out_and_isolates() -> None:
    a, b = Recorder("a"), Recorder("b")
    composite = create_composite_callback(a, Failing(), b)
    assert isinstance(composite, CompositeCallbackHandler)
    await composite.on_llm_start(MESSAGES, user_id="u")
    await composite.on_llm_end({"tokens_used": 3}, user_id="u")
    await composite.on_llm_error(RuntimeError("x"))
    for rec in (a, b):
        assert rec.names() == ["on_llm_start", "on_llm_end", "on_llm_error"]
    assert composite._dispatch_stats() == (2, 0)


@pytest.mark.parametrize(("parallel", "stuck"), [(True, 0), (False, 1)])
async def test_composite_runs_children_concurrently_by_default(parallel: bool, stuck: int) -> None:
    started = 0
    both = asyncio.Event()

    class Waits(llmtally.AsyncCallbackHandler):
        """Waits until both children have started: only concurrent children both get there."""

        async def on_llm_end(self, response: Any, **kwargs: Any) -> None:
            nonlocal started
            started += 1
            if started == 2:
                both.set()
            await asyncio.wait_for(both.wait(), 0.2)

    composite = CompositeCallbackHandler([Waits(), Waits()], parallel=parallel)
    await composite.on_llm_end({})
    assert started == 2
    # Sequentially, the first child gives up waiting (an isolated error) before the second runs.
    assert composite._dispatch_stats() == (stuck, 0)


async def test_add_and_remove_children() -> None:
    a, b = Recorder("a"), Recorder("b")
    composite = CompositeCallbackHandler([a])
    composite.add_handler(b)
    assert composite.handlers == [a, b]
    composite.remove_handler(a)
    await composite.on_chain_start("c")
    assert a.events == [] and b.names() == ["on_chain_start"]


async def test_composite_inside_a_manager_reports_child_errors_in_health() -> None:
    rec = Recorder()
    manager = CallbackManager([create_composite_callback(rec, Failing())])
    async with manager.llm_call(MESSAGES) as call:
        call.set_response({"tokens_used": 4})
    assert rec.names() == ["on_llm_start", "on_llm_end"]
    health = await manager.health()
    assert health["errors"] == 2
    assert health["per_handler"] == [
        {"name": "CompositeCallbackHandler", "errors": 2, "timeouts": 0}
    ]


async def test_abort_from_a_child_passes_through_the_composite() -> None:
    class Stop(llmtally.AsyncCallbackHandler):
        async def on_llm_start(self, messages: Any, **kwargs: Any) -> None:
            raise llmtally.BudgetExceeded(user_id="u", limit=1, used=1, requested=1)

    with pytest.raises(llmtally.BudgetExceeded):
        async with CallbackManager([create_composite_callback(Stop())]).llm_call(MESSAGES):
            pass
