"""Model prices: the bundled table, ``register_model`` and the cost of a call.

Prices are USD per 1M tokens with at most six decimals, so costs are exact integers of pico-USD
(1e-12 USD) computed in the Rust core (:class:`llmtally._core.Prices`). Cost = uncached prompt x
input + cache reads x cache-read price + cache writes x cache-write price (1 h writes at their own
price) + completion x output (reasoning at its own price where the model has one); above a long
context tier's threshold, that tier's input and output prices apply.

The bundled table (``llmtally/data/prices.json``) is generated from LiteLLM's public price list by
``scripts/update_prices.py`` (see docs/pricing.md); it is read from the package on first use,
never from the network. Models registered with :func:`register_model` win over it.

Model names are matched exactly first, then as variants: any case, provider prefixes
(``openai/``, ``azure/``, ``bedrock/...``, ``vertex_ai/``, ``models/``), Bedrock ids
(``us.anthropic.claude-...-v2:0``, ARNs), Vertex ``@version`` names, date suffixes
(``-2024-08-06``, ``-20241022``) and ``-latest``. The result is cached per ``(model, provider)``,
so a repeated lookup is one dict hit.

An unknown model is not an error: its tokens are counted and its cost is ``None``; the first miss
of each name logs a warning and every miss is counted (:func:`unpriced_models`).

>>> from llmtally.usage import Usage
>>> usage = Usage(prompt_tokens=1200, completion_tokens=300, cached_tokens=1024)
>>> cost_pusd(usage, "gpt-4o")  # 176 x 2.50 + 1024 x 1.25 + 300 x 10.00 per 1M tokens
4720000000
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Iterable, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

from llmtally._names import MAX_NAME_CHARS, OTHER
from llmtally._native import PUSD_PER_USD, Prices, Usage
from llmtally.errors import ConfigError

__all__ = [
    "Prices",
    "cost_pusd",
    "cost_usd",
    "lookup",
    "register_model",
    "unpriced_models",
]

logger = logging.getLogger("llmtally.pricing")

_MAX_CACHED = 50_000  # resolved (model, provider) pairs; a flood of distinct names resets it
_MAX_UNPRICED_NAMES = 10_000  # names tracked in unpriced_models(); later ones count as "<other>"

# Provider names as callers write them -> the table's names.
_PROVIDER_ALIASES = {
    "google": "gemini",
    "google_genai": "gemini",
    "google-genai": "gemini",
    "google_ai_studio": "gemini",
    "vertex": "vertex_ai",
    "vertexai": "vertex_ai",
    "google_vertexai": "vertex_ai",
    "google-vertex": "vertex_ai",
    "azure_openai": "azure",
    "azure-openai": "azure",
    "azure_text": "azure",
    "azure-ai": "azure_ai",
    "aws": "bedrock",
    "aws_bedrock": "bedrock",
    "aws-bedrock": "bedrock",
    "amazon_bedrock": "bedrock",
    "bedrock_converse": "bedrock",
    "together": "together_ai",
    "togetherai": "together_ai",
    "fireworks": "fireworks_ai",
    "x-ai": "xai",
    "grok": "xai",
    "mistralai": "mistral",
    "text-completion-openai": "openai",
}
# Leading path segments of a model name that name a provider or a route, not the model.
_PREFIXES = {
    "openai": "openai",
    "anthropic": "anthropic",
    "gemini": "gemini",
    "google": "gemini",
    "vertex_ai": "vertex_ai",
    "vertex_ai_beta": "vertex_ai",
    "mistral": "mistral",
    "deepseek": "deepseek",
    "groq": "groq",
    "xai": "xai",
    "together_ai": "together_ai",
    "fireworks_ai": "fireworks_ai",
    "bedrock": "bedrock",
    "azure": "azure",
    "azure_ai": "azure_ai",
    "openrouter": "",
    "litellm_proxy": "",
    "converse": "",
    "invoke": "",
    "models": "",
}
_REGION = re.compile(r"^[a-z]{2}(?:-gov)?-[a-z]+-\d$")
# Cross-region inference profiles whose plain model's price is theirs too when they have none of
# their own; a GovCloud profile (``us-gov.``) is billed at GovCloud prices, never the plain one.
_CROSS_REGION = re.compile(r"^(?:us|eu|apac|au|jp|ca|global)\.(?=[a-z0-9-]+\.)")
_ARN = re.compile(r"^arn:aws[a-z-]*:bedrock:([a-z0-9-]*):")
_BEDROCK_VENDOR = re.compile(
    r"^(?:anthropic|meta|mistral|amazon|cohere|ai21|deepseek|openai|qwen|writer|moonshotai"
    r"|minimax|zai|nvidia)\.(?=.)"
)
_BEDROCK_VERSION = re.compile(r"(?:-v\d+(?::\d+)?|:\d+)$")
_DATE = re.compile(r"(?:-\d{4}-\d{2}-\d{2}|-\d{8}|-\d{2}-\d{4}|-\d{2}-\d{2}|-\d{3,4})$")
_FINE_TUNED = re.compile(r"^(ft:[^:]+):.*$")

_AZURE_REGIONS = frozenset({"eu", "us", "us-gov", "apac", "global", "global-standard"})

_lock = threading.Lock()
_generation = 0  # bumped by register_model; a resolve started before it is not cached
_cache: dict[tuple[Any, Any], Any] = {}  # (model, provider) -> Prices | None
_MISSING: Any = object()
_registered: dict[tuple[str | None, str], Prices] = {}
_registered_any: dict[str, Prices] = {}  # by name, whatever the provider (last registered)
_unpriced: dict[str, int] = {}
_bundled: _Table | None = None

BUNDLED = Path(__file__).parent / "data" / "prices.json"


def table_path() -> Path:
    """The price table in use: ``LLMTALLY_PRICES`` when set, else the one ``llmtally prices
    update`` wrote (``$XDG_DATA_HOME/llmtally/prices.json``) when present, else the bundled
    one."""
    given = os.environ.get("LLMTALLY_PRICES", "").strip()
    if given:
        return Path(given)
    user = user_table_path()
    return user if user.is_file() else BUNDLED


def user_table_path() -> Path:
    """Where ``llmtally prices update`` writes: ``$XDG_DATA_HOME/llmtally/prices.json``."""
    data_home = os.environ.get("XDG_DATA_HOME", "").strip() or str(Path.home() / ".local" / "share")
    return Path(data_home) / "llmtally" / "prices.json"


def _day(at: float | None) -> str:
    """The UTC date (``YYYY-MM-DD``) of a UNIX time, default now."""
    moment = time.time() if at is None else at
    return datetime.datetime.fromtimestamp(moment, datetime.UTC).date().isoformat()


class _Table:
    """The table's rows, each version turned into :class:`Prices` on its first use."""

    def __init__(self, doc: dict[str, Any]) -> None:
        if doc.get("format") != 2:
            raise ConfigError(f"price table format {doc.get('format')!r} is not 2")
        self.source: str = doc.get("source", "")
        self.since: str = doc.get("since", "")
        self.models: dict[str, list[Any]] = doc["models"]
        self.providers: dict[str, dict[str, list[Any]]] = doc["providers"]
        self.regions: dict[str, dict[str, dict[str, list[Any]]]] = doc.get("regions", {})
        self._built: dict[tuple[int, int], Prices] = {}

    def row(self, provider: str | None, name: str, region: str | None = None) -> list[Any] | None:
        if region is not None:
            return self.regions.get(provider or "", {}).get(region, {}).get(name)
        row = None
        if provider is not None:
            rows = self.providers.get(provider)
            if rows is not None:
                row = rows.get(name)
        if row is None:
            row = self.models.get(name)
        return row

    def version(self, row: list[Any], day: str) -> tuple[Prices, bool]:
        """The version of ``row`` in force on ``day``, and whether a later one is dated after
        ``day`` (a price announced ahead)."""
        extra = row[7] if len(row) == 8 and isinstance(row[7], dict) else {}
        versions = [(extra.get("since", self.since), row), *extra.get("history", ())]
        index = next((i for i, (since, _) in enumerate(versions) if since <= day), None)
        if index is None:
            index = len(versions) - 1  # before the first known version: the earliest one
        key = (id(row), index)
        prices = self._built.get(key)
        if prices is None:
            since, version_row = versions[index]
            prices = self._built[key] = _prices_of_row(version_row, since)
        return prices, index > 0


