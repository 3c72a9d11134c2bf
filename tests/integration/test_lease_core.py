"""The core's admission and settlement of a user budget in tokens (``_core.LeaseBook``): the
path every call of the common limiter takes. Same numbers as the Python path, on every store:
the reservation of a call without ``estimated_tokens`` is the estimate of its messages plus
``max_tokens``, a budget admits exactly what fits, and a call that ended is settled before any
step reads the lease (so ``remaining()`` never shows its estimate held)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from llmtally import BudgetExceeded, CallbackManager, UsageRecorder, estimate_tokens, open_store
from llmtally.limits import BudgetLimiter, _estimate
from llmtally.storage.keys import current_cycle, usage_key

#: Store timeout of limiters in tests about numbers (see test_budget_overshoot.py).
PATIENT_S = 10.0
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France? Answer in one word."},
]


@pytest.mark.parametrize(
    ("model", "max_tokens"),
    [
        ("gpt-4o", 100),  # o200k
        ("openai/GPT-5-mini", None),  # o200k: provider prefix and case ignored
        ("gpt-3.5-turbo", 7),  # cl100k
        ("claude-sonnet-4-5", 10**13),  # not a usable max_tokens: not added
        ("unknown", True),  # a bool is not a count
        (None, -1),
    ],
)
async def test_the_core_reserves_what_the_python_path_computes(
    model: str | None, max_tokens: Any
) -> None:
    async with open_store("memory://") as store:
        limiter = BudgetLimiter(max_tokens=10**9, store=store, store_timeout_s=PATIENT_S)
        manager = CallbackManager([UsageRecorder(store=store), limiter])
        context: dict[str, Any] = {"user_id": "alice", "max_tokens": max_tokens}
        if model is not None:
            context["model"] = model
        expected = _estimate(MESSAGES, context)[0]
        prompt = estimate_tokens(MESSAGES, model if model != "unknown" else None)
        assert expected == prompt + (max_tokens if max_tokens in (100, 7) else 0)
        for _ in range(3):  # the first call takes the lease (Python), the others: the core
            async with manager.llm_call(MESSAGES, **context) as call:
                (held,) = limiter._open.values()
                assert held[1] == expected
                call.set_response({"prompt_tokens": 5, "completion_tokens": 1})
        assert limiter._book.admitted == 2
        assert limiter.allowed == 3


async def test_calls_without_an_estimate_admit_exactly_the_limit(store_url: str) -> None:
    per_call = estimate_tokens(MESSAGES, "gpt-4o") + 20
    async with open_store(store_url) as store:
        limiter = BudgetLimiter(max_tokens=250 * per_call, store=store, store_timeout_s=PATIENT_S)
        manager = CallbackManager([UsageRecorder(store=store), limiter])
        admitted = 0

        async def task() -> None:
            nonlocal admitted
            while True:
                try:
                    async with manager.llm_call(
                        MESSAGES, model="gpt-4o", user_id="bob", max_tokens=20
                    ) as call:
                        await asyncio.sleep(0.001)
                        call.set_response({"prompt_tokens": per_call - 20, "completion_tokens": 20})
                except BudgetExceeded:
                    return
                admitted += 1

        async with asyncio.timeout(60):
            await asyncio.gather(*(task() for _ in range(10)))
        assert admitted == 250
        assert limiter._book.admitted > 0  # the core admitted some of them
        await limiter.aclose()
        await store.flush()
        fields = store.backend.read(usage_key("bob", current_cycle()))
        assert (fields["total_tokens"], fields["calls"]) == (250 * per_call, 250)
        assert fields.get("reserved_tokens", 0) == 0


async def test_an_ended_call_is_settled_before_remaining_reads_it(store_url: str) -> None:
    async with open_store(store_url) as store:
        limiter = BudgetLimiter(max_tokens=10_000, store=store, store_timeout_s=PATIENT_S)
        manager = CallbackManager([UsageRecorder(store=store), limiter])
        for _ in range(3):
            async with manager.llm_call(MESSAGES, user_id="carol", estimated_tokens=500) as call:
                call.set_response({"prompt_tokens": 30, "completion_tokens": 10})
        assert limiter._book.admitted == 2
        left = await limiter.remaining("carol")
        assert (left["used"], left["reserved"], left["remaining"]) == (120, 0, 10_000 - 120)
        # A call in flight is held at its estimate.
        async with manager.llm_call(MESSAGES, user_id="carol", estimated_tokens=500) as call:
            left = await limiter.remaining("carol")
            assert (left["used"], left["reserved"], left["remaining"]) == (120, 500, 9380)
            call.set_response({"prompt_tokens": 1, "completion_tokens": 1})
        left = await limiter.remaining("carol")
        assert (left["used"], left["reserved"], left["remaining"]) == (122, 0, 9878)


async def test_a_full_budget_refuses_in_the_core_path_too(store_url: str) -> None:
    """Usage above the estimate (the core settles it in a batch): the next call that would
    pass the limit is refused, counting the usage of every call that ended."""
    async with open_store(store_url) as store:
        limiter = BudgetLimiter(max_tokens=1000, store=store, store_timeout_s=PATIENT_S)
        manager = CallbackManager([UsageRecorder(store=store), limiter])
        for _ in range(4):  # 4 x 200 used on estimates of 100
            async with manager.llm_call(MESSAGES, user_id="dave", estimated_tokens=100) as call:
                call.set_response({"prompt_tokens": 200, "completion_tokens": 0})
        # 800 used: 200 left; an estimate of 150 fits, one of 250 does not.
        with pytest.raises(BudgetExceeded):
            async with manager.llm_call(MESSAGES, user_id="dave", estimated_tokens=250):
                pass
        async with manager.llm_call(MESSAGES, user_id="dave", estimated_tokens=150) as call:
            call.set_response({"prompt_tokens": 150, "completion_tokens": 0})
        left = await limiter.remaining("dave")
        assert (left["used"], left["reserved"], left["remaining"]) == (950, 0, 50)
