"""Pricing: bundled table, name variants, register_model, unknown models, exact costs.

Expected costs are computed by hand from the providers' published prices (USD per 1M tokens),
in pico-USD (1e-12 USD): a price of P USD per 1M tokens is P * 1e6 pico-USD per token.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from llmtally import pricing
from llmtally._core import Prices, Usage, normalize_usage_block
from llmtally.errors import ConfigError, LlmtallyError
from llmtally.pricing import cost_pusd, cost_usd, lookup, register_model, unpriced_models

ROOT = Path(__file__).resolve().parents[2]
M = 1_000_000  # pico-USD per token for a price of 1 USD per 1M tokens


@pytest.fixture(autouse=True)
def _restore_registrations() -> Iterator[None]:
    """register_model is process-wide: undo each test's registrations."""
    saved = dict(pricing._registered), dict(pricing._registered_any)
    yield
    with pricing._lock:
        pricing._registered.clear()
        pricing._registered.update(saved[0])
        pricing._registered_any.clear()
        pricing._registered_any.update(saved[1])
        pricing._generation += 1
        pricing._cache.clear()


def test_openai_cached_reads_are_inside_prompt() -> None:
    # gpt-4o: 2.50 input, 1.25 cached input, 10.00 output.
    usage = Usage(prompt_tokens=1200, completion_tokens=300, cached_tokens=1024)
    expected = 176 * 2_500_000 + 1024 * 1_250_000 + 300 * 10_000_000
    assert cost_pusd(usage, "gpt-4o") == expected == 4_720_000_000
    assert cost_usd(usage, "gpt-4o") == pytest.approx(0.00472, abs=0)


def test_o_series_reasoning_is_inside_completion() -> None:
    # o3: 2.00 input, 0.50 cached input, 8.00 output; reasoning billed as output, once.
    usage = normalize_usage_block(
        {
            "prompt_tokens": 2000,
            "completion_tokens": 1000,
            "prompt_tokens_details": {"cached_tokens": 1500},
            "completion_tokens_details": {"reasoning_tokens": 800},
        }
    )
    expected = 500 * 2 * M + 1500 * M // 2 + 1000 * 8 * M
    assert cost_pusd(usage, "o3-2025-04-16", "openai") == expected == 9_750_000_000


def test_anthropic_cache_reads_and_5m_and_1h_writes() -> None:
    # claude-sonnet-4-5: 3 input, 15 output; cache reads 0.1x, 5-minute writes 1.25x,
    # 1-hour writes 2x the input price.
    prices = lookup("claude-sonnet-4-5")
    assert prices is not None
    assert (prices.input_price, prices.output_price) == (3.0, 15.0)
    assert prices.cache_read_price == pytest.approx(0.1 * 3)
    assert prices.cache_write_price == pytest.approx(1.25 * 3)
    assert prices.cache_write_1h_price == pytest.approx(2 * 3)
    # Anthropic reports cache counts beside input_tokens; normalized, they are inside the prompt.
    usage = normalize_usage_block(
        {
            "input_tokens": 100,
            "cache_read_input_tokens": 2000,
            "cache_creation_input_tokens": 1000,
            "cache_creation": {"ephemeral_5m_input_tokens": 600, "ephemeral_1h_input_tokens": 400},
            "output_tokens": 500,
        },
        anthropic=True,
    )
    assert usage.prompt_tokens == 3100
    assert (usage.cached_tokens, usage.cache_write_1h_tokens) == (2000, 400)
    expected = (
        100 * 3 * M  # uncached input
        + 2000 * 300_000  # cache reads at 0.30
        + 600 * 3_750_000  # 5-minute writes at 3.75
        + 400 * 6 * M  # 1-hour writes at 6.00
        + 500 * 15 * M  # output
    )
    assert expected == 13_050_000_000
    assert cost_pusd(usage, "claude-sonnet-4-5-20250929", "anthropic") == expected
    assert cost_usd(usage, "anthropic/claude-sonnet-4-5") == 0.01305


def test_reasoning_at_its_own_price_when_the_model_has_one() -> None:
    register_model("acme-reasoner", input_price=1, output_price=4, reasoning_price=2.5)
    usage = Usage(prompt_tokens=100, completion_tokens=1000, reasoning_tokens=600)
    assert cost_pusd(usage, "acme-reasoner") == 100 * M + 400 * 4 * M + 600 * 2_500_000


