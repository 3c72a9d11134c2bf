"""B4: the cost of one call (price lookup + cost with cached and reasoning tokens), next to
LiteLLM's ``cost_per_token`` for the same usage (skipped when litellm is not installed).

pytest benches/bench_pricing.py --benchmark-only --benchmark-group-by group

Target: at most 1 us per call, at least 100x faster than LiteLLM. A LiteLLM round runs 100 calls,
an llmtally round 10,000; the per-call times and their ratio are printed at the end.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from llmtally import pricing
from llmtally._core import Usage

from results import record

OPS = 10_000
MODEL, PROVIDER = "gpt-4o-2024-08-06", "openai"
PROMPT, COMPLETION, CACHED, REASONING = 1200, 300, 1024, 256


@pytest.mark.benchmark(group="pricing-cost-per-call")
@pytest.mark.parametrize("impl", ["llmtally", "litellm"])
def test_cost_of_one_call(benchmark: Any, impl: str) -> None:
    """Resolve the model's price and cost one normalized usage record."""
    if impl == "llmtally":
        usages = [
            Usage(
                prompt_tokens=PROMPT + i,
                completion_tokens=COMPLETION,
                cached_tokens=CACHED,
                reasoning_tokens=REASONING,
            )
            for i in range(7)
        ]
        lookup = pricing.lookup
        expected = pricing.cost_pusd(usages[0], MODEL, PROVIDER)
        assert expected == (PROMPT - CACHED) * 2_500_000 + CACHED * 1_250_000 + COMPLETION * 10**7

        def run() -> None:
            for i in range(OPS):
                lookup(MODEL, PROVIDER).usage_cost_pusd(usages[i % 7])  # type: ignore[union-attr]

    else:
        os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network
        litellm = pytest.importorskip("litellm")
        from litellm.types.utils import (
            CompletionTokensDetailsWrapper,
            PromptTokensDetailsWrapper,
        )
        from litellm.types.utils import Usage as LiteUsage

        usages = [
            LiteUsage(
                prompt_tokens=PROMPT + i,
                completion_tokens=COMPLETION,
                total_tokens=PROMPT + i + COMPLETION,
                prompt_tokens_details=PromptTokensDetailsWrapper(cached_tokens=CACHED),
                completion_tokens_details=CompletionTokensDetailsWrapper(
                    reasoning_tokens=REASONING
                ),
            )
            for i in range(7)
        ]
        cost_per_token = litellm.cost_per_token
        prompt_usd, completion_usd = cost_per_token(
            model=MODEL, custom_llm_provider=PROVIDER, usage_object=usages[0]
        )
        ours = pricing.cost_usd(
            Usage(
                prompt_tokens=PROMPT,
                completion_tokens=COMPLETION,
                cached_tokens=CACHED,
                reasoning_tokens=REASONING,
            ),
            MODEL,
            PROVIDER,
        )
        assert prompt_usd + completion_usd == pytest.approx(ours)  # the same work

        def run() -> None:
            for i in range(OPS // 100):
                cost_per_token(
                    model=MODEL, custom_llm_provider=PROVIDER, usage_object=usages[i % 7]
                )

    benchmark.pedantic(run, rounds=10, iterations=1, warmup_rounds=1)
    ops = OPS if impl == "llmtally" else OPS // 100
    record("pricing-cost-per-call", impl, benchmark.stats.stats.median / ops)
