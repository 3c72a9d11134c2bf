"""Build llmtally's price table from LiteLLM's public price list, with versions.

The source is LiteLLM's ``model_prices_and_context_window.json`` (maintained at
https://github.com/BerriAI/litellm; the ``litellm`` wheel ships a copy as
``litellm/model_prices_and_context_window_backup.json``). ``llmtally prices update [FILE]`` and
``scripts/update_prices.py`` both go through :func:`update`: build the new table, keep the rows
that did not change with their effective date, give a changed row the new effective date and
keep the row it replaces in its ``history``, and flag any price that moved more than 100x.

What is kept: chat, completion and responses models of OpenAI, Anthropic, Google (Gemini API
and Vertex AI), Mistral, DeepSeek, Groq, Amazon Bedrock, Azure OpenAI, Azure AI, xAI, Together
and Fireworks, priced per token; regional entries (``bedrock/us-gov-west-1/...``,
``azure/eu/...``) apart, under ``regions``.

Field mapping (LiteLLM, USD per token -> llmtally, USD per 1M tokens, exact, six decimals):
    input_cost_per_token                        -> input
    output_cost_per_token                       -> output
    cache_read_input_token_cost                 -> cache read
    cache_creation_input_token_cost             -> cache write (5 minutes)
    cache_creation_input_token_cost_above_1hr   -> cache write (1 hour)
    output_cost_per_reasoning_token             -> reasoning
    <any of those>_above_<N>[k]_tokens          -> a tier (prompt above N [x 1000] tokens)
    <any key>_flex / _priority / _ultrafast /   -> the service tier's own table (a key the tier
      _balanced                                    does not list keeps the standard one)
    <any key>_batches                           -> the batch table (see _batch for the prices
                                                   the batch list leaves out)
    provider_specific_entry {"us": 1.1}         -> inference geography multiplier
    provider_specific_entry {"fast": 2}         -> multiplier of a call served at that speed
    off_peak_pricing                            -> the off-peak table and its UTC windows
Provider rules: Fireworks bills cached prompt tokens at 50% of the input price when no cache
price is listed; xAI's tier thresholds are inclusive (its service tiers' too).

Not kept (see the README's pricing section): 12-hour cache writes
(``cache_creation_input_token_cost_above_12hr``), OpenAI's regional-processing and FedRAMP
uplifts, Vertex AI's regional-endpoint uplift, ``_decisions`` prices, and prices per audio,
image or video token, per character, second, request or search query.

Row layout: ``[input, output, cache_read, cache_write, cache_write_1h, reasoning, tiers, extra]``
with trailing ``null`` s dropped; ``null`` means "not listed" (see :class:`llmtally._core.Prices`
for the defaults). ``tiers`` is ``[[above_prompt_tokens, input, output, cache_read, cache_write,
cache_write_1h, reasoning], ...]``; ``extra`` holds ``since`` (effective date), ``inclusive``,
``service_tiers`` (name -> row), ``geo`` and ``speed`` (name -> multiplier), ``off_peak``
(``{"row": row, "windows": [[weekday bits, start minute, end minute], ...]}``) and ``history``
(older versions, newest first, each ``[since, row]``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any

__all__ = ["SOURCE_URL", "Update", "build", "update", "write"]

SOURCE_URL = (
    "https://raw.githubusercontent.com/BerriAI/litellm/main/model_prices_and_context_window.json"
)
FORMAT = 2
MODES = {"chat", "completion", "responses"}
BIG_MOVE = 100  # a price that moved more than this factor either way is flagged

# LiteLLM provider -> ours; the order is the precedence for the provider-neutral table (a name
# listed by its own maker keeps the maker's price).
PROVIDERS = {
    "openai": "openai",
    "text-completion-openai": "openai",
    "anthropic": "anthropic",
    "gemini": "gemini",
    "mistral": "mistral",
    "deepseek": "deepseek",
    "xai": "xai",
    "groq": "groq",
    "together_ai": "together_ai",
    "fireworks_ai": "fireworks_ai",
    "vertex_ai": "vertex_ai",
    "bedrock": "bedrock",
    "bedrock_converse": "bedrock",
    "azure": "azure",
    "azure_text": "azure",
    "azure_ai": "azure_ai",
}
RANK = {p: i for i, p in enumerate(dict.fromkeys(PROVIDERS.values()))}
INCLUSIVE = {"xai"}  # providers whose tier thresholds are inclusive
FIREWORKS_CACHE_READ = Decimal("0.5")  # of the input price, when no cache price is listed
PREFIXES = (
    "openai/",
    "anthropic/",
    "gemini/",
    "mistral/",
    "deepseek/",
    "xai/",
    "groq/",
    "together_ai/",
    "fireworks_ai/",
    "vertex_ai/",
    "bedrock/converse/",
    "bedrock/invoke/",
    "bedrock/",
    "azure_ai/",
    "azure/",
)
BEDROCK_REGION = re.compile(r"^[a-z]{2}(?:-gov)?-[a-z]+-\d$")
AZURE_REGIONS = {"eu", "us", "us-gov", "apac", "global", "global-standard"}
REGIONAL = re.compile(r"^(azure|bedrock)/([^/]+)/(.+)$")
SKIPPED = re.compile(r"(-commitment/|^together-ai-|^bedrock/\*/)")
KINDS = (
    "input_cost_per_token",
    "output_cost_per_token",
    "cache_read_input_token_cost",
    "cache_creation_input_token_cost",
    "cache_creation_input_token_cost_above_1hr",
    "output_cost_per_reasoning_token",
)
THRESHOLD = re.compile(
    r"^(input_cost_per_token|output_cost_per_token|cache_read_input_token_cost"
    r"|cache_creation_input_token_cost(?:_above_1hr|_above_12hr)?)_above_(\d+)(k?)_tokens$"
)
SERVICE_TIERS = {
    "_flex": "flex",
    "_priority": "priority",
    "_ultrafast": "ultrafast",
    "_balanced": "balanced",
}
BATCH = "_batches"
BATCH_DISCOUNT = Decimal("0.5")  # of the standard price, for a kind the batch prices leave out
OTHER_SUFFIXES = ("_decisions", "_fast")
SPEEDS = ("fast",)  # provider_specific_entry multipliers by the call's speed (Anthropic)
GEOS = ("us", "eu", "global")  # provider_specific_entry multipliers by inference geography
DATED = re.compile(r"^(.+?)(-\d{4}-\d{2}-\d{2}|-\d{8})$")
BEDROCK_ID = re.compile(
    r"^(?:(?:us|eu|apac|au|jp|ca|global|us-gov)\.)?"
    r"(?:anthropic|meta|mistral|amazon|cohere|ai21|deepseek|openai|qwen)\.(.+?)(?:-v\d+(?::\d+)?)?$"
)
SIX = Decimal("0.000001")
WEEKDAYS = {"mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6, "sun": 7}


def per_million(value: Any, rounded: list[str], where: str) -> Decimal | None:
    """USD per token (a JSON number) -> USD per 1M tokens, exactly, at most six decimals."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, Decimal):  # a price derived here (a batch discount), already exact
        return _six(value * 1_000_000, rounded, where)
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if not isinstance(value, int | float) or value < 0:
        return None
    return _six(Decimal(repr(float(value))) * 1_000_000, rounded, where)  # repr: as written


