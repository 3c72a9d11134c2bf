"""TokenCounter, CostTracker, PerformanceTracker, StreamingProgress and AuditLogger."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import pytest

import llmtally
from llmtally import (
    AuditLogger,
    CallbackManager,
    CostTracker,
    PerformanceTracker,
    StreamingProgress,
    TokenCounter,
)
from llmtally.audit import redact

from helpers import MESSAGES


def body(prompt: int, completion: int, cached: int = 0, reasoning: int = 0, cost: Any = None):
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "prompt_tokens_details": {"cached_tokens": cached},
        "completion_tokens_details": {"reasoning_tokens": reasoning},
    }
    if cost is not None:
        usage["cost"] = cost
    return {"choices": [{"message": {"content": "ok"}}], "usage": usage}


async def test_token_counter_totals_and_subsets() -> None:
    counter = TokenCounter()
    manager = CallbackManager([counter])
    for prompt, completion, cached, reasoning in ((100, 20, 64, 0), (50, 30, 0, 12)):
        async with manager.llm_call(MESSAGES, model="gpt-4o") as call:
            call.set_response(body(prompt, completion, cached, reasoning))
    async with manager.llm_call(MESSAGES, model="o3") as call:
        call.set_response(body(10, 5))
    with pytest.raises(RuntimeError):
        async with manager.llm_call(MESSAGES, model="o3"):
            raise RuntimeError
    assert (counter.prompt_tokens, counter.completion_tokens, counter.total_tokens) == (
        160,
        55,
        215,
    )
    assert (counter.input_tokens, counter.output_tokens) == (160, 55)
    assert (counter.cached_tokens, counter.reasoning_tokens, counter.requests) == (64, 12, 3)
    by_model = counter.by_model()
    assert by_model["gpt-4o"]["total_tokens"] == 200
    assert (by_model["o3"]["total_tokens"], by_model["o3"]["errors"]) == (15, 1)
    counter.reset()
    assert counter.total_tokens == 0


async def test_cost_tracker_per_provider_model_user_and_unpriced() -> None:
    tracker = CostTracker()
    manager = CallbackManager([tracker])
    calls = [
        ("openai", "gpt-4o", "alice", 0.25),
        ("openai", "gpt-4o", "bob", 0.5),
        ("anthropic", "claude", "alice", 1.125),
        ("local", "my-llama", "alice", None),
    ]
    for provider, model, user, cost in calls:
        async with manager.llm_call(MESSAGES, provider=provider, model=model, user_id=user) as c:
            c.set_response(body(10, 5, cost=cost))
    assert tracker.total_cost == 1.875  # priced calls only, exact
    assert tracker.total_cost_pusd == 1_875_000_000_000
    assert (tracker.total_tokens, tracker.request_count, tracker.unpriced_requests) == (60, 4, 1)
    assert tracker.unpriced_models == ["my-llama"]
    assert tracker.by_provider()["openai"]["cost_usd"] == 0.75
    assert tracker.by_model()["claude"]["cost_usd"] == 1.125
    assert tracker.by_user()["alice"]["cost_usd"] == 1.375
    assert tracker.by_user()["alice"]["requests"] == 3
    assert tracker.cost_for(provider="openai", user_id="alice") == 0.25
    summary = tracker.summary()
    assert (summary["total_cost"], summary["unpriced_requests"]) == (1.875, 1)


async def test_cost_tracker_is_exact_over_many_calls() -> None:
    tracker = CostTracker()
    manager = CallbackManager([tracker])
    for _ in range(10_000):
        async with manager.llm_call(MESSAGES) as call:
            call.set_response({"prompt_tokens": 1, "completion_tokens": 1, "cost_estimate": 0.1})
    assert tracker.total_cost_pusd == 10_000 * 100_000_000_000
    assert tracker.total_cost == 1000.0  # a float sum would drift here


async def test_performance_tracker_percentiles_and_speed() -> None:
    clock = [1000.0]
    tracker = PerformanceTracker(clock=lambda: clock[0])
    for i in range(1, 101):
        tracker._track_end(
            {"completion_tokens": 100},
            {"model": "gpt-4o", "duration_ms": float(i * 10), "ttft_ms": 5.0},
        )
    await tracker.on_llm_error(RuntimeError(), model="gpt-4o")
    stats = tracker.stats("gpt-4o")
    assert stats["requests"] == 100 and stats["errors"] == 1
    assert stats["latency_p50_ms"] == pytest.approx(500, rel=0.01)
    assert stats["latency_p95_ms"] == pytest.approx(950, rel=0.01)
    assert stats["latency_p99_ms"] == pytest.approx(990, rel=0.01)
    assert stats["latency_max_ms"] == 1000.0
    assert stats["ttft_p50_ms"] == pytest.approx(5.0, rel=0.01)
    # 100 tokens over (500 - 5) ms at the median call.
    assert stats["tokens_per_s"] == pytest.approx(100_000 / 495, rel=0.02)
    assert stats["requests_per_min"] == 100
    clock[0] += 61
    assert tracker.stats()["requests_per_min"] == 0
    assert tracker.stats()["requests"] == 100
    assert tracker.models() == ["gpt-4o"]


async def test_performance_tracker_through_a_manager_and_regressions(tmp_path: Path) -> None:
    tracker = PerformanceTracker()
    manager = CallbackManager([tracker])
    for _ in range(20):
        async with manager.llm_call(MESSAGES, model="m") as call:
            await call.chunk("a")
            call.set_response(body(5, 5))
    stats = tracker.stats("m")
    assert stats["requests"] == 20 and stats["ttft_p50_ms"] is not None
    path = tmp_path / "baseline.json"
    tracker.save_baseline(path)
    assert tracker.detect_regressions(path) == []
    slow = PerformanceTracker()
    for _ in range(20):
        slow._track_end({}, {"model": "m", "duration_ms": 1_000_000.0})
    findings = slow.detect_regressions(path, tolerance=0.2)
    moved = {(f["model"], f["metric"]) for f in findings}
    assert ("m", "latency_p50_ms") in moved and (None, "latency_p99_ms") in moved
    assert all(f["change"] > 0.2 for f in findings)
    report = slow.regression_report(path)
    assert "m: latency_p50_ms" in report and "%" in report
    assert tracker.regression_report(path) == "no regression beyond 20%"


async def test_streaming_progress_callbacks() -> None:
    chunks: list[Any] = []
    summaries: list[dict[str, Any]] = []

    async def on_complete(summary: dict[str, Any]) -> None:
        summaries.append(summary)

    progress = StreamingProgress(on_chunk=chunks.append, on_complete=on_complete)
    manager = CallbackManager([progress])
    async with manager.llm_call(MESSAGES, model="gpt-4o") as call:
        for piece in ("Par", "is", "."):
            await asyncio.sleep(0.001)
            await call.chunk(piece)
    async with manager.llm_call(MESSAGES) as call:
        call.set_response(body(3, 4))
    assert chunks == ["Par", "is", "."]
    assert len(summaries) == 2 and progress.completed == 2
    first, second = summaries
    assert (first["chunks"], first["content"], first["estimated"]) == (3, "Paris.", True)
    assert first["completion_tokens"] == llmtally.estimate_tokens("Paris.", "gpt-4o")
    assert 0 < first["ttft_ms"] <= first["duration_ms"]
    assert first["tokens_per_s"] > 0
    assert (second["chunks"], second["completion_tokens"], second["estimated"]) == (0, 4, False)
    with pytest.raises(ValueError):
        StreamingProgress(on_chunk="print")


async def test_audit_logger_writes_json_lines_without_text_by_default(tmp_path: Path) -> None:
    path = tmp_path / "audit" / "calls.jsonl"
    audit = AuditLogger(path)
    manager = CallbackManager([audit])
    async with manager.llm_call(
        [{"role": "user", "content": "my mail is bob@example.com"}], model="gpt-4o", user_id="u1"
    ) as call:
        call.set_response(dict(body(12, 3, cost=0.5), model="gpt-4o-2024-08-06"))
    with pytest.raises(TimeoutError):
        async with manager.llm_call(MESSAGES, user_id="u2"):
            raise TimeoutError
    assert await audit.aclose() is True
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["outcome"] for r in records] == ["success", "timeout"]
    ok, timeout = records
    assert (ok["user_id"], ok["model"], ok["total_tokens"], ok["cost_usd"]) == (
        "u1",
        "gpt-4o-2024-08-06",
        15,
        0.5,
    )
    assert ok["request_id"] and ok["latency_ms"] >= 0
    assert "prompt" not in ok and "completion" not in ok
    assert (timeout["user_id"], timeout["error_type"]) == ("u2", "TimeoutError")
    assert audit.records == 2 and audit.dropped == 0


async def test_audit_text_policies(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="llmtally.audit")
    redacted = AuditLogger(text="redact", max_chars=40)
    truncated = AuditLogger(text="truncate", max_chars=5)
    manager = CallbackManager([redacted, truncated])
    async with manager.llm_call(
        [{"role": "user", "content": "mail bob@example.com key sk-abcdefghijklmnop"}]
    ) as call:
        call.set_response({"content": "call +1 415 555 0100", "tokens_used": 3})
    first, second = (json.loads(r.getMessage()) for r in caplog.records)
    assert first["prompt"] == "mail [email] key [secret]"
    assert first["completion"] == "call [phone]"
    assert (second["prompt"], second["completion"]) == ("mail …", "call …")
    assert redact("card 4111 1111 1111 1111") == "card [card]"
    with pytest.raises(ValueError):
        AuditLogger(text="everything")
    with pytest.raises(ValueError):
        AuditLogger("x.jsonl", logger=logging.getLogger("x"))
