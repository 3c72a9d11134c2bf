"""Collects per-call times across a bench session and prints ratios at the end."""

from __future__ import annotations

RESULTS: dict[str, dict[str, float]] = {}


def record(suite: str, system: str, seconds_per_call: float) -> None:
    RESULTS.setdefault(suite, {})[system] = seconds_per_call


def summary() -> list[str]:
    lines = []
    for suite, systems in RESULTS.items():
        floor = systems.get("empty")
        lines.append(f"{suite}:")
        for system, t in systems.items():
            line = f"  {system:<12} {t * 1e6:9.3f} us/op"
            if floor is not None and system != "empty":
                line += f"   added {(t - floor) * 1e6:8.2f} us"
            lines.append(line)
        if floor is not None and "llmtally" in systems:
            ours = systems["llmtally"] - floor
            for peer, t in systems.items():
                if peer in ("empty", "llmtally"):
                    continue
                lines.append(f"  added-cost ratio {peer}/llmtally: {(t - floor) / ours:.1f}x")
        if "llmtally-redis" in systems and "naive-hincrby" in systems and "round" not in suite:
            ours, naive = systems["llmtally-redis"], systems["naive-hincrby"]
            lines.append(f"  llmtally into Redis: {1 / ours:,.0f} calls/s; naive: {1 / naive:,.0f}")
            lines.append(f"  llmtally is {naive / ours:.1f}x the one-HINCRBY-per-call handler")
            if "llmtally-memory" in systems:
                share = systems["llmtally-memory"] / ours
                lines.append(f"  Redis store at {share:.0%} of the memory store's calls/s")
        if "round-trips" in suite:
            for system, t in systems.items():
                lines.append(f"  {system}: {t * 1e6:.5f} Redis round trips per call")
        if "store-concurrent" in suite and "memory" in systems:
            for system, t in systems.items():
                share = systems["memory"] / t
                lines.append(f"  {system}: {1 / t:,.0f} calls/s ({share:.0%} of the memory store)")
        if "spool-sequential" in suite and {"memory", "memory+spool"} <= systems.keys():
            cost = (systems["memory+spool"] - systems["memory"]) * 1e6
            lines.append(f"  the spool adds {cost:.2f} us per call")
        if suite == "B5-flush-sqlite-10k-users":
            t = systems["llmtally-flush"]
            lines.append(
                f"  SQLite flush: {1_000_000 / t:,.0f} deltas/s drained and written,"
                f" {70_000 / t:,.0f} fields/s"
            )
        if "llmtally-flush" in systems and "bare-evalsha" in systems:
            ours, bare = systems["llmtally-flush"], systems["bare-evalsha"]
            lines.append(
                f"  llmtally flush: {1_000_000 / ours:,.0f} deltas/s drained and written,"
                f" {70_000 / ours:,.0f} fields/s ({bare / ours:.0%} of the bare EVALSHA loop)"
            )
        if floor is None and "llmtally" in systems and "litellm" in systems:
            ratio = systems["litellm"] / systems["llmtally"]
            lines.append(f"  llmtally is {ratio:.0f}x faster than litellm")
        if "rust" in systems and "python" in systems:
            lines.append(f"  rust is {systems['python'] / systems['rust']:.1f}x faster than python")
        if "empty" in systems and "llmtally" in systems and "concurrent" in suite:
            lines.append(
                f"  llmtally calls/s: {1 / systems['llmtally']:,.0f} "
                f"({systems['empty'] / systems['llmtally']:.0%} of the empty harness)"
            )
        if suite.startswith("B9-limits") and "none" in systems:
            for system, t in systems.items():
                if system == "none":
                    continue
                added = (t - systems["none"]) * 1e6
                lines.append(
                    f"  {system}: adds {added:.2f} us per call, {1 / t:,.0f} calls/s "
                    f"({systems['none'] / t:.0%} of the recorder alone)"
                )
    return lines