def _six(exact: Decimal, rounded: list[str], where: str) -> Decimal:
    six = exact.quantize(SIX, rounding=ROUND_HALF_EVEN)
    if six != exact:
        rounded.append(f"{where}: {exact} -> {six}")
    return six.normalize() if six else Decimal(0)


def trim(row: list[Any]) -> list[Any]:
    while row and row[-1] is None:
        row.pop()
    return row


def _flat(entry: dict[str, Any], rounded: list[str], name: str) -> list[Any] | None:
    """The row of one LiteLLM entry with its standard keys only (no service tier)."""

    def get(key: str) -> Decimal | None:
        return per_million(entry.get(key), rounded, f"{name}.{key}")

    inp, out = get("input_cost_per_token"), get("output_cost_per_token")
    if inp is None or out is None:
        return None
    thresholds: dict[int, list[Any]] = {}
    for key in entry:
        m = THRESHOLD.match(key)
        if not m or entry[key] is None:
            continue
        above = int(m.group(2)) * (1000 if m.group(3) else 1)
        tier = thresholds.setdefault(above, [above, None, None, None, None, None, None])
        kind = m.group(1)
        if kind in KINDS:
            tier[1 + KINDS.index(kind)] = get(key)
    tiers = [trim(thresholds[a]) for a in sorted(thresholds)]
    return trim(
        [
            inp,
            out,
            get("cache_read_input_token_cost"),
            get("cache_creation_input_token_cost"),
            get("cache_creation_input_token_cost_above_1hr"),
            get("output_cost_per_reasoning_token"),
            tiers or None,
        ]
    )


