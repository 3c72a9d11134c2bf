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
    return lines
