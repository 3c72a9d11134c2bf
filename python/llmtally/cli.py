"""The ``llmtally`` command: ``llmtally demo`` and friends."""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn, TextIO

from llmtally import __version__
from llmtally.dispatch import CallbackManager
from llmtally.events import AsyncCallbackHandler

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"llmtally: error: {message} (see 'llmtally --help')\n")


# ---------------------------------------------------------------------------------------------
# demo


@dataclass
class _UserTotals:
    calls: int = 0
    errors: int = 0
    prompt: int = 0
    completion: int = 0
    total: int = 0
    estimated: int = 0


@dataclass
class _DemoTally(AsyncCallbackHandler):
    """Per-user totals for the demo's table (a plain user-written handler)."""

    users: dict[str, _UserTotals] = field(default_factory=dict)
    chunks: int = 0

    def _user(self, kwargs: dict[str, Any]) -> _UserTotals:
        user_id = kwargs.get("user_id", "anonymous")
        found = self.users.get(user_id)
        if found is None:
            found = self.users[user_id] = _UserTotals()
        return found

    async def on_llm_end(self, response: dict[str, Any], **kwargs: Any) -> None:
        totals = self._user(kwargs)
        totals.calls += 1
        totals.prompt += response.get("prompt_tokens", 0)
        totals.completion += response.get("completion_tokens", 0)
        totals.total += response.get("tokens_used", 0)
        totals.estimated += bool(response.get("estimated"))

    async def on_llm_error(self, error: BaseException, **kwargs: Any) -> None:
        self._user(kwargs).errors += 1

    async def on_llm_stream_chunk(self, chunk: Any, **kwargs: Any) -> None:
        self.chunks += 1


class _FlakyHandler(AsyncCallbackHandler):
    """A handler with a bug: it fails on every 7th call. llmtally isolates it."""

    def __init__(self) -> None:
        self.seen = 0

    async def on_llm_end(self, response: dict[str, Any], **kwargs: Any) -> None:
        self.seen += 1
        if self.seen % 7 == 0:
            raise RuntimeError("bug in a user handler")


class _ProviderError(Exception):
    """The simulated provider's failure."""


_WORDS = (
    "the quick brown fox jumps over the lazy dog while a model summarises quarterly revenue "
    "figures and explains the tokenizer to a curious engineer"
).split(" ")


@dataclass
class _Plan:
    user_id: str
    prompt_words: int
    completion_words: int
    stream: bool
    stream_usage: bool
    fails: bool


def _plans(calls: int, users: int, seed: int) -> list[_Plan]:
    rng = random.Random(seed)
    plans = []
    for _ in range(calls):
        stream = rng.random() < 0.3
        plans.append(
            _Plan(
                user_id=f"user-{rng.randrange(users):03d}",
                prompt_words=rng.randint(5, 120),
                completion_words=rng.randint(1, 80),
                stream=stream,
                stream_usage=stream and rng.random() < 0.7,
                fails=rng.random() < 0.03,
            )
        )
    return plans


async def _fake_llm(manager: CallbackManager | None, plan: _Plan, index: int) -> None:
    """One simulated chat completion, through the manager when given."""
    prompt = " ".join(_WORDS[(index + i) % len(_WORDS)] for i in range(plan.prompt_words))
    messages = [{"role": "user", "content": prompt}]
    prompt_tokens = plan.prompt_words + 8
    words = [_WORDS[(index * 7 + i) % len(_WORDS)] for i in range(plan.completion_words)]
    if manager is None:
        await asyncio.sleep(0)
        if plan.fails:
            return
        if plan.stream:
            for i in range(len(words)):
                if i % 8 == 7:
                    await asyncio.sleep(0)
        return
    try:
        async with manager.llm_call(
            messages, provider="openai", model="gpt-4o-mini", user_id=plan.user_id
        ) as call:
            await asyncio.sleep(0)
            if plan.fails:
                raise _ProviderError("simulated 503 from the provider")
            usage = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": len(words),
                "total_tokens": prompt_tokens + len(words),
            }
            if plan.stream:
                for i, word in enumerate(words):
                    await call.chunk({"choices": [{"delta": {"content": word + " "}}]})
                    if i % 8 == 7:
                        await asyncio.sleep(0)
                if plan.stream_usage:
                    await call.chunk({"choices": [], "usage": usage})
            else:
                call.set_response(
                    {
                        "model": "gpt-4o-mini-2024-07-18",
                        "choices": [{"message": {"content": " ".join(words)}}],
                        "usage": usage,
                    }
                )
    except _ProviderError:
        pass


