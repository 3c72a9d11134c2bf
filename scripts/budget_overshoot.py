"""The overshoot scenarios of issue 14 as a table: calls admitted against a budget of 1,000 tokens
by calls whose usage equals their estimate of 10 tokens (room for exactly 100).

Each task calls until it is refused once (the fake LLM takes 2 ms: the 100 calls span many
flush intervals); the
usage is counted by a ``UsageRecorder`` next to the limiter. Two processes: the same, 50 tasks
each, at once, on one store.

    python scripts/budget_overshoot.py [--redis redis://127.0.0.1:6379/0] [--llm-ms 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CYCLE = "2026-11-01"
# The fake LLM's latency (ms, ``--llm-ms``): the calls span many flush intervals.
LLM_S = float(os.environ.get("BUDGET_OVERSHOOT_LLM_MS", "2")) / 1000


async def run(url: str, tasks: int, reset: bool = True) -> tuple[int, int]:
    from llmtally import BudgetExceeded, CallbackManager, UsageRecorder, open_store
    from llmtally.limits import BudgetLimiter
    from llmtally.storage.keys import usage_key

    async with open_store(url) as store:
        if reset:
            await store.delete(usage_key("alice", CYCLE))
        limiter = BudgetLimiter(max_tokens=1000, store=store)
        manager = CallbackManager([UsageRecorder(store=store), limiter])
        admitted = 0

        async def task() -> None:
            nonlocal admitted
            while True:
                try:
                    async with manager.llm_call(
                        [{"role": "user", "content": "hi"}],
                        user_id="alice",
                        cycle_start_date=CYCLE,
                        estimated_tokens=10,
                    ) as call:
                        await asyncio.sleep(LLM_S)
                        call.set_response({"prompt_tokens": 10, "completion_tokens": 0})
                except BudgetExceeded:
                    return
                admitted += 1

        await asyncio.gather(*(task() for _ in range(tasks)))
        await limiter.aclose()
        await store.flush()
        stored = store.backend.read(usage_key("alice", CYCLE)).get("total_tokens", 0)
    return admitted, stored


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--redis", default=None)
    parser.add_argument("--llm-ms", type=float, default=None, help="fake LLM latency (2)")
    parser.add_argument("--child", nargs=2, metavar=("URL", "TASKS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.llm_ms is not None:
        global LLM_S
        LLM_S = args.llm_ms / 1000
        os.environ["BUDGET_OVERSHOOT_LLM_MS"] = str(args.llm_ms)  # for the child processes
    if args.child:
        admitted, _ = asyncio.run(run(args.child[0], int(args.child[1]), reset=False))
        print(json.dumps(admitted))
        return
    tmp = Path(tempfile.mkdtemp())
    stores = {"memory": "memory://", "sqlite": f"sqlite:///{tmp}/usage.db"}
    if args.redis:
        stores["redis"] = args.redis
    print("| store | scenario | calls admitted | tokens stored | limit |")
    print("|---|---|---|---|---|")
    for name, url in stores.items():
        for tasks, label in ((1, "sequential"), (5, "5 tasks"), (50, "50 tasks")):
            if name == "sqlite":
                url = f"sqlite:///{tmp}/{tasks}.db"
            admitted, stored = asyncio.run(run(url, tasks))
            print(f"| {name} | {label} | {admitted} | {stored} | 100 calls / 1000 |")
        if name == "memory":
            continue
        if name == "sqlite":
            url = f"sqlite:///{tmp}/two.db"
        else:
            asyncio.run(run(url, 0))  # reset
        children = [
            subprocess.Popen(
                [sys.executable, __file__, "--child", url, "50"], stdout=subprocess.PIPE
            )
            for _ in range(2)
        ]
        total = sum(json.loads(child.communicate()[0]) for child in children)
        _, stored = asyncio.run(run(url, 0, reset=False))
        print(f"| {name} | 2 processes x 50 tasks | {total} | {stored} | 100 calls / 1000 |")


if __name__ == "__main__":
    main()
