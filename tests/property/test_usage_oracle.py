"""The Rust usage normalizer agrees with the pure-Python reference on any input."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from llmtally import _core

sys.path.insert(0, str(Path(__file__).parent.parent / "unit"))
import usage_oracle

count = st.one_of(
    st.integers(min_value=0, max_value=5000),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.none(),
    st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False, min_value=0, max_value=1e4),
    st.text(max_size=3),
)
small = st.integers(min_value=0, max_value=5000)
maybe = st.one_of(small, count)


def opt_keys(**fields: Any) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({}, optional=fields)


openai_usage = opt_keys(
    prompt_tokens=maybe,
    completion_tokens=maybe,
    total_tokens=maybe,
    prompt_tokens_details=opt_keys(cached_tokens=maybe),
    completion_tokens_details=opt_keys(reasoning_tokens=maybe),
    prompt_cache_hit_tokens=maybe,
    cost=st.one_of(st.floats(min_value=0, max_value=10), st.none()),
)
anthropic_usage = opt_keys(
    input_tokens=maybe,
    output_tokens=maybe,
    cache_read_input_tokens=maybe,
    cache_creation_input_tokens=maybe,
    cache_creation=opt_keys(ephemeral_1h_input_tokens=maybe),
)
responses_usage = opt_keys(
    input_tokens=maybe,
    output_tokens=maybe,
    total_tokens=maybe,
    input_tokens_details=opt_keys(cached_tokens=maybe),
    output_tokens_details=opt_keys(reasoning_tokens=maybe),
)
bodies = st.one_of(
    st.builds(lambda u: {"usage": u, "object": "chat.completion"}, openai_usage),
    st.builds(lambda u: {"type": "message", "usage": u}, anthropic_usage),
    st.builds(lambda u: {"object": "response", "usage": u}, responses_usage),
    st.builds(lambda u: {"type": "message_start", "message": {"usage": u}}, anthropic_usage),
    opt_keys(
        tokens_used=maybe,
        prompt_tokens=maybe,
        completion_tokens=maybe,
        cached_tokens=maybe,
        cache_write_tokens=maybe,
        reasoning_tokens=maybe,
    ),
    st.builds(
        lambda m: {"usageMetadata": m},
        opt_keys(
            promptTokenCount=maybe,
            candidatesTokenCount=maybe,
            thoughtsTokenCount=maybe,
            cachedContentTokenCount=maybe,
            totalTokenCount=maybe,
            toolUsePromptTokenCount=maybe,
        ),
    ),
    # Totals that say how reasoning was counted: beside the completion, or inside it.
    st.builds(
        lambda p, c, r, extra, sibling: {
            "usage": {
                "prompt_tokens": p,
                "completion_tokens": c,
                "total_tokens": p + c + (r if sibling else 0) + extra,
                "completion_tokens_details": {"reasoning_tokens": r},
            }
        },
        small,
        small,
        small,
        st.sampled_from([0, 0, 1]),
        st.booleans(),
    ),
    st.builds(
        lambda p, c, t, tool, inside: {
            "usageMetadata": {
                "promptTokenCount": p,
                "candidatesTokenCount": c + (t if inside else 0),
                "thoughtsTokenCount": t,
                "toolUsePromptTokenCount": tool,
                "totalTokenCount": p + c + t + tool,
            }
        },
        small,
        small,
        small,
        st.sampled_from([0, 7]),
        st.booleans(),
    ),
)

FIELDS = (
    "total_tokens",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "cache_write_tokens",
    "cache_write_1h_tokens",
    "reasoning_tokens",
    "cost_usd",
)


def outcome(fn: Any, body: Any) -> Any:
    try:
        found = fn(body)
    except (usage_oracle.BadUsage, _core.BadUsage) as exc:
        return ("bad", type(exc).__name__ == "BadUsage")
    if found is None:
        return None
    return (*(getattr(found, f) for f in FIELDS), found.warning is not None)


@settings(max_examples=600, deadline=None)
@given(bodies)
def test_rust_matches_the_python_reference(body: dict[str, Any]) -> None:
    assert outcome(_core.extract_usage, body) == outcome(usage_oracle.extract_usage, body)


@settings(max_examples=300, deadline=None)
@given(bodies)
def test_normalized_subsets_never_exceed_their_whole(body: dict[str, Any]) -> None:
    try:
        usage = _core.extract_usage(body)
    except _core.BadUsage:
        return
    if usage is None:
        return
    assert 0 <= usage.total_tokens < 10**12
    if usage.prompt_tokens is not None:
        assert usage.cached_tokens + usage.cache_write_tokens <= usage.prompt_tokens
    if usage.completion_tokens is not None:
        assert usage.reasoning_tokens <= usage.completion_tokens
    if (
        usage.prompt_tokens is not None
        and usage.completion_tokens is not None
        and usage.warning is None
    ):
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


texts = st.one_of(
    st.builds(lambda t: {"choices": [{"message": {"content": t}}]}, st.text(max_size=20)),
    st.builds(lambda t: {"choices": [{"delta": {"content": t}}]}, st.text(max_size=20)),
    st.builds(
        lambda ts: {"type": "message", "content": [{"type": "text", "text": t} for t in ts]},
        st.lists(st.text(max_size=5), max_size=3),
    ),
    st.builds(
        lambda t: {"type": "content_block_delta", "delta": {"type": "text_delta", "text": t}},
        st.text(max_size=20),
    ),
    st.builds(lambda t: {"type": "response.output_text.delta", "delta": t}, st.text(max_size=9)),
    st.builds(
        lambda t: {"output": [{"content": [{"type": "output_text", "text": t}]}]},
        st.text(max_size=9),
    ),
    st.text(max_size=10),
    st.just({"usage": {}}),
    st.just({"choices": []}),
)


@settings(max_examples=300, deadline=None)
@given(texts)
def test_text_extraction_matches_the_python_reference(obj: Any) -> None:
    assert _core.extract_text(obj) == usage_oracle.extract_text(obj)
