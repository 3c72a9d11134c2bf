"""Regenerate llmtally's bundled price table, python/llmtally/data/prices.json.

The source is LiteLLM's public price list, ``model_prices_and_context_window.json`` (maintained at
https://github.com/BerriAI/litellm; the ``litellm`` wheel on PyPI ships a copy as
``litellm/model_prices_and_context_window_backup.json``). Refresh:

    pip install -U litellm            # or download the JSON file from the LiteLLM repository
    python scripts/update_prices.py   # reads the installed copy, rewrites the table
    python scripts/update_prices.py --source path/to/model_prices_and_context_window.json
    pytest tests/unit/test_pricing.py # hand-computed figures still hold (update them if a
                                      # provider really changed a price)

The output is deterministic (sorted keys, prices as exact decimals), so a refresh diff shows only
real price changes. Nothing is fetched at import time: llmtally reads the bundled file.

What is kept: chat, completion and responses models of OpenAI, Anthropic, Google (Gemini API
and Vertex AI), Mistral, DeepSeek, Groq, Amazon Bedrock, Azure OpenAI, Azure AI, xAI, Together
and Fireworks, priced per token. Region- or commitment-specific entries (``azure/eu/...``,
``bedrock/us-east-1/...``) are left out: a call's model name does not say its region.

Field mapping (LiteLLM, USD per token -> llmtally, USD per 1M tokens, rounded to 6 decimals):
    input_cost_per_token                        -> input
    output_cost_per_token                       -> output
    cache_read_input_token_cost                 -> cache read
    cache_creation_input_token_cost             -> cache write (5 minutes)
    cache_creation_input_token_cost_above_1hr   -> cache write (1 hour)
    output_cost_per_reasoning_token             -> reasoning
    {input,output}_cost_per_token_above_<N>k_tokens -> tier (prompt > N * 1000 tokens)
    cache_{read_input,creation_input}_token_cost_above_<N>k_tokens -> kept in the tier row
                                                   (not applied yet: tiers switch input/output)
Batch, flex and priority prices are not kept (a call does not say which it used).

Data file layout: ``models`` maps a model name (lower case, provider prefix removed) to a row;
``providers`` maps a provider to the rows that differ from ``models`` for that provider. A row is
``[input, output, cache_read, cache_write, cache_write_1h, reasoning, tiers]`` with trailing
``null`` s dropped; ``null`` means "the default" (cache prices default to input, 1 h writes to
5-minute writes, reasoning to output). ``tiers`` is
``[[above_prompt_tokens, input, output, cache_read, cache_write], ...]``.

Aliases are added for names people use that the list only has in another form: the undated name
of a dated snapshot (the newest snapshot's prices, as the providers' own aliases point to the
newest), and the plain name of a Bedrock id (``anthropic.claude-3-5-haiku-20241022-v1:0`` ->
``claude-3-5-haiku-20241022``). A name the list has itself always wins over an alias.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "python" / "llmtally" / "data" / "prices.json"
SOURCE_NAMES = (
    "model_prices_and_context_window.json",
    "model_prices_and_context_window_backup.json",
)
MODES = {"chat", "completion", "responses"}

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
REGIONAL = re.compile(
    r"^(azure/(eu|us|us-gov|apac|global|global-standard)/"
    r"|bedrock/(\*|[a-z]{2}(-gov)?-[a-z]+-\d)/|.*-commitment/|together-ai-)"
)
TIER_KEY = re.compile(r"^input_cost_per_token_above_(\d+)k_tokens$")
DATED = re.compile(r"^(.+?)(-\d{4}-\d{2}-\d{2}|-\d{8})$")
BEDROCK_ID = re.compile(
    r"^(?:(?:us|eu|apac|au|jp|ca|global|us-gov)\.)?"
    r"(?:anthropic|meta|mistral|amazon|cohere|ai21|deepseek|openai|qwen)\.(.+?)(?:-v\d+(?::\d+)?)?$"
)
SIX = Decimal("0.000001")


def find_source() -> Path:
    spec = importlib.util.find_spec("litellm")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("litellm is not installed: pip install litellm, or pass --source FILE")
    for folder in spec.submodule_search_locations:
        for name in SOURCE_NAMES:
            path = Path(folder) / name
            if path.is_file():
                return path
    sys.exit("no model_prices_and_context_window*.json inside the litellm package")


def per_million(value: Any, rounded: list[str], where: str) -> Decimal | None:
    """USD per token (a JSON float) -> USD per 1M tokens, exactly, at most six decimals."""
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if value < 0:
        return None
    exact = Decimal(repr(float(value))) * 1_000_000  # repr: the decimal the file wrote
    six = exact.quantize(SIX, rounding=ROUND_HALF_EVEN)
    if six != exact:
        rounded.append(f"{where}: {exact} -> {six}")
    return six.normalize() if six else Decimal(0)


def row_of(entry: dict[str, Any], rounded: list[str], name: str) -> list[Any] | None:
    def get(field: str) -> Decimal | None:
        return per_million(entry.get(field), rounded, f"{name}.{field}")

    inp, out = get("input_cost_per_token"), get("output_cost_per_token")
    if inp is None or out is None:
        return None
    cache_write = get("cache_creation_input_token_cost")
    if cache_write == 0 and inp > 0:
        cache_write = None  # "no cache-write charge listed" (DeepSeek): writes are input
    tiers = []
    for field in entry:
        m = TIER_KEY.match(field)
        if not m:
            continue
        n = m.group(1)
        t_in = get(field)
        t_out = get(f"output_cost_per_token_above_{n}k_tokens")
        if t_in is None:
            continue
        tiers.append(
            [
                int(n) * 1000,
                t_in,
                out if t_out is None else t_out,
                get(f"cache_read_input_token_cost_above_{n}k_tokens"),
                get(f"cache_creation_input_token_cost_above_{n}k_tokens"),
            ]
        )
    tiers.sort(key=lambda t: t[0])
    row: list[Any] = [
        inp,
        out,
        get("cache_read_input_token_cost"),
        cache_write,
        get("cache_creation_input_token_cost_above_1hr"),
        get("output_cost_per_reasoning_token"),
        [trim(t) for t in tiers] or None,
    ]
    return trim(row)


def trim(row: list[Any]) -> list[Any]:
    while row and row[-1] is None:
        row.pop()
    return row


def strip_prefix(key: str) -> str:
    name = key.lower()
    for prefix in PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def aliases(name: str) -> list[str]:
    """Other names a caller may use for a listed name (see the module docstring)."""
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


def build(source: dict[str, Any]) -> tuple[dict[str, Any], list[str], dict[str, int]]:
    rounded: list[str] = []
    # (name, provider) -> (row, derived)
    listed: dict[tuple[str, str], list[Any]] = {}
    for key in sorted(source):
        entry = source[key]
        if not isinstance(entry, dict) or entry.get("mode") not in MODES:
            continue
        provider = str(entry.get("litellm_provider", ""))
        ours = PROVIDERS.get(provider) or ("vertex_ai" if provider.startswith("vertex_ai") else "")
        if not ours or REGIONAL.match(key.lower()):
            continue
        row = row_of(entry, rounded, key)
        if row is None:
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
    for key, (_, row) in snapshots.items():
        if key not in listed:
            derived.setdefault(key, row)

    merged = {**derived, **listed}

    def precedence(item: tuple[tuple[str, str], list[Any]]) -> tuple[bool, int]:
        (_, provider), _row = item
        return (item[0] not in listed, RANK[provider])

    models: dict[str, list[Any]] = {}
    for item in sorted(merged.items(), key=precedence):
        (name, _), row = item
        models.setdefault(name, row)
    providers: dict[str, dict[str, list[Any]]] = {}
    for (name, provider), row in merged.items():
        if models[name] != row:
            providers.setdefault(provider, {})[name] = row
    coverage: dict[str, int] = {}
    for _, provider in listed:
        coverage[provider] = coverage.get(provider, 0) + 1
    return {"models": models, "providers": providers}, rounded, coverage


def to_json(value: Any) -> Any:
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, list):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, help="LiteLLM's price JSON (default: installed)")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    parser.add_argument("--source-name", help="what to record as the source in the table")
    args = parser.parse_args(argv)
    path = args.source or find_source()
    label = args.source_name
    if label is None:
        label = f"litellm {_litellm_version()} {path.name}" if args.source is None else path.name
    table, rounded, coverage = build(json.loads(path.read_text(encoding="utf-8")))
    doc = {
        "format": 1,
        "source": label,
        "units": "USD per 1M tokens",
        "row": [
            "input",
            "output",
            "cache_read",
            "cache_write",
            "cache_write_1h",
            "reasoning",
            "tiers",
        ],
        "tier": ["above_prompt_tokens", "input", "output", "cache_read", "cache_write"],
        **to_json(table),
    }
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    # One model per line keeps refresh diffs readable.
    text = text.replace('],"', '],\n"')
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text + "\n", encoding="utf-8")
    print(f"wrote {args.output} ({len(text) // 1024} KB) from {label}")
    print(f"  {len(table['models'])} names (aliases included); listed models per provider:")
    print("  " + ", ".join(f"{p} {n}" for p, n in sorted(coverage.items())))
    print(
        "  provider-specific rows: "
        + ", ".join(f"{p} {len(r)}" for p, r in sorted(table["providers"].items()))
    )
    for line in rounded:
        print(f"  rounded to 6 decimals: {line}")
    return 0


def _litellm_version() -> str:
    try:
        from importlib.metadata import version

        return version("litellm")
    except Exception:
        return "unknown"


if __name__ == "__main__":
    raise SystemExit(main())
