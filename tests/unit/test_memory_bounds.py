"""Memory follows the caps, not the input: 50,000 model names and 200,000 users, long ids.

Each scenario runs in a fresh interpreter and reports how much its resident memory grew (peak
RSS, so nothing freed in between hides). Uncapped, the same input took gigabytes: about 64 KiB of
histograms per model (50,000 models: 3.2 GB) and every (provider, model, user) key and id kept
verbatim, several times over.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any

import pytest

import llmtally
from llmtally import CallbackManager, CostTracker, PerformanceTracker, TokenCounter

PRELUDE = """
import asyncio, json, logging, resource
import llmtally
logging.disable(logging.CRITICAL)  # one warning per unpriced model is not what is measured
def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
response = {"usage": {"prompt_tokens": 3, "completion_tokens": 2}}
"""


def run(code: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    got: dict[str, Any] = json.loads(out.stdout)
    return got


def test_trackers_stay_bounded_whatever_the_names() -> None:
    got = run(
        """
        cost, tokens = llmtally.CostTracker(), llmtally.TokenCounter()
        perf = llmtally.PerformanceTracker()
        manager = llmtally.CallbackManager([cost, tokens, perf])
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
            "perf_overflowed": perf.overflowed,
            "cost_keys": len(cost._ledger),
            "overflowed": cost.overflowed,
            "tokens": tokens.total_tokens,
            "other": cost.by_user().get("<other>", {}).get("total_tokens", 0),
            "requests": perf.stats()["requests"],
        }))
        """
    )
    assert got["models"] == 1_001  # 1,000 models apart, the rest in "<other>"
    # Every call of a model past the cap (models 0-999 come back every 50,000 calls).
    assert got["perf_overflowed"] == 200_000 - 4 * 1_000
    assert got["cost_keys"] == 100_001  # 100,000 keys apart, one (openai, <other>, <other>)
    assert got["overflowed"] == 100_000
    assert got["tokens"] == 1_000_000  # nothing lost: 200,000 calls of 5 tokens
    assert got["other"] == 500_000  # the calls past the cap, counted under "<other>"
    assert got["requests"] == 200_000
    # 1,001 models x 64 KiB + 2 x 100,001 keys of ~450 B: about 155 MB (uncapped: 3.2 GB and
    # more).
    assert got["grown_mb"] < 250, got


def test_long_user_ids_are_bounded_in_bytes() -> None:
    """10,000 distinct 16 KiB user ids (each within the identity rule's 64 KiB): the trackers
    stop keeping new ones apart at their byte cap."""
    got = run(
        """
        cost, tokens = llmtally.CostTracker(), llmtally.TokenCounter()
        manager = llmtally.CallbackManager([cost, tokens, llmtally.PerformanceTracker()])
        async def main():
            before = rss_mb()
            for i in range(10_000):
                user = str(i).rjust(16 * 1024, "u")
                async with manager.llm_call(None, provider="openai", model="gpt-4o",
                                            user_id=user) as call:
                    call.set_response(response)
            return rss_mb() - before
        grown = asyncio.run(main())
        print(json.dumps({
            "grown_mb": grown,
            "cost_keys": len(cost._ledger),
            "overflowed": cost.overflowed,
            "tokens": tokens.total_tokens,
            "bytes": cost._table.bytes,
        }))
        """
    )
    assert got["tokens"] == 50_000  # every token counted
    assert got["bytes"] <= CostTracker().max_bytes == 48 * 1024 * 1024
    assert 2_900 < got["cost_keys"] < 3_000  # 48 MiB / ~16.6 KiB an entry
    assert got["overflowed"] == 10_000 - got["cost_keys"] + 1
    # The two trackers share the ids they keep: about 49 MB. Uncapped, they kept every id
    # (1.1 GB here).
    assert got["grown_mb"] < 150, got


async def test_long_ids_are_not_cached() -> None:
    store = llmtally.open_store("memory://")
    recorder = llmtally.UsageRecorder(store=store)
    manager = CallbackManager([recorder])
    for i in range(50):
        user = str(i).rjust(1024, "u") if i % 2 else f"user-{i}"
        async with manager.llm_call(None, model="gpt-4o", user_id=user) as call:
            call.set_response({"usage": {"prompt_tokens": 3, "completion_tokens": 2}})
        await recorder.on_llm_end({"tokens_used": 1}, model="gpt-4o", user_id=user)
    assert sorted(recorder._keys) == sorted(f"user-{i}" for i in range(0, 50, 2))
    await store.aclose()


async def test_a_long_model_name_is_not_kept_verbatim() -> None:
    cost, perf = CostTracker(), PerformanceTracker()
    manager = CallbackManager([cost, perf])
    async with manager.llm_call(None, provider="openai", model="m" * 100_000, user_id="a") as call:
        call.set_response({"usage": {"prompt_tokens": 3, "completion_tokens": 2}})
    assert list(cost.by_model()) == ["<other>"]
    assert perf.models() == ["<other>"]


def test_the_price_lookups_of_long_model_names_are_bounded() -> None:
    """2,000 distinct 64 KiB model names through the manager: the price table neither caches
    nor keeps them by name (unpriced, counted under "<other>"); uncapped, 125 MB stayed."""
    got = run(
        """
        from llmtally import pricing
        manager = llmtally.CallbackManager([llmtally.CostTracker()])
        async def main():
            before = rss_mb()
            for i in range(2_000):
                model = str(i).rjust(64 * 1024, "m")
                async with manager.llm_call(None, provider="openai", model=model) as call:
                    call.set_response(response)
            return rss_mb() - before
        grown = asyncio.run(main())
        print(json.dumps({
            "grown_mb": grown,
            "cached": len(pricing._cache),
            "unpriced": pricing.unpriced_models(),
        }))
        """
    )
    assert got["unpriced"] == {"<other>": 2_000}
    assert got["cached"] < 10
    assert got["grown_mb"] < 30, got


async def test_the_caps_are_configurable() -> None:
    cost, perf = CostTracker(max_keys=2), PerformanceTracker(max_models=1)
    manager = CallbackManager([cost, perf])
    for user in ("a", "b", "c", "d"):
        async with manager.llm_call(None, provider="openai", model=user, user_id=user) as call:
            call.set_response({"usage": {"prompt_tokens": 3, "completion_tokens": 2}})
    assert sorted(cost.by_user()) == ["<other>", "a", "b"]
    assert cost.by_user()["<other>"]["total_tokens"] == 10
    assert cost.overflowed == 2
    assert cost.summary()["total_tokens"] == 20
    assert perf.models() == ["<other>", "a"]
    assert perf.overflowed == 3
    small = TokenCounter(max_bytes=1)  # no room for any key: everything in "<other>"
    small_manager = CallbackManager([small])
    async with small_manager.llm_call(None, model="gpt-4o", user_id="a") as call:
        call.set_response({"usage": {"prompt_tokens": 3, "completion_tokens": 2}})
    assert list(small.by_model()) == ["<other>"] and small.total_tokens == 5


@pytest.mark.parametrize(
    "make",
    [
        lambda: TokenCounter(max_keys=0),
        lambda: CostTracker(max_bytes=-1),
        lambda: CostTracker(max_keys=1.5),
        lambda: PerformanceTracker(max_models=True),
    ],
)
def test_the_caps_are_checked(make: Any) -> None:
    with pytest.raises(llmtally.ConfigError):
        make()