def _standard(entry: dict[str, Any]) -> dict[str, Any]:
    suffixes = (*SERVICE_TIERS, BATCH, *OTHER_SUFFIXES)
    return {k: v for k, v in entry.items() if not k.endswith(suffixes)}


def _service_tier(entry: dict[str, Any], suffix: str) -> dict[str, Any] | None:
    """The entry as billed at a service tier: its ``<key><suffix>`` prices over the standard
    ones; reasoning follows the tier's output price when the tier lists one and no reasoning
    price of its own."""
    own = {k[: -len(suffix)]: v for k, v in entry.items() if k.endswith(suffix) and v is not None}
    if not any(k.startswith(KINDS) for k in own):
        return None
    variant = {**_standard(entry), **own}
    if "output_cost_per_token" in own and "output_cost_per_reasoning_token" not in own:
        variant.pop("output_cost_per_reasoning_token", None)
    return variant


def _batch(entry: dict[str, Any]) -> dict[str, Any] | None:
    """The entry as billed in a batch, where it lists a batch input or output price (LiteLLM's
    batch cost logic): each ``<key>_batches`` price over the standard one; input and output
    prices the batch list leaves out, at every tier, at half the standard ones; reasoning at
    the batch output price. With a batch input price, cache reads keep the standard price and
    cache writes not listed follow the batch input price; without one, cache prices are half
    the standard ones (1-hour writes at the 5-minute price). The same holds at each long-context
    tier: an input or output price the batch list leaves out there is half the tier's standard
    price (LiteLLM applies the flat batch price above a tier instead; Google and Anthropic bill
    batch at half of every long-context price, as the list's own batch tiers of
    ``gemini-2.5-pro`` are)."""
    own = {k[: -len(BATCH)]: v for k, v in entry.items() if k.endswith(BATCH) and v is not None}
    if not any(k.startswith(("input_cost_per_token", "output_cost_per_token")) for k in own):
        return None
    halved = ["input_cost_per_token", "output_cost_per_token"]
    dropped = ["output_cost_per_reasoning_token", "cache_creation_input_token_cost_above_1hr"]
    if "input_cost_per_token" in own:
        dropped.append("cache_creation_input_token_cost")
    else:
        halved += ["cache_read_input_token_cost", "cache_creation_input_token_cost"]
    variant: dict[str, Any] = {}
    for key, value in _standard(entry).items():
        m = THRESHOLD.match(key)
        kind = m.group(1) if m else key
        if kind in dropped:
            continue
        if kind in halved and isinstance(value, int | float) and not isinstance(value, bool):
            variant[key] = Decimal(repr(float(value))) * BATCH_DISCOUNT
        else:
            variant[key] = value
    variant.update(own)
    return variant


def _windows(off_peak: dict[str, Any]) -> list[list[int]]:
    """LiteLLM's off-peak rules -> ``[weekday bits, start minute, end minute]`` (UTC)."""
    rules: list[tuple[Any, Any]] = []
    if off_peak.get("hours_utc") is not None:
        rules.append((None, off_peak["hours_utc"]))
    rules.extend(
        (rule.get("weekdays"), rule.get("hours_utc"))
        for rule in off_peak.get("windows") or ()
        if isinstance(rule, dict)
    )
    out = []
    for weekdays, hours in rules:
        bits = 0x7F
        if weekdays is not None:
            bits = 0
            for day in weekdays:
                n = WEEKDAYS.get(str(day).strip().lower()[:3]) if isinstance(day, str) else day
                if isinstance(n, int) and 1 <= n <= 7:
                    bits |= 1 << (n - 1)
        for window in [hours] if isinstance(hours, str) else hours or ():
            try:
                start, end = (
                    int(t[:2]) * 60 + int(t[3:5]) for t in (p.strip() for p in window.split("-"))
                )
            except (ValueError, AttributeError):
                continue
            if bits:
                out.append([bits, start, end])
    return out