class _Progress:
    def __init__(self, total: int, out: TextIO) -> None:
        self.total = total
        self.done = 0
        self.out = out
        self.tty = out.isatty()
        self.step = max(1, total // 50)

    def advance(self) -> None:
        self.done += 1
        if self.done % self.step == 0 or self.done == self.total:
            self.draw()

    def draw(self) -> None:
        width = 30
        filled = width * self.done // self.total
        bar = "#" * filled + "." * (width - filled)
        line = f"  [{bar}] {self.done:>6}/{self.total} calls"
        if self.tty:
            self.out.write("\r" + line)
            if self.done == self.total:
                self.out.write("\n")
        elif self.done == self.total:
            self.out.write(line + "\n")
        self.out.flush()


async def _run_all(
    manager: CallbackManager | None,
    plans: Sequence[_Plan],
    concurrency: int,
    progress: _Progress | None,
) -> float:
    queue = iter(enumerate(plans))

    async def worker() -> None:
        for index, plan in queue:
            await _fake_llm(manager, plan, index)
            if progress is not None:
                progress.advance()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - t0


async def _demo(args: argparse.Namespace, out: TextIO) -> int:
    plans = _plans(args.calls, args.users, args.seed)
    tally = _DemoTally()
    flaky = _FlakyHandler()
    manager = CallbackManager([tally, flaky])
    out.write(
        f"llmtally {__version__} demo: {args.calls} simulated LLM calls from {args.users} users, "
        f"{args.concurrency} at a time (30% streamed, 3% failing, one buggy handler)\n"
    )
    # The same workload without callbacks first, for the overhead figure.
    bare_s = await _run_all(None, plans, args.concurrency, None)
    progress = _Progress(len(plans), out)
    metered_s = await _run_all(manager, plans, args.concurrency, progress)
    health = await manager.health()

    rows = sorted(tally.users.items(), key=lambda kv: (-kv[1].total, kv[0]))
    header = (
        f"  {'user':<10} {'calls':>6} {'errors':>6} {'prompt':>9} {'completion':>10}"
        f" {'total':>9} {'estimated':>9}"
    )
    out.write("\n" + header + "\n  " + "-" * (len(header) - 2) + "\n")
    shown = rows if args.all_users else rows[: args.top]
    for user_id, t in shown:
        out.write(
            f"  {user_id:<10} {t.calls:>6} {t.errors:>6} {t.prompt:>9} {t.completion:>10}"
            f" {t.total:>9} {t.estimated:>9}\n"
        )
    if len(rows) > len(shown):
        out.write(f"  ... {len(rows) - len(shown)} more users (--all-users shows them)\n")
    total = _UserTotals()
    for _, t in rows:
        total.calls += t.calls
        total.errors += t.errors
        total.prompt += t.prompt
        total.completion += t.completion
        total.total += t.total
        total.estimated += t.estimated
    out.write("  " + "-" * (len(header) - 2) + "\n")
    out.write(
        f"  {'all':<10} {total.calls:>6} {total.errors:>6} {total.prompt:>9}"
        f" {total.completion:>10} {total.total:>9} {total.estimated:>9}\n\n"
    )
    overhead_us = max(0.0, (metered_s - bare_s) / len(plans) * 1e6)
    events = 2 * len(plans) + tally.chunks
    out.write(
        f"  {len(plans) / metered_s:,.0f} calls/s metered; overhead {overhead_us:.1f} us per call"
        f" ({events / len(plans):.1f} events per call with the stream chunks,"
        f" {overhead_us * len(plans) / events:.1f} us per event)\n"
        f"  handler failures isolated: {health['errors']} (the LLM calls never saw them); "
        f"provider errors recorded: {health['llm_errors']}\n"
    )
    return 0


# ---------------------------------------------------------------------------------------------
# entry point


def _parser() -> _Parser:
    parser = _Parser(
        prog="llmtally",
        description="Meter LLM calls: tokens, cost, latency and errors per user and cycle.",
    )
    parser.add_argument("--version", action="version", version=f"llmtally {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    demo = sub.add_parser("demo", help="simulate concurrent LLM calls through the handlers")
    demo.add_argument("--calls", type=_positive_int, default=3000, help="number of calls (3000)")
    demo.add_argument("--users", type=_positive_int, default=40, help="number of users (40)")
    demo.add_argument(
        "--concurrency", type=_positive_int, default=500, help="calls in flight at once (500)"
    )
    demo.add_argument("--seed", type=int, default=7, help="random seed of the workload (7)")
    demo.add_argument("--top", type=_positive_int, default=10, help="users shown (10)")
    demo.add_argument("--all-users", action="store_true", help="show every user")
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``llmtally`` command; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logger = logging.getLogger("llmtally")
    level = logger.level
    # The demo's buggy handler fails on purpose; its failures are counted, not printed.
    logger.setLevel(logging.CRITICAL)
    try:
        if args.command == "demo":
            return asyncio.run(_demo(args, sys.stdout))
    finally:
        logger.setLevel(level)
    parser.error(f"unknown command {args.command!r}")


if __name__ == "__main__":
    sys.exit(main())