def _prices_of_row(
    row: list[Any], version: str | None = None, inclusive: bool | None = None
) -> Prices:
    """A table row (see ``llmtally.price_table``) as :class:`Prices`; a service tier's or the
    off-peak row takes the ``inclusive`` rule of the row it belongs to."""
    padded = [*row, None, None, None, None, None, None, None, None][:8]
    extra: dict[str, Any] = padded[7] or {}
    tiers = padded[6]
    off_peak = extra.get("off_peak")
    if inclusive is None:
        inclusive = bool(extra.get("inclusive"))
    return Prices(
        padded[0],
        padded[1],
        padded[2],
        padded[3],
        padded[4],
        padded[5],
        tiers or None,
        inclusive=inclusive,
        version=version,
        service_tiers={
            name: _prices_of_row(tier_row, version, inclusive)
            for name, tier_row in (extra.get("service_tiers") or {}).items()
        }
        or None,
        geo=sorted((extra.get("geo") or {}).items()) or None,
        speed=sorted((extra.get("speed") or {}).items()) or None,
        off_peak=None if off_peak is None else _prices_of_row(off_peak["row"], version, inclusive),
        off_peak_windows=None if off_peak is None else [tuple(w) for w in off_peak["windows"]],
    )


def _table() -> _Table:
    global _bundled
    if _bundled is None:
        table = _Table(json.loads(table_path().read_text("utf-8")))
        with _lock:
            if _bundled is None:
                _bundled = table
    return _bundled