def row_of(entry: dict[str, Any], rounded: list[str], name: str, provider: str) -> list[Any] | None:
    """One LiteLLM entry -> a row (see the module docstring), or ``None`` when it has no token
    prices."""
    if provider == "fireworks_ai" and entry.get("cache_read_input_token_cost") is None:
        inp = per_million(entry.get("input_cost_per_token"), [], name)
        if inp is not None:
            cache_read = inp * FIREWORKS_CACHE_READ
            entry = {**entry, "cache_read_input_token_cost": float(cache_read / 1_000_000)}
    row = _flat(_standard(entry), rounded, name)
    if row is None:
        return None
    extra: dict[str, Any] = {}
    tiers: dict[str, Any] = {}
    variants = [(tier, _service_tier(entry, suffix)) for suffix, tier in SERVICE_TIERS.items()]
    variants.append(("batch", _batch(entry)))
    for tier, variant in variants:
        if variant is not None:
            tier_row = _flat(variant, rounded, f"{name}_{tier}")
            if tier_row is not None and tier_row != row:
                tiers[tier] = tier_row
    if tiers:
        extra["service_tiers"] = tiers
    if provider in INCLUSIVE and any(len(r) > 6 for r in (row, *tiers.values())):
        extra["inclusive"] = True
    specific = entry.get("provider_specific_entry")
    if isinstance(specific, dict):
        for field_name, names in (("geo", GEOS), ("speed", SPEEDS)):
            multipliers = {
                k: float(v)
                for k, v in specific.items()
                if k in names and isinstance(v, int | float) and not isinstance(v, bool) and v != 1
            }
            if multipliers:
                extra[field_name] = multipliers
    off_peak = entry.get("off_peak_pricing")
    if isinstance(off_peak, dict):
        windows = _windows(off_peak)
        overlay = {k: v for k, v in off_peak.items() if k in KINDS}
        peak_row = _flat({**_standard(entry), **overlay}, rounded, f"{name}.off_peak")
        if windows and peak_row is not None and overlay:
            if len(peak_row) > 6:
                peak_row = trim(peak_row[:6])  # a flat rate for the whole request
            extra["off_peak"] = {"row": peak_row, "windows": windows}
    if extra:
        row = [*_seven(row), extra]
    return row


def _seven(row: list[Any]) -> list[Any]:
    """A row's seven price fields, ``None`` where not listed."""
    return [*row, None, None, None, None, None, None, None][:7]


def strip_prefix(key: str) -> str:
    name = key.lower()
    for prefix in PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def aliases(name: str) -> list[str]:
    """Other names a caller may use for a listed name: the plain name of a Bedrock id, the
    ``-<version>`` and plain forms of a Vertex ``@version``."""
    out = []
    m = BEDROCK_ID.match(name)
    if m:
        out.append(m.group(1))
    if "@" in name:
        base, _, version = name.partition("@")
        if version.isdigit():
            out.append(f"{base}-{version}")
        out.append(base)
    return out


def region_of(key: str) -> tuple[str, str, str] | None:
    """``(provider, region, rest)`` of a regional LiteLLM key, else ``None``."""
    m = REGIONAL.match(key.lower())
    if not m:
        return None
    provider, region, rest = m.groups()
    if provider == "bedrock" and BEDROCK_REGION.match(region):
        return provider, region, rest
    if provider == "azure" and region in AZURE_REGIONS:
        return provider, region, rest
    return None


