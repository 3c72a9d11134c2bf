"""Prices as billed: every kind switches at a tier, modifiers the call states (service tier,
inference geography, off-peak time), regional names, provider rules and price versions.

Expected costs are computed by hand, in pico-USD: a price of P USD per 1M tokens is P * 1e6
pico-USD per token.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llmtally import CallbackManager, pricing
from llmtally._core import Prices, Usage, call_modifiers
from llmtally.pricing import cost_pusd, lookup

M = 1_000_000  # pico-USD per token for a price of 1 USD per 1M tokens


def _utc(text: str) -> float:
    return datetime.datetime.fromisoformat(text).replace(tzinfo=datetime.UTC).timestamp()


@pytest.fixture(autouse=True)
def _fresh_table() -> Iterator[None]:
    pricing.reload()
    yield
    pricing.reload()


# --- tiers for every kind -------------------------------------------------------------------


def test_reasoning_above_the_tier_is_at_the_tier_output_price() -> None:
    # gemini-2.5-pro: above 200k prompt tokens, 2.50 in and 15.00 out (thoughts are output).
    usage = Usage(prompt_tokens=250_000, completion_tokens=4000, reasoning_tokens=3000)
    assert cost_pusd(usage, "gemini-2.5-pro", "gemini") == 250_000 * 2_500_000 + 4000 * 15 * M
    assert cost_pusd(usage, "gemini-2.5-pro", "gemini") == 685_000_000_000  # 0.685 USD


def test_cached_tokens_of_a_model_without_a_cache_price_follow_the_tier_input() -> None:
    # gpt-5.4-pro: 30/180, above 272k 60/270, no cache price: cached tokens are input.
    usage = Usage(prompt_tokens=300_000, completion_tokens=1000, cached_tokens=100_000)
    assert cost_pusd(usage, "gpt-5.4-pro", "openai") == 300_000 * 60 * M + 1000 * 270 * M
    assert cost_pusd(usage, "gpt-5.4-pro", "openai") == 18_270_000_000_000


def test_one_hour_writes_above_the_tier_at_the_tier_price() -> None:
    # claude-sonnet-4-5 on Vertex: 1 h writes 6.00, above 200k 12.00 (listed in the tier).
    prices = lookup("claude-sonnet-4-5@20250929", "vertex_ai")
    assert prices is not None
    assert prices.rates(200_000)[4] == 6.0
    assert prices.rates(200_001)[4] == 12.0
    usage = Usage(
        prompt_tokens=250_000,
        completion_tokens=10,
        cache_write_tokens=50_000,
        cache_write_1h_tokens=50_000,
    )
    expected = 200_000 * 6 * M + 50_000 * 12 * M + 10 * 22_500_000
    assert prices.usage_cost_pusd(usage) == expected == 1_800_225_000_000


def test_kinds_without_their_own_price_derive_from_the_tier() -> None:
    p = Prices(1.0, 4.0, tiers=[(100, 2.0, 8.0)])
    assert p.rates(100) == (1.0, 4.0, 1.0, 1.0, 1.0, 4.0)
    assert p.rates(101) == (2.0, 8.0, 2.0, 2.0, 2.0, 8.0)
    # Kinds priced on their own keep that price unless the tier lists one.
    q = Prices(1.0, 4.0, 0.1, 1.25, 2.0, 3.0, tiers=[(100, 2.0, 8.0, None, 2.5)])
    assert q.rates(101) == (2.0, 8.0, 0.1, 2.5, 2.0, 3.0)
    r = Prices(1.0, 4.0, tiers=[(100, 2.0, 8.0, 0.2, 2.5, 4.0, 6.0)])
    assert r.rates(101) == (2.0, 8.0, 0.2, 2.5, 4.0, 6.0)
    usage = Usage(
        prompt_tokens=200,
        completion_tokens=50,
        cached_tokens=100,
        cache_write_tokens=40,
        cache_write_1h_tokens=10,
        reasoning_tokens=20,
    )
    expected = 60 * 2 * M + 100 * 200_000 + 30 * 2_500_000 + 10 * 4 * M + 30 * 8 * M + 20 * 6 * M
    assert r.usage_cost_pusd(usage) == expected


def test_register_model_takes_every_kind_in_a_tier() -> None:
    p = pricing.register_model(
        "acme-tiered-7", input_price=1, output_price=4, tiers=[(100, 2, 8, 0.2, 2.5, 4.0, 6.0)]
    )
    assert p.rates(101) == (2.0, 8.0, 0.2, 2.5, 4.0, 6.0)
    assert p.version == "registered"


# --- provider rules ---------------------------------------------------------------------------


def test_xai_thresholds_are_inclusive() -> None:
    # grok-4.3: 1.25/2.50, at or above 200k prompt tokens 2.50/5.00.
    prices = lookup("grok-4.3", "xai")
    assert prices is not None and prices.inclusive
    at = Usage(prompt_tokens=200_000, completion_tokens=100)
    below = Usage(prompt_tokens=199_999, completion_tokens=100)
    assert prices.usage_cost_pusd(at) == 200_000 * 2_500_000 + 100 * 5 * M
    assert prices.usage_cost_pusd(below) == 199_999 * 1_250_000 + 100 * 2_500_000


def test_fireworks_cached_prompt_at_half_the_input_price() -> None:
    usage = Usage(prompt_tokens=1000, completion_tokens=100, cached_tokens=600)
    name = "accounts/fireworks/models/llama-v3p1-8b-instruct"  # 0.10 in and out
    assert cost_pusd(usage, name, "fireworks_ai") == 400 * 100_000 + 600 * 50_000 + 100 * 100_000


def test_deepseek_off_peak_by_the_call_time() -> None:
    # deepseek-v4-pro: 1.32/3.96 (cache hits 0.044); off-peak 0.66/1.98 (0.022): weekdays
    # 00:00-01:00, 04:00-06:00 and 10:00-24:00 UTC, weekends all day.
    usage = Usage(prompt_tokens=1000, completion_tokens=500, cached_tokens=200)
    peak = 800 * 1_320_000 + 200 * 44_000 + 500 * 3_960_000
    off = 800 * 660_000 + 200 * 22_000 + 500 * 1_980_000
    monday = "2026-01-05"
    for when, expected in [
        (f"{monday}T02:30:00", peak),
        (f"{monday}T08:00:00", peak),
        (f"{monday}T00:30:00", off),
        (f"{monday}T05:00:00", off),
        (f"{monday}T23:59:00", off),
        ("2026-01-10T08:00:00", off),  # Saturday
    ]:
        assert cost_pusd(usage, "deepseek-v4-pro", "deepseek", at=_utc(when)) == expected, when


# --- service tiers and geography --------------------------------------------------------------


@pytest.mark.parametrize(
    ("tier", "expected"),
    [
        (None, 1000 * 1_250_000 + 100 * 10 * M),
        ("default", 1000 * 1_250_000 + 100 * 10 * M),
        ("flex", 1000 * 625_000 + 100 * 5 * M),
        ("priority", 1000 * 2_500_000 + 100 * 20 * M),
        ("batch", 1000 * 625_000 + 100 * 5 * M),
        ("scale", 1000 * 1_250_000 + 100 * 10 * M),  # not listed: the standard price
    ],
)
def test_openai_service_tier(tier: str | None, expected: int) -> None:
    usage = Usage(prompt_tokens=1000, completion_tokens=100)
    assert cost_pusd(usage, "gpt-5", "openai", service_tier=tier) == expected


def test_anthropic_inference_geo_multiplier() -> None:
    # claude-opus-4-6: 5/25; served in the US ("inference_geo": "us"): 1.1x.
    usage = Usage(prompt_tokens=1000, completion_tokens=100)
    base = 1000 * 5 * M + 100 * 25 * M
    assert cost_pusd(usage, "claude-opus-4-6", "anthropic") == base == 7_500_000_000
    assert cost_pusd(usage, "claude-opus-4-6", inference_geo="us") == 8_250_000_000
    assert cost_pusd(usage, "claude-opus-4-6", inference_geo="global") == base
    assert cost_pusd(usage, "claude-sonnet-4-5", inference_geo="us") == 1000 * 3 * M + 100 * 15 * M


def test_call_modifiers_read_from_provider_bodies() -> None:
    assert call_modifiers({"service_tier": "flex", "usage": {}}) == ("flex", None, None)
    anthropic = {"usage": {"service_tier": "standard", "inference_geo": "us", "speed": "fast"}}
    assert call_modifiers(anthropic) == ("standard", "us", "fast")
    assert call_modifiers({"usage": {"service_tier": "batch"}}) == ("batch", None, None)
    assert call_modifiers({"service_tier": 3, "speed": 2}) == (None, None, None)
    assert call_modifiers(None) == (None, None, None)


# --- batch, ultrafast and fast mode ------------------------------------------------------------


def test_batch_at_every_listed_batch_price() -> None:
    # claude-opus-4-7 lists batch 2.50 in, 12.50 out, 0.25 cache reads, 3.125 cache writes; a
    # 1-hour write has no batch price of its own: the batch write price (LiteLLM's rule).
    usage = Usage(
        prompt_tokens=2000,
        completion_tokens=200,
        cached_tokens=500,
        cache_write_tokens=800,
        cache_write_1h_tokens=500,
    )
    expected = 700 * 2_500_000 + 500 * 250_000 + 800 * 3_125_000 + 200 * 12_500_000
    assert cost_pusd(usage, "claude-opus-4-7", "anthropic", service_tier="batch") == expected
    assert expected == 6_875_000_000
    assert cost_pusd(usage, "claude-opus-4-7", "anthropic") == (
        700 * 5 * M + 500 * 500_000 + 300 * 6_250_000 + 500 * 10 * M + 200 * 25 * M
    )


def test_batch_prices_the_list_leaves_out() -> None:
    # azure/eu/gpt-4o-mini lists only a batch input price (0.083): output at half the standard
    # 0.66, cache reads at the standard 0.083.
    usage = Usage(prompt_tokens=1000, completion_tokens=500, cached_tokens=600)
    got = cost_pusd(usage, "azure/eu/gpt-4o-mini", service_tier="batch")
    assert got == 400 * 83_000 + 600 * 83_000 + 500 * 330_000 == 248_000_000
    # A model listing no batch price at all is billed at its standard prices.
    plain = Usage(prompt_tokens=1000, completion_tokens=100)
    assert cost_pusd(plain, "gpt-3.5-turbo", "openai", service_tier="batch") == cost_pusd(
        plain, "gpt-3.5-turbo", "openai"
    )


def test_batch_above_a_tier_is_half_the_tier_price() -> None:
    # vertex_ai/gemini-3-pro-preview: batch 1.00/6.00; standard above 200k 4.00/18.00, no batch
    # price there: half of it, 2.00/9.00 (gemini-2.5-pro lists exactly that ratio).
    usage = Usage(prompt_tokens=250_000, completion_tokens=1000)
    got = cost_pusd(usage, "gemini-3-pro-preview", "vertex_ai", service_tier="batch")
    assert got == 250_000 * 2 * M + 1000 * 9 * M == 509_000_000_000
    below = Usage(prompt_tokens=200_000, completion_tokens=1000)
    got = cost_pusd(below, "gemini-3-pro-preview", "vertex_ai", service_tier="batch")
    assert got == 200_000 * 1 * M + 1000 * 6 * M
    # gemini-2.5-pro lists its batch tier: 1.25/7.50 above 200k.
    assert cost_pusd(usage, "gemini-2.5-pro", "vertex_ai", service_tier="batch") == (
        250_000 * 1_250_000 + 1000 * 7_500_000
    )


def test_xai_batch_thresholds_are_inclusive_too() -> None:
    # xai/grok-4.20 batch: 1.00/2.00, at or above 200k 2.00/4.00.
    at = Usage(prompt_tokens=200_000, completion_tokens=100)
    below = Usage(prompt_tokens=199_999, completion_tokens=100)
    assert cost_pusd(at, "grok-4.20", "xai", service_tier="batch") == (
        200_000 * 2 * M + 100 * 4 * M
    )
    assert cost_pusd(below, "grok-4.20", "xai", service_tier="batch") == (
        199_999 * 1 * M + 100 * 2 * M
    )


def test_openai_ultrafast_service_tier() -> None:
    # gpt-6-astra: 10/50 standard, 60/300 ultrafast.
    usage = Usage(prompt_tokens=1000, completion_tokens=100)
    assert cost_pusd(usage, "gpt-6-astra", "openai") == 1000 * 10 * M + 100 * 50 * M
    got = cost_pusd(usage, "gpt-6-astra", "openai", service_tier="ultrafast")
    assert got == 1000 * 60 * M + 100 * 300 * M == 90_000_000_000


def test_anthropic_fast_mode_multiplier() -> None:
    # claude-opus-5: 5/25, fast mode ("speed": "fast") 2x where listed, with the US 1.1x.
    usage = Usage(prompt_tokens=1000, completion_tokens=100)
    base = 1000 * 5 * M + 100 * 25 * M
    assert cost_pusd(usage, "claude-opus-5", "anthropic", speed="fast") == 2 * base
    assert cost_pusd(usage, "claude-opus-5", "anthropic", speed="standard") == base
    both = cost_pusd(usage, "claude-opus-5", "anthropic", speed="fast", inference_geo="us")
    assert both == 16_500_000_000  # 2.2x
    assert cost_pusd(usage, "claude-opus-4-6", "anthropic", speed="fast") == base  # not listed


@pytest.mark.parametrize("repeat", [1, 2])
async def test_batch_and_fast_calls_through_the_manager(repeat: int) -> None:
    batch = {
        "model": "claude-opus-4-7",
        "usage": {"input_tokens": 1000, "output_tokens": 100, "service_tier": "batch"},
        "content": [{"type": "text", "text": "hi"}],
    }
    fast = {
        "model": "claude-opus-5",
        "usage": {"input_tokens": 1000, "output_tokens": 100, "speed": "fast"},
        "content": [{"type": "text", "text": "hi"}],
    }
    for _ in range(repeat):
        batched = await _end(batch, "anthropic", "claude-opus-4-7")
        sped = await _end(fast, "anthropic", "claude-opus-5")
    assert batched["cost_pusd"] == 1000 * 2_500_000 + 100 * 12_500_000
    assert sped["cost_pusd"] == 2 * (1000 * 5 * M + 100 * 25 * M)


async def test_fast_mode_with_a_python_handler_on_the_call() -> None:
    from llmtally import AsyncCallbackHandler

    seen: list[dict[str, Any]] = []

    class Seen(AsyncCallbackHandler):
        async def on_llm_end(self, response: dict[str, Any], **kwargs: Any) -> None:
            seen.append(response)

    body = {
        "model": "claude-opus-5",
        "usage": {"input_tokens": 1000, "output_tokens": 100, "speed": "fast"},
        "content": [{"type": "text", "text": "hi"}],
    }
    manager = CallbackManager([Seen()])
    async with manager.llm_call(None, provider="anthropic", model="claude-opus-5") as call:
        call.set_response(body)
    assert call.response is not None and seen
    assert call.response["cost_pusd"] == seen[0]["cost_pusd"] == 2 * (1000 * 5 * M + 100 * 25 * M)


async def _end(body: dict[str, Any], provider: str, model: str) -> dict[str, Any]:
    manager = CallbackManager()
    async with manager.llm_call(None, provider=provider, model=model) as call:
        call.set_response(body)
    assert call.response is not None
    return call.response


@pytest.mark.parametrize("repeat", [1, 2])  # first call: lookup; second: the cached prices
async def test_a_flex_call_is_billed_flex_through_the_manager(repeat: int) -> None:
    body = {
        "model": "gpt-5",
        "service_tier": "flex",
        "usage": {"prompt_tokens": 1000, "completion_tokens": 100, "total_tokens": 1100},
        "choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}],
    }
    for _ in range(repeat):
        response = await _end(body, "openai", "gpt-5")
    assert response["cost_pusd"] == 1_125_000_000
    assert response["cost_source"] == "table"
    assert response["price_version"] == lookup("gpt-5").version  # type: ignore[union-attr]


@pytest.mark.parametrize("repeat", [1, 2])
async def test_a_us_served_anthropic_call_is_billed_1_1x(repeat: int) -> None:
    body = {
        "model": "claude-opus-4-6",
        "usage": {"input_tokens": 1000, "output_tokens": 100, "inference_geo": "us"},
        "content": [{"type": "text", "text": "hi"}],
    }
    for _ in range(repeat):
        response = await _end(body, "anthropic", "claude-opus-4-6")
    assert response["cost_pusd"] == 8_250_000_000


# --- regions ----------------------------------------------------------------------------------


def test_bedrock_region_in_the_name_is_the_regional_price() -> None:
    usage = Usage(prompt_tokens=1000, completion_tokens=100)
    name = "bedrock/us-gov-west-1/anthropic.claude-3-haiku-20240307-v1:0"
    assert cost_pusd(usage, name) == 1000 * 300_000 + 100 * 1_500_000  # not 0.25/1.25
    assert cost_pusd(usage, "anthropic.claude-3-haiku-20240307-v1:0", "bedrock") == (
        1000 * 250_000 + 100 * 1_250_000
    )


def test_azure_data_zone_in_the_name_is_the_regional_price() -> None:
    usage = Usage(prompt_tokens=1000, completion_tokens=100)
    assert cost_pusd(usage, "azure/eu/gpt-4o-2024-08-06") == 1000 * 2_750_000 + 100 * 11 * M


def test_azure_regions_without_a_regional_price_are_unpriced(
    caplog: pytest.LogCaptureFixture,
) -> None:
    usage = Usage(prompt_tokens=1000, completion_tokens=100)
    assert cost_pusd(usage, "azure/us/gpt-4o-2024-08-06") == 1000 * 2_750_000 + 100 * 11 * M
    assert cost_pusd(usage, "azure/us-gov/o3-mini") is not None
    with caplog.at_level(logging.WARNING, logger="llmtally.pricing"):
        # gpt-3.5-turbo has a global price but none in the EU data zone; GovCloud has no gpt-4o.
        for name in ("azure/eu/gpt-3.5-turbo", "azure/us-gov/gpt-4o", "azure/apac/gpt-4o"):
            assert cost_pusd(usage, name) is None
            assert any(name in r.getMessage() for r in caplog.records)
    assert cost_pusd(usage, "gpt-3.5-turbo", "azure") is not None


def test_a_region_in_a_bedrock_arn_is_the_regional_price(
    caplog: pytest.LogCaptureFixture,
) -> None:
    usage = Usage(prompt_tokens=1000, completion_tokens=100)
    gov = "arn:aws-us-gov:bedrock:us-gov-west-1:123456789012:foundation-model/"
    assert cost_pusd(usage, gov + "anthropic.claude-3-haiku-20240307-v1:0") == (
        1000 * 300_000 + 100 * 1_500_000  # GovCloud's 0.30/1.50, not 0.25/1.25
    )
    unlisted = (
        "arn:aws:bedrock:eu-west-3:123456789012:foundation-model/"
        "anthropic.claude-sonnet-4-20250514-v1:0"
    )
    with caplog.at_level(logging.WARNING, logger="llmtally.pricing"):
        assert cost_pusd(usage, unlisted) is None
    assert any(unlisted in r.getMessage() for r in caplog.records)


def test_a_govcloud_inference_profile_is_never_the_commercial_price() -> None:
    usage = Usage(prompt_tokens=1000, completion_tokens=100)
    # Listed: its own price (1.2x the commercial 2.00/10.00).
    assert cost_pusd(usage, "us-gov.anthropic.claude-sonnet-5", "bedrock") == (
        1000 * 2_400_000 + 100 * 12 * M
    )
    # Not listed: no price, never the commercial one; other profiles fall back as before.
    assert cost_pusd(usage, "us-gov.anthropic.claude-3-haiku-20240307-v1:0", "bedrock") is None
    assert cost_pusd(usage, "us.anthropic.claude-3-haiku-20240307-v1:0", "bedrock") == (
        1000 * 250_000 + 100 * 1_250_000
    )


def test_a_region_without_a_regional_price_is_unpriced_and_warned(
    caplog: pytest.LogCaptureFixture,
) -> None:
    usage = Usage(prompt_tokens=1000, completion_tokens=100)
    name = "bedrock/eu-west-3/anthropic.claude-sonnet-4-20250514-v1:0"
    with caplog.at_level(logging.WARNING, logger="llmtally.pricing"):
        assert cost_pusd(usage, name) is None
    assert any(name in r.getMessage() for r in caplog.records)
    assert pricing.unpriced_models()[name] >= 1


# --- versions ---------------------------------------------------------------------------------


def _write_table(path: Path) -> None:
    table = {
        "format": 2,
        "since": "2026-01-01",
        "source": "test",
        "models": {
            "acme-versioned": [
                2,
                8,
                None,
                None,
                None,
                None,
                None,
                {"since": "2026-03-01", "history": [["2026-01-01", [4, 16]]]},
            ],
            "acme-ahead": [
                1,
                1,
                None,
                None,
                None,
                None,
                None,
                {"since": "2999-01-01", "history": [["2026-01-01", [3, 3]]]},
            ],
        },
        "providers": {},
        "regions": {},
    }
    path.write_text(json.dumps(table))


def test_a_call_is_priced_by_the_version_in_force_at_its_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "prices.json"
    _write_table(path)
    monkeypatch.setenv("LLMTALLY_PRICES", str(path))
    pricing.reload()
    usage = Usage(prompt_tokens=1000, completion_tokens=100)
    old, new = 1000 * 4 * M + 100 * 16 * M, 1000 * 2 * M + 100 * 8 * M
    assert cost_pusd(usage, "acme-versioned", at=_utc("2026-02-28T23:59:59")) == old
    assert cost_pusd(usage, "acme-versioned", at=_utc("2026-03-01T00:00:00")) == new
    assert cost_pusd(usage, "acme-versioned") == new
    before = lookup("acme-versioned", at=_utc("2025-06-01T00:00:00"))
    assert before is not None and before.version == "2026-01-01"  # the earliest known
    current = lookup("acme-versioned")
    assert current is not None and current.version == "2026-03-01"
    # A version dated ahead is not in force yet, and the lookup is not cached past its date.
    ahead = lookup("acme-ahead")
    assert ahead is not None and (ahead.input_price, ahead.version) == (3.0, "2026-01-01")
    assert ("acme-ahead", None) not in pricing._cache


async def test_the_response_says_which_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "prices.json"
    _write_table(path)
    monkeypatch.setenv("LLMTALLY_PRICES", str(path))
    pricing.reload()
    body = {"model": "acme-versioned", "usage": {"prompt_tokens": 10, "completion_tokens": 1}}
    for _ in range(2):
        response = await _end(body, "openai", "acme-versioned")
        assert response["price_version"] == "2026-03-01"
        assert response["cost_pusd"] == 10 * 2 * M + 8 * M


# --- llmtally prices update -------------------------------------------------------------------


def test_prices_update_from_a_file_versions_and_flags_big_moves(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from llmtally.cli import main

    source = {
        "azure_ai/jais-30b-chat": {
            "litellm_provider": "azure_ai",
            "mode": "chat",
            "input_cost_per_token": 3.2e-03,  # the stale entry: 1000x too high
            "output_cost_per_token": 9.71e-03,
        },
        "gpt-acme": {
            "litellm_provider": "openai",
            "mode": "chat",
            "input_cost_per_token": 1e-06,
            "output_cost_per_token": 2e-06,
        },
    }
    old, new, out = tmp_path / "old.json", tmp_path / "new.json", tmp_path / "prices.json"
    empty = {"format": 2, "since": "2026-01-01", "models": {}, "providers": {}, "regions": {}}
    out.write_text(json.dumps(empty))  # else the first update is against the bundled table
    old.write_text(json.dumps(source))
    assert (
        main(["prices", "update", str(old), "--output", str(out), "--effective", "2026-01-01"]) == 0
    )
    source["azure_ai/jais-30b-chat"]["input_cost_per_token"] = 3.2e-06
    source["azure_ai/jais-30b-chat"]["output_cost_per_token"] = 9.71e-06
    new.write_text(json.dumps(source))
    capsys.readouterr()
    assert (
        main(["prices", "update", str(new), "--output", str(out), "--effective", "2026-06-01"]) == 0
    )
    printed = capsys.readouterr().out
    assert "0 added, 1 changed (effective 2026-06-01), 0 removed" in printed
    assert "MOVED MORE THAN 100x: :jais-30b-chat input: 3200 -> 3.2 USD/1M" in printed
    assert "MOVED MORE THAN 100x: :jais-30b-chat output: 9710 -> 9.71 USD/1M" in printed
    table = json.loads(out.read_text())
    assert table["models"]["jais-30b-chat"] == [
        3.2,
        9.71,
        None,
        None,
        None,
        None,
        None,
        {"history": [["2026-01-01", [3200, 9710]]], "since": "2026-06-01"},
    ]
    assert table["models"]["gpt-acme"] == [1, 2]  # unchanged: in force since the table's date
    assert table["since"] == "2026-01-01"
    # An effective date before a current version's is refused.
    source["gpt-acme"]["input_cost_per_token"] = 2e-06
    new.write_text(json.dumps(source))
    args = ["prices", "update", str(new), "--output", str(out), "--effective", "2026-02-01"]
    assert main(args) == 0  # gpt-acme's version is the table's (2026-01-01)
    source["azure_ai/jais-30b-chat"]["input_cost_per_token"] = 3.3e-06
    new.write_text(json.dumps(source))
    assert main(args) == 2  # jais-30b-chat's is 2026-06-01
    os.environ["LLMTALLY_PRICES"] = str(out)
    try:
        pricing.reload()
        usage = Usage(prompt_tokens=1000, completion_tokens=100)
        assert cost_pusd(usage, "azure_ai/jais-30b-chat") == 1000 * 3_200_000 + 100 * 9_710_000
        early = cost_pusd(usage, "azure_ai/jais-30b-chat", at=_utc("2026-03-01T00:00:00"))
        assert early == 1000 * 3200 * M + 100 * 9710 * M
    finally:
        del os.environ["LLMTALLY_PRICES"]


def test_a_big_move_of_a_tier_or_service_tier_price_is_flagged() -> None:
    from llmtally import price_table

    entry = {
        "litellm_provider": "openai",
        "mode": "chat",
        "input_cost_per_token": 1e-06,
        "output_cost_per_token": 4e-06,
        "input_cost_per_token_above_200k_tokens": 2e-06,
        "output_cost_per_token_above_200k_tokens": 8e-06,
        "input_cost_per_token_batches": 5e-07,
        "output_cost_per_token_batches": 2e-06,
    }
    before = price_table.update({"gpt-acme": entry}, None, "2026-01-01", "test").table
    moved = {
        **entry,
        "input_cost_per_token_above_200k_tokens": 2e-03,  # 1000x
        "output_cost_per_token_batches": 2e-09,  # 1/1000
    }
    result = price_table.update({"gpt-acme": moved}, before, "2026-06-01", "test")
    assert result.changed == [":gpt-acme"]
    assert sorted(result.big_moves) == [
        (":gpt-acme", "above 200000 input", 2.0, 2000.0),
        (":gpt-acme", "batch above 200000 input", 1.0, 1000.0),  # half the tier's
        (":gpt-acme", "batch output", 2.0, 0.002),
    ]


def test_prices_update_refuses_a_file_that_is_not_a_price_list(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from llmtally.cli import main

    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    assert main(["prices", "update", str(bad), "--output", str(tmp_path / "p.json")]) == 2
    assert "not LiteLLM's price list" in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()


def test_prices_update_from_the_installed_litellm_copy(tmp_path: Path) -> None:
    litellm = pytest.importorskip("litellm")
    from llmtally.cli import main

    copy = Path(litellm.__file__).parent / "model_prices_and_context_window_backup.json"
    out = tmp_path / "prices.json"
    assert main(["prices", "update", str(copy), "--output", str(out), "--dry-run"]) == 0
    assert not out.exists()