def reload() -> None:
    """Read the price table again (after ``llmtally prices update``) and forget cached
    lookups."""
    global _bundled, _generation
    with _lock:
        _bundled = None
        _generation += 1
        _cache.clear()


def _provider_name(provider: str | None) -> str | None:
    if not provider:
        return None
    p = provider.strip().lower()
    if p.startswith("vertex_ai"):
        return "vertex_ai"
    return _PROVIDER_ALIASES.get(p, p) or None


def _names(model: str) -> tuple[str | None, str | None, str, list[str]]:
    """The provider a model name implies (or ``None``), the region it names (``bedrock/<region>/``
    or ``azure/<eu|us|global|...>/``, else ``None``), the name without provider prefixes and
    region, and the candidate names, best first.

    The name as given (lower case) comes first, then the name after each provider prefix is
    removed (``groq/openai/gpt-oss-120b`` -> ``openai/gpt-oss-120b`` -> ``gpt-oss-120b``), then
    generalizations of those (Vertex versions, Bedrock ids, ``-latest``, dates). A regional
    name's candidates are the names after its region only.
    """
    name = model.strip().lower()
    implied: str | None = None
    region: str | None = None
    forms = [name]
    if name.startswith("arn:"):  # Bedrock inference profile / foundation model ARN
        arn = _ARN.match(name)
        name = name.rsplit("/", 1)[-1]
        implied = "bedrock"
        if arn is not None and _REGION.match(arn.group(1)):
            region = arn.group(1)  # the region the ARN names: its price, or none
            forms = []
        forms.append(name)
    while "/" in name:
        head, rest = name.split("/", 1)
        if head in _PREFIXES:
            implied = implied or _PREFIXES[head] or None
        elif region is None and _is_region(implied, head):
            region = head
            forms = []
        elif not (implied == "bedrock" and head == "*"):
            break  # other paths are part of the name
        name = rest
        forms.append(name)
    found = list(dict.fromkeys(forms))
    i = 0
    while i < len(found) and len(found) < 32:
        for variant in _variants(found[i]):
            if variant and variant not in found:
                found.append(variant)
        i += 1
    return implied, region, name, found


