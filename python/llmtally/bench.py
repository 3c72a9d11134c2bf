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

__all__ = ["langchain_metering_set", "llmtally_metering_set", "run_bench"]

Call = Callable[[], Awaitable[None]]
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
USAGE = {"prompt_tokens": 14, "completion_tokens": 7, "total_tokens": 21}


class Counts:
    """What a system counted, so a benchmark can check its figures are for exact work."""

    def __init__(self, calls: Callable[[], int], tokens: Callable[[], int]) -> None:
        self._calls, self._tokens = calls, tokens

    @property
    def calls(self) -> int:
        return self._calls()

    @property
    def tokens(self) -> int:
        return self._tokens()


def llmtally_metering_set(concurrent: bool) -> tuple[Call, Counts]:
    """B1's metering set: a seed handler on the memory store, CostTracker, PerformanceTracker."""
    store = open_store("memory://")
    cost = CostTracker()
    manager = CallbackManager(
        [RedisTokenCallbackHandler("alice", store=store), cost, PerformanceTracker()]
    )
    response = {"usage": dict(USAGE, cost=0.000105)}
    sleep = asyncio.sleep

    async def call() -> None:
        async with manager.llm_call(MESSAGES, provider="openai", model="gpt-4o") as c:
            if concurrent:
                await sleep(0)
            c.set_response(response)

    return call, Counts(lambda: cost.request_count, lambda: cost.total_tokens)


def langchain_metering_set(concurrent: bool) -> tuple[Call, Counts] | None:
    """The same work through LangChain's ``AsyncCallbackManager``: token, cost and latency
    handlers (``None`` without langchain-core)."""
    try:
        from langchain_core.callbacks import AsyncCallbackHandler, AsyncCallbackManager
        from langchain_core.outputs import Generation, LLMResult
    except ImportError:
        return None

    class Tokens(AsyncCallbackHandler):
        def __init__(self) -> None:
            self.tokens = 0
            self.calls = 0

        async def on_llm_end(self, response: LLMResult, **kwargs: Any) -> None:
            usage = (response.llm_output or {}).get("token_usage", {})
            self.tokens += usage.get("total_tokens", 0)
            self.calls += 1

    class Cost(AsyncCallbackHandler):
        def __init__(self) -> None:
            self.total = 0.0

        async def on_llm_end(self, response: LLMResult, **kwargs: Any) -> None:
            usage = (response.llm_output or {}).get("token_usage", {})
            self.total += (
                usage.get("prompt_tokens", 0) * 2.5e-6 + usage.get("completion_tokens", 0) * 1e-5
            )

    class Latency(AsyncCallbackHandler):
        def __init__(self) -> None:
            self.started: dict[Any, float] = {}
            self.samples: list[float] = []

        async def on_llm_start(self, serialized: Any, prompts: Any, **kwargs: Any) -> None:
            self.started[kwargs.get("run_id")] = time.perf_counter()

        async def on_llm_end(self, response: LLMResult, **kwargs: Any) -> None:
            t0 = self.started.pop(kwargs.get("run_id"), None)
            if t0 is not None:
                self.samples.append(time.perf_counter() - t0)

    tokens = Tokens()
    manager = AsyncCallbackManager(handlers=[tokens, Cost(), Latency()])
    result = LLMResult(generations=[[Generation(text="Paris")]], llm_output={"token_usage": USAGE})
    prompts = [MESSAGES[0]["content"]]
    sleep = asyncio.sleep

    async def call() -> None:
        runs = await manager.on_llm_start({"name": "fake"}, prompts)
        if concurrent:
            await sleep(0)
        await runs[0].on_llm_end(result)

    return call, Counts(lambda: tokens.calls, lambda: tokens.tokens)


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
    systems: tuple[tuple[str, Callable[[bool], Any]], ...] = (
        ("empty", lambda concurrent: (_empty(concurrent), None)),
        ("llmtally", llmtally_metering_set),
        ("langchain", langchain_metering_set),
    )
    for name, make in systems:
        made_seq, made_conc = make(False), make(True)
        if made_seq is None or made_conc is None:
            continue
        seq, conc = made_seq[0], made_conc[0]
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
    from llmtally._observe import state

    if state.on:
        out.write(
            "  Prometheus metrics were on (every handler execution timed and counted);"
            " LLMTALLY_METRICS=0 measures without them\n"
        )
    return 0
