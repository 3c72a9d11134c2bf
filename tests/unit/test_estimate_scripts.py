"""The estimator on every script: mean error per document on a held-out sample.

tests/data/heldout_sample.jsonl is a few documents per language of the held-out split written by
scripts/build_estimator_corpus.py (gettext catalogs, Vim tutors, licences, READMEs, standard
library code, JSON, base64 and punctuation runs found on a Debian machine); no document shares a
message or a file with the text the estimator was fitted to. The exact counts are tiktoken's,
stored with each document, so this needs no tokenizer.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from llmtally import _core

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "heldout_sample.jsonl"
ROWS: list[dict[str, Any]] = [
    json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()
]
MAX_SCRIPT_ERROR = 0.10
REQUIRED_SCRIPTS = {
    "latin", "cyrillic", "greek", "arabic", "hebrew", "armenian", "georgian", "devanagari",
    "bengali", "gurmukhi", "gujarati", "oriya", "tamil", "telugu", "kannada", "malayalam",
    "sinhala", "thai", "tibetan", "myanmar", "khmer", "japanese", "hangul", "han_simplified",
    "han_traditional",
}  # fmt: skip


def mean_error(rows: list[dict[str, Any]], key: str) -> float:
    errs = [abs(_core.estimate_text(r["text"], key) - int(r[key])) / int(r[key]) for r in rows]
    return sum(errs) / len(errs)


def test_sample_covers_the_required_scripts_and_languages() -> None:
    assert {r["split"] for r in ROWS} == {"heldout"}
    assert {r["script"] for r in ROWS} >= REQUIRED_SCRIPTS
    langs = {r["lang"] for r in ROWS}
    assert langs >= {"fa", "ja", "zh_TW", "ka", "dz", "hi", "ta", "my", "base64", "python"}


@pytest.mark.parametrize("key", ["cl100k", "o200k"])
def test_mean_error_per_script(key: str) -> None:
    by_script: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in ROWS:
        by_script[r["script"]].append(r)
    errors = {s: round(mean_error(rows, key), 3) for s, rows in by_script.items()}
    assert not {s: e for s, e in errors.items() if e > MAX_SCRIPT_ERROR}, errors


@pytest.mark.parametrize("key", ["cl100k", "o200k"])
def test_base64_is_not_undercounted(key: str) -> None:
    rows = [r for r in ROWS if r["lang"] == "base64"]
    assert mean_error(rows, key) <= MAX_SCRIPT_ERROR


@pytest.mark.parametrize("key", ["cl100k", "o200k"])
def test_repeated_punctuation_is_not_a_token_per_character(key: str) -> None:
    # tiktoken: 2 tokens in both encodings; the estimate was 73 for o200k.
    assert _core.estimate_text("=" * 79, key) <= 10


# tiktoken's counts (cl100k, o200k): BPE cuts a long run into tokens of 8 to 64 characters.
LONG_RUNS = {
    "=" * 1000: (17, 16),
    "-" * 5000: (79, 78),
    "~" * 1000: (32, 32),
    "_" * 5000: (79, 79),
    "#" * 200: (3, 3),
    "\u2500" * 1000: (125, 63),
}


@pytest.mark.parametrize("run", sorted(LONG_RUNS))
def test_long_punctuation_runs(run: str) -> None:
    for key, exact in zip(("cl100k", "o200k"), LONG_RUNS[run], strict=True):
        estimate = _core.estimate_text(run, key)
        assert abs(estimate - exact) <= max(2, exact // 5), (run[0], len(run), key, estimate)