def build(source: dict[str, Any]) -> tuple[dict[str, Any], list[str], dict[str, int]]:
    """LiteLLM's list -> ``({"models", "providers", "regions"}, rounded, rows per provider)``."""
    rounded: list[str] = []
    listed: dict[tuple[str, str], list[Any]] = {}
    regional: dict[tuple[str, str, str], list[Any]] = {}
    for key in sorted(source):
        entry = source[key]
        if not isinstance(entry, dict) or entry.get("mode") not in MODES:
            continue
        provider = str(entry.get("litellm_provider", ""))
        ours = PROVIDERS.get(provider) or ("vertex_ai" if provider.startswith("vertex_ai") else "")
        if not ours or SKIPPED.search(key.lower()):
            continue
        row = row_of(entry, rounded, key, ours)
        if row is None:
            continue
        region = region_of(key)
        if region is not None:
            provider_name, region_name, rest = region
            regional[(provider_name, region_name, strip_prefix(rest))] = row
            continue
        name = strip_prefix(key)
        previous = listed.get((name, ours))
        # Two LiteLLM keys for one name (``gemini-x`` and ``gemini/gemini-x``): the prefixed
        # key is the provider's own route; keep the first in sorted order otherwise.
        if previous is None or key.lower().startswith(f"{ours}/"):
            listed[(name, ours)] = row

    derived: dict[tuple[str, str], list[Any]] = {}
    for (name, provider), row in sorted(listed.items()):
        for alias in aliases(name):
            if (alias, provider) not in listed:
                derived.setdefault((alias, provider), row)
    # Undated alias of dated snapshots: the newest snapshot's prices.
    snapshots: dict[tuple[str, str], tuple[str, list[Any]]] = {}
    for (name, provider), row in sorted({**derived, **listed}.items()):
        m = DATED.match(name)
        if m:
            base, date = m.group(1), m.group(2).replace("-", "")
            if base.endswith("-latest"):
                continue
            best = snapshots.get((base, provider))
            if best is None or date > best[0]:
                snapshots[(base, provider)] = (date, row)
    for snapshot, (_, row) in snapshots.items():
        if snapshot not in listed:
            derived.setdefault(snapshot, row)

    merged = {**derived, **listed}

    def precedence(item: tuple[tuple[str, str], list[Any]]) -> tuple[bool, int]:
        return (item[0] not in listed, RANK[item[0][1]])

    models: dict[str, list[Any]] = {}
    for (name, _), row in sorted(merged.items(), key=precedence):
        models.setdefault(name, row)
    providers: dict[str, dict[str, list[Any]]] = {}
    for (name, provider), row in merged.items():
        if models[name] != row:
            providers.setdefault(provider, {})[name] = row
    regions: dict[str, dict[str, dict[str, list[Any]]]] = {}
    for (provider, region_name, name), row in sorted(regional.items()):
        rows = regions.setdefault(provider, {}).setdefault(region_name, {})
        rows[name] = row
        for alias in aliases(name):
            rows.setdefault(alias, row)
    coverage: dict[str, int] = {}
    for _, provider in listed:
        coverage[provider] = coverage.get(provider, 0) + 1
    for provider, _, _ in regional:
        coverage[f"{provider} (regional)"] = coverage.get(f"{provider} (regional)", 0) + 1
    return {"models": models, "providers": providers, "regions": regions}, rounded, coverage


def to_json(value: Any) -> Any:
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, list):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    return value


# ---------------------------------------------------------------------------------------------
# versions


def split(row: list[Any]) -> tuple[list[Any], dict[str, Any]]:
    """A row -> (its prices, its extra dict)."""
    if len(row) == 8 and isinstance(row[7], dict):
        return row[:7], dict(row[7])
    return list(row), {}


def _prices_part(row: list[Any]) -> list[Any]:
    """What a version compares by: the row without its date and history."""
    prices, extra = split(row)
    extra.pop("since", None)
    extra.pop("history", None)
    return trim([*_seven(prices), extra or None])


def _with(row: list[Any], since: str | None, history: list[Any]) -> list[Any]:
    """A row with its effective date (``None``: the table's ``since``) and older versions."""
    prices, extra = split(row)
    extra.pop("since", None)
    extra.pop("history", None)
    if since is not None:
        extra["since"] = since
    if history:
        extra["history"] = history
    return trim([*_seven(prices), extra or None])


@dataclass
class Update:
    """What an update changed: rows added, changed (with a new version), removed, kept, and the
    prices that moved more than 100x (``(name, kind, old, new)``)."""

    table: dict[str, Any]
    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    big_moves: list[tuple[str, str, float, float]] = field(default_factory=list)
    rounded: list[str] = field(default_factory=list)
    coverage: dict[str, int] = field(default_factory=dict)


ROW_KINDS = ("input", "output", "cache_read", "cache_write", "cache_write_1h", "reasoning")


def _prices_of(row: list[Any], where: str = "") -> dict[str, Any]:
    """Every price a row holds, by a name: the base kinds (``input``), each tier's
    (``above 200000 input``), each service tier's (``batch input``, ``batch above 200000
    input``) and the off-peak ones (``off_peak input``)."""
    prices, extra = split(row)
    out: dict[str, Any] = {}
    for i, kind in enumerate(ROW_KINDS):
        if i < len(prices) and isinstance(prices[i], int | float):
            out[f"{where}{kind}"] = prices[i]
    for tier in prices[6] if len(prices) > 6 and isinstance(prices[6], list) else ():
        for i, kind in enumerate(ROW_KINDS, start=1):
            if i < len(tier) and isinstance(tier[i], int | float):
                out[f"{where}above {tier[0]} {kind}"] = tier[i]
    for name, tier_row in (extra.get("service_tiers") or {}).items():
        out.update(_prices_of(tier_row, f"{where}{name} "))
    off_peak = extra.get("off_peak")
    if isinstance(off_peak, dict) and isinstance(off_peak.get("row"), list):
        out.update(_prices_of(off_peak["row"], f"{where}off_peak "))
    return out


