"""Differential test: llmtally's cost equals LiteLLM's cost logic on the same price list.

The installed ``litellm`` (a test extra) ships the price list llmtally's table is built from
(``model_prices_and_context_window_backup.json``). For every model both know, llmtally's cost
(through its own name lookup) and ``litellm.cost_per_token`` (with that same list loaded, so
only the logic differs) must agree within 1e-9 relative, across plain, cached, cache-write
(5 minutes and 1 hour), reasoning and above-tier usages, service tiers where listed (flex,
priority, ultrafast through ``litellm.cost_per_token(service_tier=...)``; batch through
``litellm.cost_calculator.batch_cost_calculator``, LiteLLM's cost logic for batch jobs, on every
usage above for a model listing batch prices), the inference geography and speed multipliers
and off-peak windows. The only exceptions are ``EXCEPTIONS``, each with its reason and a source.

Run ``python tests/unit/test_price_diff.py`` for the table (compared, agree, exceptions by
cause).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import os
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network: the shipped list

litellm = pytest.importorskip("litellm")

from importlib.metadata import version as _version  # noqa: E402

# The logic this test holds llmtally to is LiteLLM's from this release on (older releases price
# fewer token kinds at a tier and have no billing-time API for off-peak windows).
MIN_LITELLM = (1, 110)
if tuple(int(p) for p in _version("litellm").split(".")[:2]) < MIN_LITELLM:
    pytest.skip(
        f"litellm {_version('litellm')} predates the cost logic compared here",
        allow_module_level=True,
    )

from llmtally import price_table, pricing  # noqa: E402
from llmtally._core import Usage  # noqa: E402
from llmtally.price_table import (  # noqa: E402
    MODES,
    PROVIDERS,
    SKIPPED,
    region_of,
    strip_prefix,
)

REL = 1e-9
SOURCE = Path(litellm.__file__).parent / "model_prices_and_context_window_backup.json"
PEAK = datetime.datetime(2026, 1, 5, 8, 0, tzinfo=datetime.UTC)  # a Monday, 08:00 UTC
OFF_PEAK = datetime.datetime(2026, 1, 5, 20, 0, tzinfo=datetime.UTC)

# Where llmtally and LiteLLM's logic differ on purpose: (key prefix or key, usage kind) ->
# (reason, source). A usage kind of "*" covers every usage of the model.
EXCEPTIONS: dict[tuple[str, str], tuple[str, str]] = {
    ("fireworks_ai/", "priority"): (
        "LiteLLM's fireworks_ai cost path does not pass service_tier on, so the list's _priority"
        " prices are never applied; Fireworks bills service_tier 'priority' at them",
        "https://docs.fireworks.ai/serverless/priority-and-fast",
    ),
    ("", "batch above-tier"): (
        "above a long-context tier the list gives no batch price for, LiteLLM's batch logic"
        " applies the flat (below-tier) batch price; Google bills batch jobs at 50% of the"
        " standard rate for the model and Anthropic at 50% of the standard price of all usage,"
        " the long-context price included (the list's own batch tiers of gemini-2.5-pro are"
        " half its standard tiers), which llmtally applies",
        "https://developers.googleblog.com/scale-your-ai-workloads-batch-mode-gemini-api ;"
        " https://docs.claude.com/en/docs/build-with-claude/batch-processing",
    ),
}


@dataclass(frozen=True)
class Case:
    kind: str
    prompt: int
    completion: int
    cached: int = 0
    cache_write: int = 0
    cache_write_1h: int = 0
    reasoning: int = 0
    service_tier: str | None = None
    geo: str | None = None
    speed: str | None = None
    at: datetime.datetime | None = None


def _thresholds(entry: dict[str, Any]) -> list[int]:
    from llmtally.price_table import THRESHOLD

    out = set()
    for key, value in entry.items():
        m = THRESHOLD.match(key)
        if m and value is not None:
            out.add(int(m.group(2)) * (1000 if m.group(3) else 1))
    return sorted(out)


def _standard_cases(
    entry: dict[str, Any], prefix: str = "", tier: str | None = None
) -> Iterator[Case]:
    yield Case(f"{prefix}plain", 1000, 500, service_tier=tier)
    yield Case(f"{prefix}cached", 1000, 500, cached=600, service_tier=tier)
    yield Case(
        f"{prefix}cache-write",
        2000,
        200,
        cached=500,
        cache_write=800,
        cache_write_1h=500,
        service_tier=tier,
    )
    yield Case(f"{prefix}reasoning", 1000, 1500, reasoning=1000, service_tier=tier)
    for above in _thresholds(entry):
        yield Case(f"{prefix}at-tier", above, 100, cached=above // 10, service_tier=tier)
        yield Case(
            f"{prefix}above-tier",
            above + 50_000,
            3000,
            cached=20_000,
            cache_write=10_000,
            cache_write_1h=4000,
            reasoning=2000,
            service_tier=tier,
        )


def _lists(entry: dict[str, Any], suffix: str) -> bool:
    return any(k.endswith(suffix) and v is not None for k, v in entry.items())


def cases(entry: dict[str, Any]) -> Iterator[Case]:
    yield from _standard_cases(entry)
    for suffix, tier in (("_flex", "flex"), ("_priority", "priority"), ("_ultrafast", "ultrafast")):
        if _lists(entry, suffix):
            yield Case(f"{tier}", 1000, 1500, cached=600, reasoning=1000, service_tier=tier)
    if _lists(entry, "_batches") and any(
        k.startswith(("input_cost_per_token", "output_cost_per_token"))
        for k in entry
        if k.endswith("_batches")
    ):
        yield from _standard_cases(entry, "batch ", "batch")
    specific = entry.get("provider_specific_entry")
    if isinstance(specific, dict) and "us" in specific:
        yield Case("geo-us", 2000, 200, cached=500, cache_write=800, geo="us")
    if isinstance(specific, dict) and "fast" in specific:
        yield Case("speed-fast", 2000, 200, cached=500, cache_write=800, speed="fast")
        yield Case("speed-fast geo-us", 2000, 200, cached=500, geo="us", speed="fast")
    if isinstance(entry.get("off_peak_pricing"), dict):
        yield Case("peak", 1000, 500, cached=600, at=PEAK)
        yield Case("off-peak", 1000, 500, cached=600, at=OFF_PEAK)


def litellm_cost(key: str, provider: str, case: Case) -> float:
    from litellm._internal_context import pinned_billing_time
    from litellm.types.utils import (
        CacheCreationTokenDetails,
        CompletionTokensDetailsWrapper,
        PromptTokensDetailsWrapper,
    )
    from litellm.types.utils import Usage as LiteUsage

    details = None
    if case.cached or case.cache_write:
        creation = None
        if case.cache_write:
            creation = CacheCreationTokenDetails(
                ephemeral_5m_input_tokens=case.cache_write - case.cache_write_1h,
                ephemeral_1h_input_tokens=case.cache_write_1h,
            )
        details = PromptTokensDetailsWrapper(
            cached_tokens=case.cached,
            cache_creation_tokens=case.cache_write,
            cache_creation_token_details=creation,
        )
    usage = LiteUsage(
        prompt_tokens=case.prompt,
        completion_tokens=case.completion,
        total_tokens=case.prompt + case.completion,
        prompt_tokens_details=details,
        completion_tokens_details=CompletionTokensDetailsWrapper(reasoning_tokens=case.reasoning)
        if case.reasoning
        else None,
    )
    if case.geo is not None:
        usage.inference_geo = case.geo  # type: ignore[attr-defined]
    if case.speed is not None:
        usage.speed = case.speed  # type: ignore[attr-defined]
    if case.service_tier == "batch":
        # LiteLLM prices a batch job's usage with its batch cost logic, not cost_per_token.
        from litellm.cost_calculator import batch_cost_calculator

        prompt, completion = batch_cost_calculator(usage, key, provider)
        return float(prompt + completion)
    with pinned_billing_time(case.at or PEAK):
        prompt, completion = litellm.cost_per_token(
            model=key,
            custom_llm_provider=provider,
            usage_object=usage,
            service_tier=case.service_tier,
        )
    return float(prompt + completion)


def llmtally_cost(key: str, provider: str, case: Case) -> float | None:
    usage = Usage(
        prompt_tokens=case.prompt,
        completion_tokens=case.completion,
        cached_tokens=case.cached,
        cache_write_tokens=case.cache_write,
        cache_write_1h_tokens=case.cache_write_1h,
        reasoning_tokens=case.reasoning,
    )
    pusd = pricing.cost_pusd(
        usage,
        key,
        provider,
        service_tier=case.service_tier,
        inference_geo=case.geo,
        speed=case.speed,
        at=(case.at or PEAK).timestamp(),
    )
    return None if pusd is None else pusd / 1e12


def compared() -> Iterator[tuple[str, str, str, dict[str, Any]]]:
    """``(key, litellm provider, our provider, entry)`` of every model both price: the LiteLLM
    keys the table is built from, each the row the table kept for its name."""
    source = json.loads(SOURCE.read_text("utf-8"))
    kept = _kept_keys(source)
    for key in sorted(source):
        entry = source[key]
        if not isinstance(entry, dict) or entry.get("mode") not in MODES:
            continue
        provider = str(entry.get("litellm_provider", ""))
        ours = PROVIDERS.get(provider) or ("vertex_ai" if provider.startswith("vertex_ai") else "")
        if not ours or SKIPPED.search(key.lower()) or key not in kept:
            continue
        if entry.get("input_cost_per_token") is None or entry.get("output_cost_per_token") is None:
            continue
        yield key, provider, ours, entry


def _kept_keys(source: dict[str, Any]) -> set[str]:
    """The LiteLLM key behind each row of the table (two keys for one name: the one kept)."""
    kept: dict[tuple[str, str], str] = {}
    for key in sorted(source):
        entry = source[key]
        if not isinstance(entry, dict) or entry.get("mode") not in MODES:
            continue
        provider = str(entry.get("litellm_provider", ""))
        ours = PROVIDERS.get(provider) or ("vertex_ai" if provider.startswith("vertex_ai") else "")
        if not ours or SKIPPED.search(key.lower()):
            continue
        if entry.get("input_cost_per_token") is None or entry.get("output_cost_per_token") is None:
            continue
        region = region_of(key)
        name = strip_prefix(key) if region is None else f"{region[0]}/{region[1]}/{region[2]}"
        previous = kept.get((name, ours))
        if previous is None or key.lower().startswith(f"{ours}/"):
            kept[(name, ours)] = key
    return set(kept.values())


def _exception(key: str, kind: str) -> tuple[str, str] | None:
    for (prefix, which), why in EXCEPTIONS.items():
        if (key == prefix or key.startswith(prefix)) and which in ("*", kind):
            return why
    return None


@functools.cache
def run() -> tuple[Counter[str], list[str], Counter[str]]:
    """Compare every model on every case: (counts, disagreements, exceptions by reason)."""
    counts: Counter[str] = Counter()
    wrong: list[str] = []
    excused: Counter[str] = Counter()
    with same_list():
        for key, provider, ours, entry in compared():
            _compare(key, provider, ours, entry, counts, wrong, excused)
    return counts, wrong, excused


@contextlib.contextmanager
def same_list() -> Iterator[None]:
    """llmtally priced from a table built from the installed LiteLLM's own list (as ``llmtally
    prices update FILE`` builds it), so only the logic differs, whichever release is installed."""
    built = price_table.update(json.loads(SOURCE.read_text("utf-8")), None, "2026-01-01", "test")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "prices.json"
        price_table.write(built.table, path)
        before = os.environ.get("LLMTALLY_PRICES")
        os.environ["LLMTALLY_PRICES"] = str(path)
        pricing.reload()
        try:
            yield
        finally:
            if before is None:
                del os.environ["LLMTALLY_PRICES"]
            else:
                os.environ["LLMTALLY_PRICES"] = before
            pricing.reload()


def _compare(
    key: str,
    provider: str,
    ours: str,
    entry: dict[str, Any],
    counts: Counter[str],
    wrong: list[str],
    excused: Counter[str],
) -> None:
    counts["models"] += 1
    model_ok, model_excused = True, False
    for case in cases(entry):
        counts["usages"] += 1
        counts[f"kind {case.kind}"] += 1
        try:
            theirs = litellm_cost(key, provider, case)
        except Exception as exc:  # LiteLLM cannot price it
            theirs_error: str | None = f"{type(exc).__name__}"
            theirs = float("nan")
        else:
            theirs_error = None
        mine = llmtally_cost(key, ours, case)
        same = (
            theirs_error is None
            and mine is not None
            and abs(mine - theirs) <= REL * max(abs(theirs), abs(mine), 1e-300)
        )
        if same:
            continue
        why = _exception(key, case.kind)
        if why is not None:
            excused[why[0]] += 1
            model_excused = True
            continue
        model_ok = False
        wrong.append(
            f"{key} [{provider}] {case.kind}: llmtally {mine} litellm {theirs}"
            f"{'' if theirs_error is None else ' ' + theirs_error}"
        )
    counts["disagree" if not model_ok else "excused" if model_excused else "agree"] += 1


def test_llmtally_and_litellm_agree_on_every_model_both_know() -> None:
    counts, wrong, _ = run()
    assert counts["models"] > 1000
    assert not wrong, f"{len(wrong)} disagreements, first: " + "\n".join(wrong[:20])


def test_every_exception_is_still_needed() -> None:
    _, _, excused = run()
    unused = {why for why, _ in EXCEPTIONS.values()} - set(excused)
    assert not unused, f"exceptions no longer needed: {unused}"


if __name__ == "__main__":
    counts, wrong, excused = run()
    print(f"models compared: {counts['models']}, usages: {counts['usages']}")
    print(
        f"agree on every usage: {counts['agree']}, agree but for an exception:"
        f" {counts['excused']}, disagree: {counts['disagree']}"
    )
    kinds = sorted((k[5:], n) for k, n in counts.items() if k.startswith("kind "))
    print("usages by kind: " + ", ".join(f"{k} {n}" for k, n in kinds))
    for why, n in excused.most_common():
        print(f"  excused {n}: {why}")
    for line in wrong[:60]:
        print("  " + line)
    print(f"  ... {len(wrong)} disagreements", file=sys.stderr)