@pytest.mark.parametrize(
    ("model", "provider", "base", "tier"),
    [
        ("gemini-2.5-pro", "gemini", (1.25, 10.0), (2.5, 15.0)),
        ("claude-sonnet-4-20250514", "bedrock", (3.0, 15.0), (6.0, 22.5)),
    ],
)
def test_long_context_tier_above_200k_prompt_tokens(
    model: str, provider: str, base: tuple[float, float], tier: tuple[float, float]
) -> None:
    at = Usage(prompt_tokens=200_000, completion_tokens=1000)
    above = Usage(prompt_tokens=200_001, completion_tokens=1000)
    exact = round(base[0] * M) * 200_000 + round(base[1] * M) * 1000
    long = round(tier[0] * M) * 200_001 + round(tier[1] * M) * 1000
    assert cost_pusd(at, model, provider) == exact
    assert cost_pusd(above, model, provider) == long
    if model == "gemini-2.5-pro":
        assert exact == 260_000_000_000
        assert long == 515_002_500_000


@pytest.mark.parametrize(
    ("model", "provider", "same_as"),
    [
        ("GPT-4o", None, "gpt-4o"),
        ("gpt-4o-2024-08-06", None, "gpt-4o"),
        ("openai/gpt-4o", None, "gpt-4o"),
        ("azure/gpt-4o", None, "gpt-4o"),
        ("gpt-4o", "azure", "gpt-4o"),
        ("gpt-4o", "azure_openai", "gpt-4o"),
        ("azure/gpt-4o-2024-11-20", None, "gpt-4o"),
        ("claude-sonnet-4-5-20250929", None, "claude-sonnet-4-5"),
        ("anthropic/claude-sonnet-4-5-20250929", None, "claude-sonnet-4-5"),
        ("claude-sonnet-4-5@20250929", "vertex_ai", "claude-sonnet-4-5"),
        ("vertex_ai/claude-sonnet-4-5@20250929", None, "claude-sonnet-4-5"),
        ("anthropic.claude-sonnet-4-5-20250929-v1:0", "bedrock", "claude-sonnet-4-5"),
        ("eu.anthropic.claude-sonnet-4-20250514-v1:0", None, "claude-sonnet-4-20250514"),
        ("anthropic.claude-3-5-sonnet-20241022-v2:0", None, "claude-3-5-sonnet-20241022"),
        ("gemini/gemini-2.5-pro", None, "gemini-2.5-pro"),
        ("models/gemini-2.5-pro", "google", "gemini-2.5-pro"),
        ("mistral/mistral-large-latest", None, "mistral-large-latest"),
        ("deepseek/deepseek-chat", None, "deepseek-chat"),
        ("xai/grok-4.3", None, "grok-4.3"),
        ("gpt-5-mini-2025-08-07", None, "gpt-5-mini"),
    ],
)
def test_variants_resolve_to_the_listed_model(
    model: str, provider: str | None, same_as: str
) -> None:
    found, listed = lookup(model, provider), lookup(same_as)
    assert found is not None and listed is not None
    assert _row(found) == _row(listed)


def test_dated_snapshot_with_its_own_price_is_not_generalized() -> None:
    old = lookup("gpt-4o-2024-05-13")
    assert old is not None and (old.input_price, old.output_price) == (5.0, 15.0)
    assert _row(lookup("gpt-4o")) != _row(old)


def test_latest_and_undated_aliases() -> None:
    dated = lookup("claude-3-5-haiku-20241022")
    assert dated is not None
    assert _row(lookup("claude-3-5-haiku-latest")) == _row(dated)
    assert _row(lookup("claude-3-5-haiku")) == _row(dated)


def test_provider_specific_price_wins_for_that_provider() -> None:
    openai, azure = lookup("gpt-4-turbo"), lookup("gpt-4-turbo", "azure")
    assert openai is not None and azure is not None
    assert (openai.input_price, azure.input_price) == (10.0, 11.0)
    assert _row(lookup("azure/gpt-4-turbo")) == _row(azure)


def test_repeated_lookup_is_one_cached_object() -> None:
    first = lookup("openai/gpt-4o-2024-08-06")
    assert lookup("openai/gpt-4o-2024-08-06") is first
    assert pricing._cache[("openai/gpt-4o-2024-08-06", None)] is first