def _moves(name: str, old: list[Any], new: list[Any]) -> Iterable[tuple[str, str, float, float]]:
    """The prices of a row that moved more than ``BIG_MOVE`` x either way (or to or from 0):
    every kind, at every tier, service tier and off-peak window the row lists in both
    versions."""
    before, after = _prices_of(old), _prices_of(new)
    for kind, a in before.items():
        b = after.get(kind)
        if b is None or a == b:
            continue
        if (a == 0) != (b == 0) or (a and b and max(a / b, b / a) > BIG_MOVE):
            yield (name, kind, float(a), float(b))


def _rows(table: dict[str, Any]) -> dict[str, list[Any]]:
    """Every row of a table by a display name (``provider:name``, ``provider/region:name``)."""
    out = {f":{k}": v for k, v in table.get("models", {}).items()}
    for provider, rows in table.get("providers", {}).items():
        out.update({f"{provider}:{k}": v for k, v in rows.items()})
    for provider, regions in table.get("regions", {}).items():
        for region, rows in regions.items():
            out.update({f"{provider}/{region}:{k}": v for k, v in rows.items()})
    return out


def _set_row(table: dict[str, Any], key: str, row: list[Any]) -> None:
    where, _, name = key.partition(":")
    if not where:
        table["models"][name] = row
    elif "/" in where:
        provider, region = where.split("/", 1)
        table["regions"][provider][region][name] = row
    else:
        table["providers"][where][name] = row


def update(
    source: dict[str, Any], previous: dict[str, Any] | None, effective: str, label: str
) -> Update:
    """Build the table from ``source``; against ``previous`` (a table of this format), keep
    unchanged rows with their dates and history, date changed rows ``effective`` with the old
    version in ``history``, and flag prices that moved more than 100x."""
    built, rounded, coverage = build(source)
    table = to_json(built)
    result = Update(table=table, rounded=rounded, coverage=coverage)
    current = previous is not None and previous.get("format") == FORMAT
    old_rows = _rows(previous) if previous is not None and current else {}
    # The table's own date: rows without a ``since`` of their own are in force since then.
    base = (previous or {}).get("since") if current else None
    base = base or effective

    def dated(row: list[Any], since: str, history: list[Any]) -> list[Any]:
        return _with(row, None if since == base else since, history)

    for key, row in _rows(table).items():
        old = old_rows.get(key)
        if old is None:
            result.added.append(key)
            _set_row(table, key, dated(row, effective, []))
            continue
        _, old_extra = split(old)
        since = old_extra.get("since", base)
        history = old_extra.get("history", [])
        if _prices_part(old) == _prices_part(row):
            _set_row(table, key, dated(row, since, history))
            continue
        if effective < since:
            raise ValueError(
                f"{key}: effective date {effective} is before its current version's ({since})"
            )
        result.changed.append(key)
        result.big_moves.extend(_moves(key, old, row))
        if since == effective:  # changed twice the same day: the later one wins
            _set_row(table, key, dated(row, effective, history))
        else:
            old_version = [since, _prices_part(old)]
            _set_row(table, key, dated(row, effective, [old_version, *history]))
    result.removed = sorted(set(old_rows) - set(_rows(table)))
    table.update(
        {
            "format": FORMAT,
            "source": label,
            "since": base,
            "updated": effective,
            "units": "USD per 1M tokens",
            "row": [*ROW_KINDS, "tiers", "extra"],
            "tier": ["above_prompt_tokens", *ROW_KINDS],
        }
    )
    return result


def write(table: dict[str, Any], path: Path) -> int:
    """Write a table as sorted, one-row-per-line JSON (a refresh diff shows only real changes);
    returns its size in bytes."""
    text = json.dumps(table, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    text = text.replace('],"', '],\n"') + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return len(text)