def _is_region(provider: str | None, segment: str) -> bool:
    if provider == "bedrock":
        return _REGION.match(segment) is not None
    return provider == "azure" and segment in _AZURE_REGIONS


def _variants(name: str) -> Iterable[str]:
    """One-step generalizations of a model name, most specific first."""
    m = _FINE_TUNED.match(name)
    if m:
        yield m.group(1)
    if "@" in name:
        base, _, version = name.partition("@")
        if version.isdigit():
            yield f"{base}-{version}"
        yield base
    stripped = _CROSS_REGION.sub("", name)
    if stripped != name:
        yield stripped
    unversioned = _BEDROCK_VERSION.sub("", name)
    if unversioned != name and "." in name:
        yield unversioned
    if _BEDROCK_VENDOR.match(name):
        yield _BEDROCK_VENDOR.sub("", unversioned)
    if name.endswith("-latest"):
        yield name[: -len("-latest")]
    undated = _DATE.sub("", name)
    if undated != name:
        yield undated


def _resolve(model: Any, provider: Any, at: float | None = None) -> tuple[Prices | None, bool]:
    """The prices of a model at ``at`` (default now), and whether the answer may change later
    (a version dated ahead of now: not to be cached)."""
    if not isinstance(model, str) or not (provider is None or isinstance(provider, str)):
        return None, False
    implied, region, _, names = _names(model)
    p = _provider_name(provider) or implied
    if p is not None:
        # "xai/grok-4.3" served by xAI is xAI's grok-4.3, not another provider's model
        # literally named "xai/grok-4.3".
        names = [n for n in names if not n.startswith(f"{p}/")] or names
    registered, registered_any = _registered, _registered_any
    if registered and region is None:
        for name in names:
            found = registered.get((p, name)) if p is not None else None
            if found is None:
                found = registered.get((None, name))
            if found is None and p is None:
                found = registered_any.get(name)
            if found is not None:
                return found, False
    table = _table()
    day = _day(at)
    for name in names:
        row = table.row(p, name, region)
        if row is not None:
            return table.version(row, day)
    return None, False  # a regional name without a regional price: never the global one


def lookup(model: str, provider: str | None = None, *, at: float | None = None) -> Prices | None:
    """The prices of ``model`` (served by ``provider`` when given), in force at ``at`` (UNIX
    seconds; default now), or ``None`` when unknown.

    A miss is counted (see :func:`unpriced_models`) and logged once per model name. A name that
    carries a region (``bedrock/us-gov-west-1/...``, ``azure/eu/...``) has the regional price,
    or none.

    >>> lookup("openai/gpt-4o-2024-08-06").input_price
    2.5
    >>> lookup("claude-sonnet-4-5@20250929", "vertex_ai").cache_write_1h_price
    6.0
    """
    if at is not None:
        if _too_long(model) or _too_long(provider):
            _count_miss(OTHER, None if _too_long(provider) else provider)
            return None
        prices, _ = _resolve(model, provider, at)
    else:
        key = (model, provider)
        prices = _cache.get(key, _MISSING)
        if prices is _MISSING:
            if _too_long(model) or _too_long(provider):
                # No listed name is this long: unpriced, and neither cached nor kept by name.
                _count_miss(OTHER, None if _too_long(provider) else provider)
                return None
            prices = _lookup_slow(key)
    if prices is None:
        _count_miss(model, provider)
    return prices


def _too_long(name: Any) -> bool:
    return isinstance(name, str) and len(name) > MAX_NAME_CHARS


def cached(model: str, provider: str | None) -> Prices | None:
    """The prices of a model already looked up (``provider`` ``"unknown"`` counts as none);
    ``None`` when not looked up yet or unknown. Never counts a miss: for the hot path, which
    falls back to :func:`lookup`."""
    return _cache.get((model, None if provider == "unknown" else provider))


def _lookup_slow(key: tuple[Any, Any]) -> Prices | None:
    generation = _generation
    prices, changes = _resolve(*key)
    if not changes:
        with _lock:
            if generation == _generation:
                if len(_cache) >= _MAX_CACHED:
                    _cache.clear()
                _cache[key] = prices
    return prices