def test_register_model_overrides_the_table_and_its_variants() -> None:
    before = lookup("gpt-4o")
    mine = register_model("gpt-4o", input_price=2, output_price=8, cache_read_price=0.5)
    assert lookup("gpt-4o") is mine
    assert lookup("openai/gpt-4o-2024-08-06") is mine
    assert lookup("gpt-4o", "azure") is mine
    usage = Usage(prompt_tokens=1000, completion_tokens=100, cached_tokens=400)
    assert cost_pusd(usage, "gpt-4o") == 600 * 2 * M + 400 * M // 2 + 100 * 8 * M
    assert before is not mine


def test_register_custom_model_and_provider_scope() -> None:
    mine = register_model("Acme-Llama-70B", provider="vllm", input_price=0.2, output_price=0.4)
    assert lookup("acme-llama-70b", "vllm") is mine
    assert lookup("ACME-LLAMA-70B") is mine  # no provider named: any registration matches
    assert lookup("acme-llama-70b", "openai") is None
    other = register_model("acme-llama-70b", input_price=1, output_price=1)
    assert lookup("acme-llama-70b", "openai") is other
    assert lookup("acme-llama-70b", "vllm") is mine  # the provider's own price stays


def test_register_model_name_with_provider_prefix() -> None:
    mine = register_model("together_ai/acme/llm-8b", input_price=0.1, output_price=0.1)
    assert lookup("acme/llm-8b", "together") is mine
    assert lookup("together_ai/acme/llm-8b") is mine


def test_register_model_tiers() -> None:
    register_model("acme-long", input_price=1, output_price=2, tiers=[(100_000, 2, 4)])
    assert cost_pusd(Usage(prompt_tokens=100_000, completion_tokens=10), "acme-long") == (
        100_000 * M + 10 * 2 * M
    )
    assert cost_pusd(Usage(prompt_tokens=100_001, completion_tokens=10), "acme-long") == (
        100_001 * 2 * M + 10 * 4 * M
    )


def test_unknown_model_cost_none_warned_once_every_miss_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    name = "no-such-model-3000"
    usage = Usage(prompt_tokens=10, completion_tokens=5)
    with caplog.at_level(logging.WARNING, logger="llmtally.pricing"):
        assert lookup(name) is None
        assert cost_pusd(usage, name) is None
        assert cost_usd(usage, name, "openai") is None
    warnings = [r for r in caplog.records if r.name == "llmtally.pricing"]
    assert len(warnings) == 1
    assert name in warnings[0].getMessage()
    assert unpriced_models()[name] == 3
    # Registering the model prices it from then on.
    register_model(name, input_price=1, output_price=1)
    assert cost_pusd(usage, name) == 15 * M


def test_usage_without_split_has_no_cost() -> None:
    assert cost_pusd(Usage(total_tokens=100), "gpt-4o") is None


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"name": ""}, "name"),
        ({"name": 3}, "name"),
        ({"provider": ""}, "provider"),
        ({"input_price": -1}, "input_price"),
        ({"input_price": None}, "input_price"),
        ({"output_price": float("nan")}, "output_price"),
        ({"output_price": "2.5"}, "output_price"),
        ({"output_price": True}, "output_price"),
        ({"cache_read_price": float("inf")}, "cache_read_price"),
        ({"cache_write_price": -0.5}, "cache_write_price"),
        ({"cache_write_1h_price": 0.1234567}, "cache_write_1h_price"),
        ({"reasoning_price": 1e30}, "reasoning_price"),
        ({"input_price": 0.0000001}, "input_price"),
        ({"tiers": 5}, "tiers"),
        ({"tiers": [(200_000, 1)]}, "tiers[0]"),
        ({"tiers": [(-1, 1, 2)]}, "tiers[0]"),
        ({"tiers": [(200_000, 1, 2), (200_000, 3, 4)]}, "tiers[1]"),
        ({"tiers": [(200_000, -1, 2)]}, "tiers[0] input_price"),
        ({"tiers": [(200_000, 1, 0.12345678)]}, "tiers"),
    ],
)
def test_register_model_rejects_bad_arguments(kwargs: dict[str, Any], argument: str) -> None:
    args: dict[str, Any] = {"name": "acme-bad", "input_price": 1, "output_price": 2, **kwargs}
    with pytest.raises(ConfigError, match=f"^{argument.replace('[', '.').replace(']', '.')}"):
        register_model(**args)
    with pytest.raises(ValueError):
        register_model(**args)
    assert issubclass(ConfigError, LlmtallyError)
    assert lookup("acme-bad", "test") is None


