"""The token estimator (Rust) and estimate_tokens (Python): API, errors and accuracy.

Accuracy is checked against the exact counts stored in tests/data/corpus.jsonl, so it needs no
tokenizer. Tests that compare with tiktoken itself load its encodings offline (from litellm's
bundled files, or TIKTOKEN_CACHE_DIR) and skip when they cannot.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import types
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from llmtally import _core, tokens
from llmtally.errors import LlmtallyError, TokenizerUnavailable
from llmtally.tokens import encoding_for_model, estimate_tokens

CORPUS = Path(__file__).resolve().parent.parent / "data" / "corpus.jsonl"
ENCODINGS = ("cl100k", "o200k")
MAX_MEAN_RELATIVE_ERROR = 0.10
BLOB_URLS = {
    "cl100k_base": "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
    "o200k_base": "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
}


def load_corpus() -> list[dict[str, Any]]:
    lines = CORPUS.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


CORPUS_ROWS = load_corpus()
LANGS = sorted({r["lang"] for r in CORPUS_ROWS})


def offline_cache_dir() -> str | None:
    """A folder tiktoken can load both encodings from without network access."""
    if os.environ.get("TIKTOKEN_CACHE_DIR"):
        return os.environ["TIKTOKEN_CACHE_DIR"]
    spec = importlib.util.find_spec("litellm")  # found without importing litellm
    for root in (spec.submodule_search_locations or []) if spec else []:
        folder = Path(root) / "litellm_core_utils" / "tokenizers"
        names = [hashlib.sha1(url.encode()).hexdigest() for url in BLOB_URLS.values()]
        if all((folder / name).is_file() for name in names):
            return str(folder)
    return None


@pytest.fixture(scope="module")
def tiktoken_encodings() -> Iterator[dict[str, Any]]:
    try:
        import tiktoken
    except ImportError as exc:
        pytest.skip(f"tiktoken is not available: {exc}")
    folder = offline_cache_dir()
    if folder is None:
        pytest.skip("no offline tiktoken encodings (install litellm or set TIKTOKEN_CACHE_DIR)")
    saved = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = folder
    try:
        encs = {key: tiktoken.get_encoding(f"{key}_base") for key in ENCODINGS}
    except Exception as exc:
        pytest.skip(f"tiktoken cannot load its encodings offline: {exc}")
    tokens._ENCODERS.clear()
    tokens._FAILURES.clear()
    yield encs
    tokens._ENCODERS.clear()
    tokens._FAILURES.clear()
    if saved is None:
        os.environ.pop("TIKTOKEN_CACHE_DIR", None)
    else:
        os.environ["TIKTOKEN_CACHE_DIR"] = saved


# -- the estimate ----------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["cl100k", "o200k", "cl100k_base", "o200k_base"])
def test_encoding_names(encoding: str) -> None:
    assert _core.estimate_text("", encoding) == 0
    assert 9 <= _core.estimate_text("The quick brown fox jumps over the lazy dog.", encoding) <= 11


def test_scripts_are_not_counted_like_english() -> None:
    # len // 4 would say 3; cl100k uses about one token per Chinese character.
    text = "这是一个用于测试的中文句子。"
    assert _core.estimate_text(text, "cl100k") >= 10
    assert _core.estimate_text("😀" * 10, "cl100k") >= 10
    assert _core.estimate_text("1234567890", "cl100k") == 4


def test_model_selects_encoding() -> None:
    text = "Привет, как дела? Всё хорошо."
    assert encoding_for_model("openai/gpt-4o-mini") == "o200k_base"
    assert encoding_for_model(None) == "cl100k_base"
    assert estimate_tokens(text, "gpt-4o") == _core.estimate_text(text, "o200k")
    assert estimate_tokens(text, "gpt-4") == _core.estimate_text(text, "cl100k")
    assert estimate_tokens(text) == _core.estimate_text(text, "cl100k")


def test_bad_arguments_raise_typed_errors() -> None:
    with pytest.raises(ValueError, match="unknown encoding"):
        _core.estimate_text("x", "p50k")
    with pytest.raises(TypeError):
        _core.estimate_text(b"x")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        _core.estimate_text(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="str or a list"):
        estimate_tokens(42)  # type: ignore[arg-type]


def test_lone_surrogates_are_estimated() -> None:
    assert _core.estimate_text("abc \ud800 def", "cl100k") >= 2
    assert _core.estimate_messages([{"role": "user", "content": "\udfff"}], "o200k") >= 7


def test_long_strings_from_many_threads() -> None:
    text = "A long document, repeated. Ein langer Text. 長い文書です。\n" * 2000
    expected = _core.estimate_text(text, "o200k")
    assert expected > 20_000
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: _core.estimate_text(text, "o200k"), range(16)))
    assert results == [expected] * 16


# -- chat messages ----------------------------------------------------------------------------


def est(text: str) -> int:
    return _core.estimate_text(text, "cl100k")


def test_message_overhead() -> None:
    assert _core.estimate_messages([], "cl100k") == 3
    msgs = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "name": "ada", "content": "Hi there!"},
    ]
    expected = 3 + (3 + est("system") + est("You are terse."))
    expected += 3 + est("user") + 1 + est("ada") + est("Hi there!")
    assert _core.estimate_messages(msgs, "cl100k") == expected
    assert estimate_tokens(msgs) == expected
    assert estimate_tokens(tuple(msgs)) == expected


def test_message_content_parts() -> None:
    parts = [
        {"type": "text", "text": "Describe this image."},
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
        "and this",
    ]
    msgs = [{"role": "user", "content": parts}, {"role": "assistant", "content": None}]
    expected = 3 + 3 + est("user") + est("Describe this image.") + est("and this")
    expected += 3 + est("assistant")
    assert estimate_tokens(msgs) == expected


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        (["hello"], "must be a dict"),
        ([None], "must be a dict"),
        ([{"role": "user", "content": 5}], "content must be"),
        ([{"role": 5, "content": "x"}], "'role' must be a str"),
        ([{"role": "user", "name": ["x"], "content": "x"}], "'name' must be a str"),
        ([{"role": "user", "content": [1, 2]}], "content part"),
    ],
)
def test_malformed_messages(messages: list[Any], match: str) -> None:
    with pytest.raises(TypeError, match=match):
        estimate_tokens(messages)


# -- accuracy against the stored exact counts -----------------------------------------------


def mean_relative_error(rows: list[dict[str, Any]], key: str) -> float:
    errs = [abs(_core.estimate_text(r["text"], key) - r[key]) / r[key] for r in rows]
    return sum(errs) / len(errs)


def test_corpus_covers_the_required_sample_sets() -> None:
    required = {"english", "chinese", "japanese", "korean", "russian", "arabic", "german"}
    required |= {"french", "spanish", "python", "javascript", "rust", "go", "json", "emoji"}
    assert required | {"numbers"} <= set(LANGS)
    for lang in LANGS:
        rows = [r for r in CORPUS_ROWS if r["lang"] == lang]
        assert len(rows) >= 20
        assert all(50 <= len(r["text"]) <= 2100 for r in rows)


@pytest.mark.parametrize("key", ENCODINGS)
@pytest.mark.parametrize("split", ["calib", "eval"])
def test_mean_relative_error_per_language(key: str, split: str) -> None:
    by_lang: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in CORPUS_ROWS:
        if r["split"] == split:
            by_lang[r["lang"]].append(r)
    errors = {lang: mean_relative_error(rows, key) for lang, rows in by_lang.items()}
    too_far = {lang: round(e, 3) for lang, e in errors.items() if e > MAX_MEAN_RELATIVE_ERROR}
    assert not too_far, f"{key} {split}: mean relative error above 10%: {too_far}"


def test_estimate_beats_len_over_4() -> None:
    for key in ENCODINGS:
        for lang in ("english", "chinese", "json"):
            rows = [r for r in CORPUS_ROWS if r["lang"] == lang]
            naive = sum(abs(len(r["text"]) // 4 - r[key]) / r[key] for r in rows) / len(rows)
            assert mean_relative_error(rows, key) < naive / 2


# -- exact counts through tiktoken ------------------------------------------------------------


def test_exact_without_tiktoken(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokens, "_ENCODERS", {})
    monkeypatch.setattr(tokens, "_FAILURES", {})
    monkeypatch.setitem(sys.modules, "tiktoken", None)
    with pytest.raises(TokenizerUnavailable, match="tiktoken, which is not installed") as info:
        estimate_tokens("hello", exact=True)
    assert isinstance(info.value, LlmtallyError)
    assert isinstance(info.value, LookupError)
    # The failure is remembered, and the estimate still works.
    with pytest.raises(TokenizerUnavailable):
        estimate_tokens([{"role": "user", "content": "hello"}], exact=True)
    assert estimate_tokens("hello") == 1


def test_exact_when_the_encoding_cannot_load(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("tiktoken")

    def get_encoding(name: str) -> Any:
        raise OSError(f"cannot download {name}")

    fake.get_encoding = get_encoding  # type: ignore[attr-defined]
    monkeypatch.setattr(tokens, "_ENCODERS", {})
    monkeypatch.setattr(tokens, "_FAILURES", {})
    monkeypatch.setitem(sys.modules, "tiktoken", fake)
    with pytest.raises(TokenizerUnavailable, match="TIKTOKEN_CACHE_DIR"):
        estimate_tokens("hello", model="gpt-4o", exact=True)


def test_exact_counts(tiktoken_encodings: dict[str, Any]) -> None:
    text = "Exact counts: 12345 naïve café 東京 🎉"
    for model, key in (("gpt-4", "cl100k"), ("gpt-4o", "o200k")):
        enc = tiktoken_encodings[key]
        assert estimate_tokens(text, model, exact=True) == len(enc.encode(text))
        msgs = [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "name": "ada", "content": [{"type": "text", "text": text}]},
        ]
        expected = 3 + sum(
            3 + sum(len(enc.encode(v)) for v in (m["role"], m.get("name")) if v) for m in msgs
        )
        expected += 1 + len(enc.encode("Be brief.")) + len(enc.encode(text))
        assert estimate_tokens(msgs, model, exact=True) == expected
    assert estimate_tokens("<|endoftext|>", exact=True) > 1  # special tokens are plain text


def test_stored_counts_match_tiktoken(tiktoken_encodings: dict[str, Any]) -> None:
    for r in CORPUS_ROWS:
        for key, enc in tiktoken_encodings.items():
            assert len(enc.encode_ordinary(r["text"])) == r[key], (r["lang"], key)


EDGE_CASES = [
    "don't I'LL they're 'sun x's ''s",
    "getElementById HTMLParser iPhone ABCdef",
    "  \n\n   x\t\ty  \r\n  \u00a0z\u3000w  ",
    "((a)) .b ...c -> => !== /* x */ a.\n/b",
    "नमस्ते दुनिया, यह एक परीक्षण है। สวัสดีครับ",
    "café naïve e\u0301 \u0301x ❤️ love❤️ 👩‍👩‍👧 🏃‍♀️",
    "Ⅻ ½ ² ①②③④ ٣٤٥٦ 1234567",
    "تُخزَّن مستعدًا",
]


@pytest.mark.parametrize("key", ENCODINGS)
def test_pieces_match_tiktoken_regex(key: str, tiktoken_encodings: dict[str, Any]) -> None:
    try:
        import regex
    except ImportError as exc:
        pytest.skip(f"the regex module is not available: {exc}")
    pattern = regex.compile(tiktoken_encodings[key]._pat_str)
    for text in [r["text"] for r in CORPUS_ROWS] + EDGE_CASES:
        raw = text.encode()
        pieces = [raw[s:e].decode() for s, e, _ in _core._estimate_pieces(text, key)]
        assert pieces == pattern.findall(text), text[:80]