def _count_miss(model: Any, provider: Any) -> None:
    name = model if isinstance(model, str) else repr(model)
    with _lock:
        count = _unpriced.get(name)
        if count is None and len(_unpriced) >= _MAX_UNPRICED_NAMES:
            name = "<other>"
            count = _unpriced.get(name)
        _unpriced[name] = (count or 0) + 1
    if count is None:
        logger.warning(
            "no price for model %r (provider %r): its tokens are counted, its cost is None;"
            " price it with llmtally.register_model(...)",
            model,
            provider,
        )


def unpriced_models() -> dict[str, int]:
    """Lookups that found no price, per model name (a snapshot).

    >>> _ = lookup("my-own-model-7b")
    >>> unpriced_models()["my-own-model-7b"] >= 1
    True
    """
    with _lock:
        return dict(_unpriced)


def cost_pusd(
    usage: Usage,
    model: str,
    provider: str | None = None,
    *,
    service_tier: str | None = None,
    inference_geo: str | None = None,
    speed: str | None = None,
    at: float | None = None,
) -> int | None:
    """The table cost of ``usage`` in pico-USD (1e-12 USD), or ``None`` when unknown.

    ``service_tier`` (``"flex"``, ``"priority"``, ``"ultrafast"``, ``"batch"``) bills at that
    tier's prices where the model lists them; ``inference_geo`` applies the model's geography
    multiplier (Anthropic ``"us"``: 1.1x) and ``speed`` its speed multiplier (Anthropic fast
    mode, ``"fast"``, where listed); ``at`` (UNIX seconds, default now) picks the price version in
    force and the off-peak window. ``None`` when the model has no price or the usage lacks its
    prompt/completion split. Raises ``OverflowError`` past the 64-bit pico-USD range.

    >>> from llmtally.usage import Usage
    >>> cost_pusd(Usage(prompt_tokens=1000, completion_tokens=100), "gpt-4o-mini")
    210000000
    >>> cost_pusd(Usage(prompt_tokens=1000, completion_tokens=100), "gpt-5", service_tier="flex")
    1125000000
    """
    prices = lookup(model, provider, at=at)
    if prices is None:
        return None
    return prices.usage_cost_pusd(
        usage, service_tier=service_tier, inference_geo=inference_geo, speed=speed, at=at
    )


def cost_usd(
    usage: Usage,
    model: str,
    provider: str | None = None,
    *,
    service_tier: str | None = None,
    inference_geo: str | None = None,
    speed: str | None = None,
    at: float | None = None,
) -> float | None:
    """The table cost of ``usage`` in USD, or ``None`` when unknown (see :func:`cost_pusd`).

    >>> from llmtally.usage import Usage
    >>> cost_usd(Usage(prompt_tokens=1000, completion_tokens=100), "gpt-4o")
    0.0035
    """
    pusd = cost_pusd(
        usage,
        model,
        provider,
        service_tier=service_tier,
        inference_geo=inference_geo,
        speed=speed,
        at=at,
    )
    return None if pusd is None else pusd / PUSD_PER_USD


def _price(arg: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal):
        raise ConfigError(f"{arg} must be a number (USD per 1M tokens), got {value!r}")
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise ConfigError(f"{arg} must be a finite number >= 0 (USD per 1M tokens), got {value!r}")
    return number


def _required_price(arg: str, value: Any) -> float:
    number = _price(arg, value)
    if number is None:
        raise ConfigError(f"{arg} is required (USD per 1M tokens)")
    return number