def test_bundled_table_loads_and_every_row_is_a_valid_price() -> None:
    doc = json.loads((ROOT / "python/llmtally/data/prices.json").read_text("utf-8"))
    assert doc["units"] == "USD per 1M tokens"
    assert len(doc["models"]) > 500
    rows = list(doc["models"].values()) + [
        r for rows in doc["providers"].values() for r in rows.values()
    ]
    for row in rows:
        assert isinstance(pricing._prices_of_row(row), Prices)
    for name in ("gpt-4o", "o3", "claude-sonnet-4-5", "gemini-2.5-pro", "deepseek-chat"):
        assert name in doc["models"]


def _row(p: Prices | None) -> tuple[float, ...]:
    assert p is not None
    return (
        p.input_price,
        p.output_price,
        p.cache_read_price,
        p.cache_write_price,
        p.cache_write_1h_price,
        p.reasoning_price,
    )


def _update_prices_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "update_prices", ROOT / "scripts/update_prices.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_update_script_maps_litellm_fields_exactly(tmp_path: Path) -> None:
    from llmtally import price_table

    source = {
        "sample_spec": {"mode": "one of: chat"},
        "claude-x-20250101": {
            "litellm_provider": "anthropic",
            "mode": "chat",
            "input_cost_per_token": 3e-06,
            "output_cost_per_token": 1.5e-05,
            "cache_read_input_token_cost": 3e-07,
            "cache_creation_input_token_cost": 3.75e-06,
            "cache_creation_input_token_cost_above_1hr": 6e-06,
            "input_cost_per_token_above_200k_tokens": 6e-06,
            "output_cost_per_token_above_200k_tokens": 2.25e-05,
            "cache_creation_input_token_cost_above_1hr_above_200k_tokens": 1.2e-05,
            "input_cost_per_token_batches": 1.5e-06,
            "provider_specific_entry": {"us": 1.1},
        },
        "deepseek/deepseek-y": {
            "litellm_provider": "deepseek",
            "mode": "chat",
            "input_cost_per_token": 2.8e-07,
            "output_cost_per_token": 4.2e-07,
            "cache_read_input_token_cost": 2.8e-08,
            "cache_creation_input_token_cost": 0.0,
            "output_cost_per_reasoning_token": 1.1e-06,
        },
        "azure/eu/gpt-z": {
            "litellm_provider": "azure",
            "mode": "chat",
            "input_cost_per_token": 1.1e-06,
            "output_cost_per_token": 1e-06,
        },
        "bedrock/anthropic.claude-x-20250101-v1:0": {
            "litellm_provider": "bedrock",
            "mode": "chat",
            "input_cost_per_token": 3.3e-06,
            "output_cost_per_token": 1.65e-05,
        },
        "fireworks_ai/accounts/fireworks/models/f-1": {
            "litellm_provider": "fireworks_ai",
            "mode": "chat",
            "input_cost_per_token": 9e-07,
            "output_cost_per_token": 9e-07,
        },
        "tts-1": {"litellm_provider": "openai", "mode": "audio_speech"},
        "odd": {
            "litellm_provider": "openai",
            "mode": "chat",
            "input_cost_per_token": 1.0000001e-06,
            "output_cost_per_token": 1e-06,
        },
    }
    built, rounded, coverage = price_table.build(source)
    table = price_table.to_json(built)
    models = table["models"]
    assert models["claude-x-20250101"] == [
        3,
        15,
        0.3,
        3.75,
        6,
        None,
        [[200_000, 6, 22.5, None, None, 12]],
        {
            "geo": {"us": 1.1},
            "service_tiers": {
                # The batch input price; output at half the standard price; cache reads at
                # the standard price; cache writes (5 minutes and 1 hour) at the batch input
                # price (LiteLLM's batch logic); above the tier, half the tier's prices.
                "batch": [1.5, 7.5, 0.3, None, None, None, [[200_000, 3, 11.25]]]
            },
        },
    ]
    assert models["claude-x"] == models["claude-x-20250101"]  # undated alias
    assert models["deepseek-y"] == [0.28, 0.42, 0.028, 0, None, 1.1]  # a listed 0 is a price
    assert "gpt-z" not in models and "eu/gpt-z" not in models  # regional entries apart
    assert table["regions"]["azure"]["eu"]["gpt-z"] == [1.1, 1]
    assert table["providers"]["bedrock"]["claude-x-20250101"] == [3.3, 16.5]
    assert models["accounts/fireworks/models/f-1"] == [0.9, 0.9, 0.45]  # cached prompt 50%
    assert models["odd"][0] == 1  # 1.0000001 rounded to six decimals, and reported
    assert rounded and "odd.input_cost_per_token" in rounded[0]
    assert coverage == {
        "anthropic": 1,
        "azure (regional)": 1,
        "bedrock": 1,
        "deepseek": 1,
        "fireworks_ai": 1,
        "openai": 1,
    }
    out = tmp_path / "prices.json"
    src = tmp_path / "src.json"
    src.write_text(json.dumps(source))
    script = _update_prices_script()
    args = ["--source", str(src), "--output", str(out), "--effective", "2026-01-01"]
    assert script.main(args) == 0
    first = out.read_bytes()
    assert script.main(args) == 0
    assert out.read_bytes() == first  # deterministic
    assert json.loads(first)["models"]["claude-x"][1] == 15


