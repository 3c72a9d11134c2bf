"""``llmtally bench``: a short B1 on this machine, next to LangChain when it is installed.

The same harness as ``benches/`` (see BENCHMARKS.md): sequential calls (start, a fake LLM that
returns at once, end) and 1,000 concurrent tasks whose fake LLM is ``await asyncio.sleep(0)``;
the added cost of a system is its per-call time minus the empty harness's, in the same run.
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any, TextIO

from llmtally.dispatch import CallbackManager
from llmtally.metering import RedisTokenCallbackHandler
from llmtally.storage import open_store
from llmtally.trackers import CostTracker, PerformanceTracker

__all__ = ["run_bench"]

Call = Callable[[], Awaitable[None]]
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
USAGE = {"prompt_tokens": 14, "completion_tokens": 7, "total_tokens": 21}


def _llmtally(concurrent: bool) -> Call:
    store = open_store("memory://")
    manager = CallbackManager(
        [RedisTokenCallbackHandler("alice", store=store), CostTracker(), PerformanceTracker()]
    )
    response = {"usage": USAGE}
    sleep = asyncio.sleep

    async def call() -> None:
        async with manager.llm_call(MESSAGES, provider="openai", model="gpt-4o") as c:
            if concurrent:
                await sleep(0)
            c.set_response(response)

    return call


def _langchain(concurrent: bool) -> Call | None:
    try:
        from langchain_core.callbacks import AsyncCallbackHandler, AsyncCallbackManager
        from langchain_core.outputs import Generation, LLMResult
    except ImportError:
        return None

    class Tokens(AsyncCallbackHandler):
        total = 0

        async def on_llm_end(self, response: LLMResult, **kwargs: Any) -> None:
            Tokens.total += (
                (response.llm_output or {}).get("token_usage", {}).get("total_tokens", 0)
            )

    class Cost(AsyncCallbackHandler):
        total = 0.0

        async def on_llm_end(self, response: LLMResult, **kwargs: Any) -> None:
            usage = (response.llm_output or {}).get("token_usage", {})
            Cost.total += (
                usage.get("prompt_tokens", 0) * 2.5e-6 + usage.get("completion_tokens", 0) * 1e-5
            )

    class Latency(AsyncCallbackHandler):
        def __init__(self) -> None:
            self.started: dict[Any, float] = {}

        async def on_llm_start(self, serialized: Any, prompts: Any, **kwargs: Any) -> None:
            self.started[kwargs.get("run_id")] = time.perf_counter()

        async def on_llm_end(self, response: LLMResult, **kwargs: Any) -> None:
            self.started.pop(kwargs.get("run_id"), None)

    manager = AsyncCallbackManager(handlers=[Tokens(), Cost(), Latency()])
    result = LLMResult(generations=[[Generation(text="Paris")]], llm_output={"token_usage": USAGE})
    prompts = [MESSAGES[0]["content"]]
    sleep = asyncio.sleep

    async def call() -> None:
        runs = await manager.on_llm_start({"name": "fake"}, prompts)
        if concurrent:
            await sleep(0)
        await runs[0].on_llm_end(result)

    return call


def _empty(concurrent: bool) -> Call:
    async def noop() -> None:
        return None

    return (lambda: asyncio.sleep(0)) if concurrent else noop


async def _sequential(call: Call, n: int, rounds: int) -> float:
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            await call()
        samples.append((time.perf_counter() - t0) / n)
    return statistics.median(samples)


async def _concurrent(call: Call, workers: int, per_worker: int) -> float:
    async def worker() -> None:
        for _ in range(per_worker):
            await call()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(workers)))
    return (time.perf_counter() - t0) / (workers * per_worker)


async def _measure(quick: bool) -> dict[str, dict[str, float]]:
    n, rounds, per_worker = (500, 5, 5) if quick else (2000, 11, 20)
    out: dict[str, dict[str, float]] = {}
    for name, make in (("empty", _empty), ("llmtally", _llmtally), ("langchain", _langchain)):
        seq, conc = make(False), make(True)
        if seq is None or conc is None:
            continue
        gc.collect()
        await _sequential(seq, n // 5, 1)  # warm-up
        out[name] = {
            "sequential": await _sequential(seq, n, rounds),
            "concurrent": await _concurrent(conc, 1000, per_worker),
        }
    return out


def run_bench(out: TextIO, *, quick: bool = False) -> int:
    """Measure and print the table; returns the exit status."""
    results = asyncio.run(_measure(quick))
    empty = results["empty"]
    out.write(
        "B1, one LLM call (start + end) with the metering set: a seed handler on the memory\n"
        "store, CostTracker, PerformanceTracker (LangChain: three equivalent async handlers)\n\n"
        f"  {'system':<10} {'added us/call':>14} {'calls/s at 1,000 tasks':>24}\n"
    )
    for name, r in results.items():
        if name == "empty":
            continue
        added = (r["sequential"] - empty["sequential"]) * 1e6
        out.write(f"  {name:<10} {added:>14.2f} {1 / r['concurrent']:>24,.0f}\n")
    out.write(f"  {'empty':<10} {'':>14} {1 / empty['concurrent']:>24,.0f}\n\n")
    if "langchain" in results:
        ours = results["llmtally"]["sequential"] - empty["sequential"]
        peer = results["langchain"]["sequential"] - empty["sequential"]
        ours_c = results["llmtally"]["concurrent"] - empty["concurrent"]
        peer_c = results["langchain"]["concurrent"] - empty["concurrent"]
        out.write(
            f"  llmtally's added cost is {peer / ours:.1f}x smaller than LangChain's"
            f" (sequential), {peer_c / ours_c:.1f}x at 1,000 concurrent tasks\n"
        )
    else:
        out.write("  (pip install langchain-core to see LangChain in the same run)\n")
    return 0