def _tiers(value: Any) -> list[list[float | None]] | None:
    """``(above_prompt_tokens, input, output[, cache_read[, cache_write[, cache_write_1h[,
    reasoning]]]])`` per tier."""
    if value is None:
        return None
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise ConfigError(
            "tiers must be a list of (above_prompt_tokens, input_price, output_price)"
        )
    out: list[list[float | None]] = []
    for i, tier in enumerate(value):
        if (
            isinstance(tier, str | bytes)
            or not isinstance(tier, Sequence)
            or not 3 <= len(tier) <= 7
        ):
            raise ConfigError(
                f"tiers[{i}] must be (above_prompt_tokens, input_price, output_price"
                f"[, cache_read_price[, cache_write_price[, cache_write_1h_price"
                f"[, reasoning_price]]]]), got {tier!r}"
            )
        above, inp, out_price, *cache = tier
        if isinstance(above, bool) or not isinstance(above, int) or above < 0:
            raise ConfigError(f"tiers[{i}] above_prompt_tokens must be an int >= 0, got {above!r}")
        if any(above == t[0] for t in out):
            raise ConfigError(f"tiers[{i}] repeats the threshold {above}")
        row: list[float | None] = [
            above,
            _required_price(f"tiers[{i}] input_price", inp),
            _required_price(f"tiers[{i}] output_price", out_price),
        ]
        kinds = ("cache_read_price", "cache_write_price", "cache_write_1h_price", "reasoning_price")
        for name, price in zip(kinds, cache, strict=False):
            row.append(_price(f"tiers[{i}] {name}", price))
        out.append(row)
    return out


def register_model(
    name: str,
    *,
    provider: str | None = None,
    input_price: float,
    output_price: float,
    cache_read_price: float | None = None,
    cache_write_price: float | None = None,
    cache_write_1h_price: float | None = None,
    reasoning_price: float | None = None,
    tiers: list[tuple[int, float, float]] | None = None,
) -> Prices:
    """Price a custom or self-hosted model, or override the bundled price of a known one.

    Prices are USD per 1M tokens, at most six decimals. ``cache_read_price`` and
    ``cache_write_price`` default to the input price, ``cache_write_1h_price`` to the cache-write
    price, ``reasoning_price`` to the output price. ``tiers`` lists long-context prices as
    ``(above_prompt_tokens, input_price, output_price[, cache_read_price[, cache_write_price[,
    cache_write_1h_price[, reasoning_price]]]])``: a call whose prompt is above a threshold is
    priced at that tier, every kind of token; a kind the tier does not list keeps its own price
    from below when it has one, else derives from the tier's (cache prices from the tier's
    input, reasoning from the tier's output). The response of a call priced so says
    ``price_version: "registered"``. With ``provider``, the price applies to that provider's
    calls (and to calls that name no provider); without, to every provider.

    The name matches like the bundled table's names (any case, with or without a provider prefix,
    with a date suffix), and a registered name wins over the table, for its variants too.
    Registering a name again replaces its prices.

    Raises:
        ConfigError: a bad argument (the message names it); also a ``ValueError``.

    >>> register_model("acme-llm-70b", input_price=0.6, output_price=2.4).output_price
    2.4
    >>> cost_usd(Usage(prompt_tokens=1_000_000, completion_tokens=0), "openai/ACME-LLM-70B")
    0.6
    """
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"name must be a non-empty model name, got {name!r}")
    if provider is not None and (not isinstance(provider, str) or not provider.strip()):
        raise ConfigError(f"provider must be a non-empty string or None, got {provider!r}")
    in_usd = _required_price("input_price", input_price)
    out_usd = _required_price("output_price", output_price)
    read_usd = _price("cache_read_price", cache_read_price)
    write_usd = _price("cache_write_price", cache_write_price)
    write_1h_usd = _price("cache_write_1h_price", cache_write_1h_price)
    reasoning_usd = _price("reasoning_price", reasoning_price)
    tier_list = _tiers(tiers)
    try:
        prices = Prices(
            in_usd,
            out_usd,
            read_usd,
            write_usd,
            write_1h_usd,
            reasoning_usd,
            tier_list,
            version="registered",
        )
    except (ValueError, OverflowError) as e:  # more than six decimals, too large
        message = str(e)
        if message.startswith("tier "):
            message = f"tiers: {message[len('tier ') :]}"
        raise ConfigError(message) from None
    implied, _, base, _ = _names(name)
    key = (_provider_name(provider) or implied, base)
    global _generation
    with _lock:
        _registered[key] = prices
        _registered_any[key[1]] = prices
        _generation += 1
        _cache.clear()
    return prices