def test_long_context_tier_switches_cache_prices_too() -> None:
    prices = pricing.lookup("claude-sonnet-4-20250514")
    assert prices is not None
    long = Usage(prompt_tokens=300_000, completion_tokens=10, cached_tokens=100_000)
    short = Usage(prompt_tokens=200_000, completion_tokens=10, cached_tokens=100_000)
    # Above 200k: input 6.00, cache reads 0.60, output 22.50 per 1M; at or below: 3.00/0.30/15.00.
    assert prices.usage_cost_pusd(long) == 200_000 * 6_000_000 + 100_000 * 600_000 + 10 * 22_500_000
    assert (
        prices.usage_cost_pusd(short) == 100_000 * 3_000_000 + 100_000 * 300_000 + 10 * 15_000_000
    )
    custom = pricing.register_model(
        "tiered-test-model", input_price=1.0, output_price=2.0, tiers=[(10, 4.0, 8.0, 0.5, 5.0)]
    )
    usage = Usage(prompt_tokens=20, completion_tokens=1, cached_tokens=5, cache_write_tokens=5)
    assert custom.usage_cost_pusd(usage) == 10 * 4_000_000 + 5 * 500_000 + 5 * 5_000_000 + 8_000_000


async def test_a_call_is_priced_the_same_before_and_after_its_model_is_cached() -> None:
    """The first call of a model is priced by the lookup; later ones from the cached prices
    inside the response read: the same exact cost, source and fields."""
    from llmtally import CallbackManager

    pricing._cache.clear()
    manager = CallbackManager()
    body = {
        "model": "claude-sonnet-4-5",
        "usage": {
            "input_tokens": 100,
            "cache_read_input_tokens": 2000,
            "cache_creation_input_tokens": 1000,
            "cache_creation": {"ephemeral_5m_input_tokens": 600, "ephemeral_1h_input_tokens": 400},
            "output_tokens": 500,
        },
        "content": [{"type": "text", "text": "Paris."}],
    }
    responses = []
    for _ in range(2):
        async with manager.llm_call(None, provider="anthropic", model="claude-sonnet-4-5") as c:
            c.set_response(body)
        assert c.response is not None
        responses.append({k: v for k, v in c.response.items() if k not in ("request_id",)})
        assert pricing.cached("claude-sonnet-4-5", "anthropic") is not None
    first, second = responses
    assert first["cost_pusd"] == second["cost_pusd"] == 13_050_000_000
    assert first["cost_source"] == second["cost_source"] == "table"
    assert first["cost_estimate"] == second["cost_estimate"] == 0.01305
    assert list(first) == list(second)  # the same keys in the same order
    assert {k: v for k, v in first.items() if k != "response_time"} == {
        k: v for k, v in second.items() if k != "response_time"
    }
