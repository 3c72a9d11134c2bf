"""Properties of the token estimator: never negative, never panics, monotone under appending."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from llmtally import _core

ENCODINGS = st.sampled_from(["cl100k", "o200k"])

# Characters at the edges of the pre-tokenizer's rules: contractions, case changes, leading
# spaces and punctuation, newlines, marks, joiners, digits and other scripts.
TRICKY = st.text(
    alphabet=st.sampled_from(
        list(" \n\r\t'sltrevmdLSaBZ(.)/-_1é中あ한я\u0301\u200d\ufe0f\u00a0\u3000🎉。½")
    ),
    max_size=40,
)
ANY_TEXT = st.text(max_size=200)
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant"]), "content": ANY_TEXT},
    optional={"name": st.text(max_size=10)},
)


@given(text=ANY_TEXT, encoding=ENCODINGS)
def test_non_negative_on_any_text(text: str, encoding: str) -> None:
    n = _core.estimate_text(text, encoding)
    assert isinstance(n, int)
    assert n >= 0
    assert (n == 0) == (text == "")


@given(a=ANY_TEXT | TRICKY, b=ANY_TEXT | TRICKY, encoding=ENCODINGS)
def test_monotone_when_appending(a: str, b: str, encoding: str) -> None:
    assert _core.estimate_text(a + b, encoding) >= _core.estimate_text(a, encoding)


@given(text=TRICKY, encoding=ENCODINGS)
def test_monotone_over_every_prefix(text: str, encoding: str) -> None:
    counts = [_core.estimate_text(text[:i], encoding) for i in range(len(text) + 1)]
    assert counts == sorted(counts)


@given(text=ANY_TEXT | TRICKY, encoding=ENCODINGS)
def test_pieces_tile_the_text(text: str, encoding: str) -> None:
    raw = text.encode("utf-8", "surrogatepass")
    pos = 0
    for start, end, _features in _core._estimate_pieces(text, encoding):
        assert start == pos < end
        pos = end
    assert pos == len(raw)


@given(messages=st.lists(MESSAGE, max_size=5), extra=MESSAGE, encoding=ENCODINGS)
def test_messages_add_their_overhead(
    messages: list[dict[str, Any]], extra: dict[str, Any], encoding: str
) -> None:
    before = _core.estimate_messages(messages, encoding)
    assert before >= 3 + 3 * len(messages)
    assert _core.estimate_messages([*messages, extra], encoding) >= before + 3


@given(text=st.text(alphabet=st.characters(codec="utf-16", exclude_categories=()), max_size=50))
def test_surrogates_do_not_raise(text: str) -> None:
    assert _core.estimate_text(text, "cl100k") >= 0
