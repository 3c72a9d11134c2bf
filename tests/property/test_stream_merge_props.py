"""Stream usage merged field by field, against a plain fold of the events: whatever the order and
split of the usage events, with text chunks and nulls between them, the merge equals the
field-by-field final value (cumulative shapes) or the sum (LangChain deltas)."""

from __future__ import annotations

from functools import reduce
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from langchain_core.messages import AIMessageChunk
from langchain_core.messages.ai import UsageMetadata, add_usage

from llmtally.usage import Usage, merge_stream_usage

TEXT_CHUNKS = [
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "x"}},
    {"object": "chat.completion.chunk", "choices": [{"delta": {"content": "x"}}], "usage": None},
    {"type": "response.output_text.delta", "delta": "x"},
    {"candidates": [{"content": {"parts": [{"text": "x"}]}}]},
    AIMessageChunk(content="x"),
]


def fold(events: list[Any]) -> Usage | None:
    usage: Usage | None = None
    for event in events:
        usage = merge_stream_usage(usage, event)
    return usage


def fields(u: Usage | None) -> tuple[Any, ...]:
    assert u is not None
    return (
        u.total_tokens,
        u.prompt_tokens,
        u.completion_tokens,
        u.cached_tokens,
        u.cache_write_tokens,
        u.cache_write_1h_tokens,
        u.reasoning_tokens,
    )


def with_text(events: list[Any], data: st.DataObject) -> list[Any]:
    """``events`` in order, with text chunks (no usage) inserted anywhere."""
    out: list[Any] = []
    for event in events:
        out.extend(data.draw(st.lists(st.sampled_from(TEXT_CHUNKS), max_size=2)))
        out.append(event)
    out.extend(data.draw(st.lists(st.sampled_from(TEXT_CHUNKS), max_size=2)))
    return out


def reports(ranges: dict[str, tuple[int, int]]) -> st.SearchStrategy[dict[str, int | None]]:
    """One report: any subset of the fields, each a value in its range or an explicit null.
    The ranges keep every combination consistent (a part never larger than its whole)."""
    return st.fixed_dictionaries(
        {},
        optional={k: st.one_of(st.integers(lo, hi), st.none()) for k, (lo, hi) in ranges.items()},
    )


def drop_nulls(report: dict[str, int | None]) -> dict[str, int | None]:
    return {k: v for k, v in report.items() if v is not None}


def last_values(seen: list[dict[str, int | None]]) -> dict[str, int]:
    """The field-by-field final value: the last non-null value of each field."""
    final: dict[str, int] = {}
    for report in seen:
        final.update({k: v for k, v in report.items() if v is not None})
    return final


ANTHROPIC = {
    "input_tokens": (0, 100),
    "output_tokens": (200, 300),
    "cache_read_input_tokens": (0, 20_000),
    "cache_creation_input_tokens": (300, 600),
    "ephemeral_1h_input_tokens": (0, 300),
    "thinking_tokens": (0, 200),
}


def anthropic_event(report: dict[str, int | None], start: bool) -> dict[str, Any]:
    usage: dict[str, Any] = {
        k: v for k, v in report.items() if k not in ("ephemeral_1h_input_tokens", "thinking_tokens")
    }
    if "ephemeral_1h_input_tokens" in report:
        usage["cache_creation"] = {"ephemeral_1h_input_tokens": report["ephemeral_1h_input_tokens"]}
    if "thinking_tokens" in report:
        usage["output_tokens_details"] = {"thinking_tokens": report["thinking_tokens"]}
    if start:
        return {"type": "message_start", "message": {"type": "message", "usage": usage}}
    return {"type": "message_delta", "delta": {"stop_reason": None}, "usage": usage}


@settings(max_examples=300, deadline=None)
@given(st.data(), reports(ANTHROPIC), st.lists(reports(ANTHROPIC), max_size=5))
def test_anthropic_events_merge_to_the_last_value_of_each_field(
    data: st.DataObject, first: dict[str, int | None], deltas: list[dict[str, int | None]]
) -> None:
    # message_start carries every count (the 1-hour split and thinking may be left out)
    base = {"input_tokens": 7, "output_tokens": 250, "cache_read_input_tokens": 0}
    first = {**base, "cache_creation_input_tokens": 300, **drop_nulls(first)}
    events = [anthropic_event(first, True)] + [anthropic_event(d, False) for d in deltas]
    final = last_values([first, *deltas])
    read = final["cache_read_input_tokens"]
    write = final["cache_creation_input_tokens"]
    prompt = final["input_tokens"] + read + write
    output = final["output_tokens"]
    expected = (
        prompt + output,
        prompt,
        output,
        read,
        write,
        final.get("ephemeral_1h_input_tokens", 0),
        final.get("thinking_tokens", 0),
    )
    assert fields(fold(with_text(events, data))) == expected


