"""The ``llmtally`` command: ``llmtally demo`` and friends."""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import logging
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TextIO

from llmtally import __version__
from llmtally._native import pusd_to_usd
from llmtally.dispatch import CallbackManager
from llmtally.errors import ConfigError, LlmtallyError, StoreError
from llmtally.events import AsyncCallbackHandler
from llmtally.identity import charged_user
from llmtally.metering import UsageRecorder
from llmtally.repository import TokenUsageRepository
from llmtally.storage import open_store
from llmtally.storage.keys import current_cycle, scope_key, validate_cycle, validate_user_id
from llmtally.storage.store import _redact
from llmtally.trackers import PerformanceTracker

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
    cost_pusd: int = 0


@dataclass
class _DemoTally(AsyncCallbackHandler):
    """Per-user totals for the demo's table (a plain user-written handler)."""

    users: dict[str, _UserTotals] = field(default_factory=dict)
    chunks: int = 0

    def _user(self, kwargs: dict[str, Any]) -> _UserTotals:
        user_id = charged_user(kwargs.get("user_id"))[0]
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
        totals.cost_pusd += response.get("cost_pusd") or 0

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
                user_id=f"demo-user-{rng.randrange(users):03d}",
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
    store = open_store(args.store)
    repo = TokenUsageRepository(store)
    cycle = current_cycle()
    tally = _DemoTally()
    perf = PerformanceTracker()
    manager = CallbackManager([tally, UsageRecorder(store=store), perf, _FlakyHandler()])
    out.write(
        f"llmtally {__version__} demo: {args.calls} simulated LLM calls from {args.users} users, "
        f"{args.concurrency} at a time (30% streamed, 3% failing, one buggy handler)\n"
        f"  store: {_redact(store.url)}\n"
    )
    before = {r["user_id"]: r for r in await repo.list_usage(cycle)}
    # The same workload without callbacks first, for the overhead figure.
    bare_s = await _run_all(None, plans, args.concurrency, None)
    progress = _Progress(len(plans), out)
    metered_s = await _run_all(manager, plans, args.concurrency, progress)
    health = await manager.health()
    flushed = await store.flush()

    rows = sorted(tally.users.items(), key=lambda kv: (-kv[1].total, kv[0]))
    header = (
        f"  {'user':<14} {'calls':>6} {'errors':>6} {'prompt':>9} {'completion':>10}"
        f" {'total':>9} {'estimated':>9} {'cost_usd':>10}"
    )
    out.write("\n" + header + "\n  " + "-" * (len(header) - 2) + "\n")
    shown = rows if args.all_users else rows[: args.top]
    for user_id, t in shown:
        out.write(
            f"  {user_id:<14} {t.calls:>6} {t.errors:>6} {t.prompt:>9} {t.completion:>10}"
            f" {t.total:>9} {t.estimated:>9} {pusd_to_usd(t.cost_pusd):>10.6f}\n"
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
        total.cost_pusd += t.cost_pusd
    out.write("  " + "-" * (len(header) - 2) + "\n")
    out.write(
        f"  {'all':<14} {total.calls:>6} {total.errors:>6} {total.prompt:>9}"
        f" {total.completion:>10} {total.total:>9} {total.estimated:>9}"
        f" {pusd_to_usd(total.cost_pusd):>10.6f}\n\n"
    )
    lat = perf.stats()
    out.write(
        f"  latency p50 {lat['latency_p50_ms']:.3f} ms, p95 {lat['latency_p95_ms']:.3f} ms,"
        f" p99 {lat['latency_p99_ms']:.3f} ms; time to first token p50"
        f" {lat['ttft_p50_ms']:.3f} ms (cost from the bundled price table: gpt-4o-mini)\n"
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
    # Read the store back: what this run added must equal what the handlers saw, exactly.
    # A persistent store is read back through a store of its own, as another process would.
    check = store if store.backend.name == "memory" else open_store(args.store)
    after = {r["user_id"]: r for r in await TokenUsageRepository(check).list_usage(cycle)}
    if check is not store:
        await check.aclose()
    flushed = await store.aclose() and flushed
    mismatches = 0
    for user_id, t in rows:
        old = before.get(user_id, {})
        new = after.get(user_id, {})
        for name, want in (
            ("total_tokens", t.total),
            ("calls", t.calls),
            ("errors", t.errors),
            ("cost_pusd", t.cost_pusd),
        ):
            if new.get(name, 0) - old.get(name, 0) != want:
                mismatches += 1
    if flushed and mismatches == 0:
        out.write(
            f"  store check: the {len(rows)} users' totals in the store grew by exactly this run's"
            f" numbers (see 'llmtally usage --cycle {cycle}')\n"
        )
        return 0
    out.write(f"  store check FAILED: {mismatches} mismatching counters (flushed={flushed})\n")
    return 1


# ---------------------------------------------------------------------------------------------
# usage, limit, export


_COLUMNS = (
    "total_tokens",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "cost_usd",
    "calls",
    "errors",
    "limit",
)


async def _records(args: argparse.Namespace) -> list[dict[str, Any]]:
    store = open_store(args.store)
    try:
        repo = TokenUsageRepository(store)
        if getattr(args, "user", None):
            cycle = args.cycle or current_cycle()
            return [await repo.get_usage_stats(args.user, cycle)]
        cycle = None if args.all_cycles else (args.cycle or current_cycle())
        return await repo.list_usage(cycle)
    finally:
        await store.aclose()


def _safe(user_id: str) -> str:
    """A stored id as text a terminal or a CSV reader can take: printable characters as they
    are, a backslash doubled, anything else (control characters, escape sequences, newlines,
    lone surrogates) as a ``\\xNN``/``\\uNNNN``/``\\UNNNNNNNN`` escape. Reversible; JSON
    output is exact."""
    if user_id.isprintable() and "\\" not in user_id:
        return user_id
    out = []
    for ch in user_id:
        if ch == "\\":
            out.append("\\\\")
        elif ch.isprintable():
            out.append(ch)
        else:
            code = ord(ch)
            if code < 0x100:
                out.append(f"\\x{code:02x}")
            elif code < 0x10000:
                out.append(f"\\u{code:04x}")
            else:
                out.append(f"\\U{code:08x}")
    return "".join(out)


async def _usage(args: argparse.Namespace, out: TextIO) -> int:
    records = await _records(args)
    if args.json:
        out.write(json.dumps(records, indent=2, sort_keys=True) + "\n")
        return 0
    if not records:
        out.write("no usage recorded for this cycle (try --all-cycles)\n")
        return 0
    header = f"  {'user':<24} {'cycle':<10} {'calls':>7} {'errors':>6} {'prompt':>10} " + (
        f"{'completion':>10} {'total':>11} {'cost_usd':>11} {'limit':>11}"
    )
    out.write(header + "\n  " + "-" * (len(header) - 2) + "\n")
    for r in records:
        limit = "-" if r["limit"] is None else str(r["limit"])
        out.write(
            # The whole id, escaped (a longer one widens its row: no two ids look the same).
            f"  {_safe(r['user_id']):<24} {r['cycle_start_date']:<10} {r['calls']:>7}"
            f" {r['errors']:>6} {r['prompt_tokens']:>10} {r['completion_tokens']:>10}"
            f" {r['total_tokens']:>11} {r['cost_usd']:>11.6f} {limit:>11}\n"
        )
    return 0


async def _limit(args: argparse.Namespace, out: TextIO) -> int:
    if args.action == "set" and args.limit is None:
        raise ConfigError("'limit set' needs a LIMIT (tokens), or 'none' to remove it")
    store = open_store(args.store)
    try:
        cycle = args.cycle or current_cycle()
        limit = None if args.limit in (None, _NO_LIMIT) else args.limit
        if args.scope == "user":
            repo = TokenUsageRepository(store)
            if args.action == "set":
                await repo.set_usage_limit(args.user, limit, cycle)
            check = await repo.check_usage_limit(args.user, cycle)
        else:
            # A scoped budget (team, org, API key, model...): its own hash, read by a
            # BudgetLimiter(scope=..., limit_from_store=True).
            key = scope_key(args.scope, validate_user_id(args.user, "the scope's id"), cycle)
            if args.action == "set":
                await store.set_fields(key, {"limit": limit})
            fields = await store.read(key)
            used = fields.get("total_tokens", 0)
            stored = fields.get("limit")
            check = {
                "scope": args.scope,
                "id": args.user,
                "cycle_start_date": cycle,
                "limit": stored,
                "used": used,
                "reserved": fields.get("reserved_tokens", 0),
                "remaining": None if stored is None else max(0, stored - used),
            }
    finally:
        await store.aclose()
    if args.json:
        out.write(json.dumps(check, sort_keys=True) + "\n")
    else:
        shown = "none" if check["limit"] is None else check["limit"]
        who = _safe(args.user) if args.scope == "user" else f"{args.scope} {_safe(args.user)}"
        out.write(
            f"{who} {check['cycle_start_date']}: limit {shown}, used {check['used']}, "
            f"remaining {'-' if check['remaining'] is None else check['remaining']}\n"
        )
    return 0


async def _export(args: argparse.Namespace, out: TextIO) -> int:
    records = await _records(args)
    if args.format == "json":
        out.write(json.dumps(records, indent=2, sort_keys=True) + "\n")
        return 0
    writer = csv.writer(out)
    writer.writerow(["user_id", "cycle_start_date", *_COLUMNS])
    for r in records:
        writer.writerow(
            [
                _safe(r["user_id"]),
                r["cycle_start_date"],
                *("" if r[c] is None else r[c] for c in _COLUMNS),
            ]
        )
    return 0


# ---------------------------------------------------------------------------------------------
# prices


def _prices(args: argparse.Namespace, out: TextIO) -> int:
    """``llmtally prices update [FILE]``: refresh the price table from LiteLLM's public list
    (or FILE), keeping versions; every price that moved more than 100x is listed."""
    import datetime
    import urllib.request

    from llmtally import pricing
    from llmtally.price_table import SOURCE_URL, update, write

    if args.file is not None:
        label = os.path.basename(args.file)
        with open(args.file, encoding="utf-8") as f:
            text = f.read()
    else:
        label = SOURCE_URL
        with urllib.request.urlopen(SOURCE_URL, timeout=60) as reply:
            text = reply.read().decode("utf-8")
    try:
        source = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{label} is not JSON: {exc}") from None
    if not isinstance(source, dict):
        raise ConfigError(f"{label} is not LiteLLM's price list (a JSON object)")
    output = pricing.user_table_path() if args.output is None else Path(args.output)
    current = output if output.is_file() else pricing.table_path()
    previous = json.loads(current.read_text(encoding="utf-8"))
    effective = args.effective or datetime.datetime.now(datetime.UTC).date().isoformat()
    try:
        result = update(source, previous, effective, label)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if not result.table["models"]:
        raise ConfigError(f"{label} has no chat model priced per token: not written")
    out.write(
        f"{len(result.added)} added, {len(result.changed)} changed (effective {effective}),"
        f" {len(result.removed)} removed\n"
    )
    for name, kind, old, new in result.big_moves:
        out.write(f"MOVED MORE THAN 100x: {_safe(name)} {kind}: {old:g} -> {new:g} USD/1M\n")
    if args.dry_run:
        out.write("dry run: nothing written\n")
        return 0
    write(result.table, output)
    pricing.reload()
    out.write(f"wrote {output}\n")
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

    store_help = "store URL (default: LLMTALLY_STORE, else REDIS_HOST, else the SQLite file)"
    demo = sub.add_parser("demo", help="simulate concurrent LLM calls through the handlers")
    demo.add_argument(
        "--calls", type=_demo_calls, default=3000, help="number of calls (3000; at most 1,000,000)"
    )
    demo.add_argument("--users", type=_positive_int, default=40, help="number of users (40)")
    demo.add_argument(
        "--concurrency", type=_positive_int, default=500, help="calls in flight at once (500)"
    )
    demo.add_argument("--seed", type=int, default=7, help="random seed of the workload (7)")
    demo.add_argument("--top", type=_positive_int, default=10, help="users shown (10)")
    demo.add_argument("--all-users", action="store_true", help="show every user")
    demo.add_argument("--store", default=None, help=store_help)

    usage = sub.add_parser("usage", help="show usage per user from the store")
    usage.add_argument("user", nargs="?", help="one user (default: every user)")
    usage.add_argument("--cycle", type=_cycle_arg, help="cycle start YYYY-MM-DD (default: now)")
    usage.add_argument("--all-cycles", action="store_true", help="every cycle in the store")
    usage.add_argument("--json", action="store_true", help="print a JSON list of records")
    usage.add_argument("--store", default=None, help=store_help)

    limit = sub.add_parser(
        "limit", help="set or show the token limit of a user (or a team, org, API key...)"
    )
    limit.add_argument("action", choices=("set", "get"))
    limit.add_argument("user", help="the user, or the scope's id with --scope")
    limit.add_argument(
        "--scope",
        type=_scope_arg,
        default="user",
        help="user (default), or the context kwarg of a scoped budget: team, org, api_key...",
    )
    limit.add_argument("limit", nargs="?", type=_limit_arg, help="tokens, or 'none' (set)")
    limit.add_argument("--cycle", type=_cycle_arg, help="cycle start YYYY-MM-DD (default: now)")
    limit.add_argument("--json", action="store_true")
    limit.add_argument("--store", default=None, help=store_help)

    bench = sub.add_parser("bench", help="measure the per-call overhead here, next to LangChain")
    bench.add_argument("--quick", action="store_true", help="a shorter, noisier run")

    export = sub.add_parser("export", help="export usage records as CSV or JSON")
    export.add_argument("--format", choices=("csv", "json"), default="csv")
    export.add_argument("--cycle", type=_cycle_arg, help="cycle start YYYY-MM-DD (default: now)")
    export.add_argument("--all-cycles", action="store_true", help="every cycle in the store")
    export.add_argument("--store", default=None, help=store_help)

    prices = sub.add_parser("prices", help="refresh the price table")
    prices.add_argument("action", choices=("update",))
    prices.add_argument(
        "file", nargs="?", help="LiteLLM's model_prices_and_context_window.json (default: fetch)"
    )
    prices.add_argument(
        "--output", help="where to write (default: $XDG_DATA_HOME/llmtally/prices.json)"
    )
    prices.add_argument(
        "--effective", type=_date_arg, help="effective date of changed prices (default: today)"
    )
    prices.add_argument("--dry-run", action="store_true", help="report changes, write nothing")
    return parser


def _date_arg(text: str) -> str:
    try:
        return validate_cycle(text, "--effective")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _cycle_arg(text: str) -> str:
    try:
        return validate_cycle(text, "--cycle")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


_NO_LIMIT = -1


def _scope_arg(text: str) -> str:
    if not text or not text.replace("_", "").replace("-", "").isalnum() or len(text) > 64:
        raise argparse.ArgumentTypeError(f"invalid scope {text!r}: a name such as team, org")
    return text


def _limit_arg(text: str) -> int:
    if text.lower() == "none":
        return _NO_LIMIT
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of tokens") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value


MAX_DEMO_CALLS = 1_000_000


def _demo_calls(text: str) -> int:
    value = _positive_int(text)
    if value > MAX_DEMO_CALLS:
        raise argparse.ArgumentTypeError(f"{text!r} is more than {MAX_DEMO_CALLS:,} calls")
    return value


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
    if args.command == "demo":
        # The demo's buggy handler fails on purpose; its failures are counted, not printed.
        logger.setLevel(logging.CRITICAL)
    if args.command == "bench":
        from llmtally.bench import run_bench

        return run_bench(sys.stdout, quick=args.quick)
    if args.command == "prices":
        try:
            return _prices(args, sys.stdout)
        except LlmtallyError as exc:
            sys.stderr.write(f"llmtally: error: {_safe(str(exc))}\n")
            return 2
        except OSError as exc:  # the file or the network
            sys.stderr.write(f"llmtally: error: {_safe(str(exc))}\n")
            return 1
    commands = {"demo": _demo, "usage": _usage, "limit": _limit, "export": _export}
    if isinstance(sys.stdout, io.TextIOWrapper):
        # A terminal that cannot show a character gets an escape, not a traceback.
        sys.stdout.reconfigure(errors="backslashreplace")
    try:
        return asyncio.run(commands[args.command](args, sys.stdout))
    except StoreError as exc:
        # An unreachable or failing store: one line, no traceback.
        sys.stderr.write(f"llmtally: error: {_safe(str(exc))}\n")
        return 1
    except LlmtallyError as exc:
        # A bad store URL or argument: one line, no traceback.
        sys.stderr.write(f"llmtally: error: {_safe(str(exc))}\n")
        return 2
    except BrokenPipeError:
        # The reader went away (`llmtally usage | head`): stop quietly, as Unix tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except OSError as exc:
        # The store's host or file could not be reached: one line, no traceback.
        sys.stderr.write(f"llmtally: error: {_safe(str(exc))}\n")
        return 1
    finally:
        logger.setLevel(level)


if __name__ == "__main__":
    sys.exit(main())
