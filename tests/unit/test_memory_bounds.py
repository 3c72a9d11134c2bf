"""Memory follows the caps, not the input: 50,000 model names and 200,000 users."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

import llmtally
from llmtally import CallbackManager, CostTracker, PerformanceTracker, TokenCounter


def test_trackers_stay_bounded_whatever_the_names() -> None:
    code = """
    import asyncio, json, resource
    import llmtally
    cost, tokens = llmtally.CostTracker(), llmtally.TokenCounter()
    perf = llmtally.PerformanceTracker()
    manager = llmtally.CallbackManager([cost, tokens, perf])
    response = {"usage": {"prompt_tokens": 3, "completion_tokens": 2}}
    def rss_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    async def main():
        before = rss_mb()
        for i in range(200_000):
            async with manager.llm_call(None, provider="openai", model=f"model-{i % 50_000}",
                                        user_id=f"user-{i}") as call:
                call.set_response(response)
        return rss_mb() - before
    grown = asyncio.run(main())
    print(json.dumps({
        "grown_mb": grown,
        "models": len(perf.models()),
        "cost_keys": len(cost._ledger),
        "tokens": tokens.total_tokens,
        "other": cost.by_user().get("<other>", {}).get("total_tokens", 0),
        "requests": perf.stats()["requests"],
    }))
    """
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    got = json.loads(out.stdout)
    assert got["models"] == 1_001  # 1,000 models apart, the rest in "<other>"
    assert got["cost_keys"] == 100_001  # 100,000 keys apart, one "<other>" per provider
    assert got["tokens"] == 1_000_000  # nothing lost: 200,000 calls of 5 tokens
    assert got["other"] == 500_000  # the calls past the cap, counted under "<other>"
    assert got["requests"] == 200_000
    # Uncapped, the per-model histograms alone took about 64 KiB x 50,000 = 3.2 GB.
    assert got["grown_mb"] < 400, got


async def test_a_long_model_name_is_not_kept_verbatim() -> None:
    cost, perf = CostTracker(), PerformanceTracker()
    manager = CallbackManager([cost, perf])
    async with manager.llm_call(None, provider="openai", model="m" * 100_000, user_id="a") as call:
        call.set_response({"usage": {"prompt_tokens": 3, "completion_tokens": 2}})
    assert list(cost.by_model()) == ["<other>"]
    assert perf.models() == ["<other>"]


def test_the_caps_are_checked() -> None:
    with pytest.raises(llmtally.ConfigError):
        TokenCounter(max_keys=0)
    with pytest.raises(llmtally.ConfigError):
        PerformanceTracker(max_models=True)  # type: ignore[arg-type]