OPENAI = {
    "prompt_tokens": (20_000, 30_000),
    "completion_tokens": (200, 300),
    "cached_tokens": (0, 20_000),
    "reasoning_tokens": (0, 200),
}


def openai_chunk(report: dict[str, int | None]) -> dict[str, Any]:
    usage: dict[str, Any] = {
        k: v for k, v in report.items() if k in ("prompt_tokens", "completion_tokens")
    }
    if "cached_tokens" in report:
        usage["prompt_tokens_details"] = {"cached_tokens": report["cached_tokens"]}
    if "reasoning_tokens" in report:
        usage["completion_tokens_details"] = {"reasoning_tokens": report["reasoning_tokens"]}
    return {"object": "chat.completion.chunk", "choices": [], "usage": usage}


@settings(max_examples=300, deadline=None)
@given(st.data(), st.lists(reports(OPENAI), min_size=1, max_size=6))
def test_openai_running_usage_merges_to_the_last_value_of_each_field(
    data: st.DataObject, seen: list[dict[str, int | None]]
) -> None:
    seen = [{**seen[0], "prompt_tokens": seen[0].get("prompt_tokens") or 20_000}, *seen[1:]]
    # an OpenAI-shaped usage block has a prompt or a completion count
    seen = [
        r
        if r.get("prompt_tokens") or r.get("completion_tokens")
        else {**r, "completion_tokens": 250}
        for r in seen
    ]
    final = last_values(seen)
    completion = final.get("completion_tokens")
    if completion is None and final.get("reasoning_tokens"):
        return  # reasoning without any completion count: inconsistent
    events = with_text([openai_chunk(r) for r in seen], data)
    prompt = final["prompt_tokens"]
    expected = (
        prompt + (completion or 0),
        prompt,
        completion,
        final.get("cached_tokens", 0),
        0,
        0,
        final.get("reasoning_tokens", 0),
    )
    assert fields(fold(events)) == expected


GEMINI = {
    "promptTokenCount": (20_000, 30_000),
    "candidatesTokenCount": (0, 200),
    "thoughtsTokenCount": (0, 400),
    "cachedContentTokenCount": (0, 20_000),
}


@settings(max_examples=300, deadline=None)
@given(st.data(), st.lists(reports(GEMINI), min_size=1, max_size=6))
def test_gemini_running_counts_merge_to_the_last_value_of_each_field(
    data: st.DataObject, seen: list[dict[str, int | None]]
) -> None:
    seen = [{**seen[0], "promptTokenCount": seen[0].get("promptTokenCount") or 20_000}, *seen[1:]]
    events = [{"usageMetadata": meta} for meta in seen]
    final = last_values(seen)
    thoughts = final.get("thoughtsTokenCount", 0)
    candidates = final.get("candidatesTokenCount")
    has_output = candidates is not None or "thoughtsTokenCount" in final
    completion = (candidates or 0) + thoughts if has_output else None
    prompt = final["promptTokenCount"]
    if completion is None:
        completion = 0 if "totalTokenCount" in final else None
    expected = (
        prompt + (completion or 0),
        prompt,
        completion,
        final.get("cachedContentTokenCount", 0),
        0,
        0,
        thoughts,
    )
    assert fields(fold(with_text(events, data))) == expected


def lc_usage(i: int, o: int, read: int, write: int, reasoning: int) -> UsageMetadata:
    return {
        "input_tokens": i + read + write,
        "output_tokens": o + reasoning,
        "total_tokens": i + read + write + o + reasoning,
        "input_token_details": {"cache_read": read, "cache_creation": write},
        "output_token_details": {"reasoning": reasoning},
    }


small = st.integers(0, 5_000)


@settings(max_examples=300, deadline=None)
@given(
    st.data(),
    st.lists(st.builds(lc_usage, small, small, small, small, small), min_size=1, max_size=6),
)
def test_langchain_chunk_deltas_add_up_in_any_order(
    data: st.DataObject, deltas: list[UsageMetadata]
) -> None:
    order = data.draw(st.permutations(deltas))
    summed = reduce(add_usage, deltas)
    merged = fold(with_text([AIMessageChunk(content="", usage_metadata=d) for d in order], data))
    details_in = summed.get("input_token_details") or {}
    details_out = summed.get("output_token_details") or {}
    assert fields(merged) == (
        summed["total_tokens"],
        summed["input_tokens"],
        summed["output_tokens"],
        details_in.get("cache_read", 0),
        details_in.get("cache_creation", 0),
        0,
        details_out.get("reasoning", 0),
    )
