"""B3: token estimation. The Rust estimator, tiktoken and ``len // 4`` on each sample set.

Every sample set of tests/data/corpus.jsonl (English, German, French, Spanish, Russian, Arabic,
Korean, Chinese, Japanese, emoji, Python, JavaScript, Rust, Go, JSON, numbers) is counted with
each method, for cl100k_base and o200k_base. Each benchmark reports, in ``extra_info``, the
exact tokens it covers, the tokens/s (exact tokens of the set / time to count the set) and the
mean relative error per sample. The last benchmark prints the B3 table: the estimator's
throughput as a multiple of tiktoken's, measured in the same run, and the errors.

    pytest benches/bench_estimate.py --benchmark-only --benchmark-group-by group

tiktoken is skipped when its encodings cannot be loaded offline (install litellm, whose wheel
ships them, or set TIKTOKEN_CACHE_DIR).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from llmtally import _core

CORPUS = Path(__file__).resolve().parent.parent / "tests" / "data" / "corpus.jsonl"
ROWS = [json.loads(line) for line in CORPUS.read_text(encoding="utf-8").splitlines()]
SETS: dict[str, list[dict[str, Any]]] = defaultdict(list)
for _row in ROWS:
    SETS[_row["lang"]].append(_row)
ENCODINGS = ("cl100k", "o200k")
METHODS = ("llmtally", "tiktoken", "len//4")
TARGET_RATIO, FIRST_BAR_RATIO, MAX_ERROR = 10.0, 5.0, 0.10
BLOB_URLS = {
    "cl100k": "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
    "o200k": "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
}

# (set, encoding, method) -> (seconds per pass over the set, mean relative error)
RESULTS: dict[tuple[str, str, str], tuple[float, float]] = {}


def _tiktoken_encodings() -> dict[str, Any] | None:
    try:
        import tiktoken
    except ImportError:
        return None
    if not os.environ.get("TIKTOKEN_CACHE_DIR"):
        spec = importlib.util.find_spec("litellm")  # located without importing litellm
        for root in (spec.submodule_search_locations or []) if spec else []:
            folder = Path(root) / "litellm_core_utils" / "tokenizers"
            names = [hashlib.sha1(url.encode()).hexdigest() for url in BLOB_URLS.values()]
            if all((folder / name).is_file() for name in names):
                os.environ["TIKTOKEN_CACHE_DIR"] = str(folder)
        if not os.environ.get("TIKTOKEN_CACHE_DIR"):
            return None  # tiktoken would try the network
    try:
        return {key: tiktoken.get_encoding(f"{key}_base") for key in ENCODINGS}
    except Exception:
        return None


TIKTOKEN = _tiktoken_encodings()


def _counter(method: str, key: str) -> Callable[[str], int]:
    if method == "llmtally":
        return lambda text: _core.estimate_text(text, key)
    if method == "len//4":
        return lambda text: len(text) // 4
    if TIKTOKEN is None:
        pytest.skip("tiktoken or its encodings are not available offline")
    encode = TIKTOKEN[key].encode_ordinary
    return lambda text: len(encode(text))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("key", ENCODINGS)
@pytest.mark.parametrize("sample_set", sorted(SETS))
def test_b3_count(benchmark: Any, sample_set: str, key: str, method: str) -> None:
    rows = SETS[sample_set]
    texts = [r["text"] for r in rows]
    count = _counter(method, key)
    benchmark.group = f"B3 {sample_set} {key}"

    def count_all() -> list[int]:
        return [count(t) for t in texts]

    counts = benchmark.pedantic(count_all, rounds=30, warmup_rounds=3, iterations=1)
    exact = [r[key] for r in rows]
    error = sum(abs(c - e) / e for c, e in zip(counts, exact, strict=True)) / len(rows)
    seconds = benchmark.stats.stats.median
    RESULTS[(sample_set, key, method)] = (seconds, error)
    benchmark.extra_info.update(
        tokens=sum(exact),
        tokens_per_s=round(sum(exact) / seconds),
        mean_relative_error=round(error, 4),
    )
    if method == "tiktoken":
        assert error == 0.0  # the stored counts are tiktoken's


def test_b3_summary(benchmark: Any) -> None:
    """The B3 table; fails below the first bar (5x tiktoken) or above 10% mean error."""
    benchmark.group = "B3 summary"
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    if not RESULTS:
        pytest.skip("run with the count benchmarks")
    lines = [
        f"{'set':11s} {'enc':6s} {'llmtally tok/s':>15s} {'tiktoken tok/s':>15s} {'ratio':>6s}"
        f" {'err llmtally':>12s} {'err len//4':>10s}"
    ]
    ratios, failures = [], []
    for (sample_set, key, method), (seconds, error) in sorted(RESULTS.items()):
        if method != "llmtally":
            continue
        tokens = sum(r[key] for r in SETS[sample_set])
        tik = RESULTS.get((sample_set, key, "tiktoken"))
        naive = RESULTS.get((sample_set, key, "len//4"))
        ratio = tik[0] / seconds if tik else float("nan")
        if tik:
            ratios.append(ratio)
        lines.append(
            f"{sample_set:11s} {key:6s} {tokens / seconds:15,.0f} "
            + (f"{tokens / tik[0]:15,.0f} {ratio:5.1f}x" if tik else f"{'-':>15s} {'-':>6s}")
            + f" {100 * error:11.1f}% "
            + (f"{100 * naive[1]:9.1f}%" if naive else f"{'-':>10s}")
        )
        if error > MAX_ERROR:
            failures.append(f"{sample_set}/{key}: error {error:.1%}")
        if tik and ratio < FIRST_BAR_RATIO:
            failures.append(f"{sample_set}/{key}: {ratio:.1f}x tiktoken")
    if ratios:
        lines.append(f"throughput vs tiktoken: min {min(ratios):.1f}x, max {max(ratios):.1f}x")
        benchmark.extra_info["min_ratio_vs_tiktoken"] = round(min(ratios), 2)
    print("\n" + "\n".join(lines))
    benchmark.extra_info["table"] = lines
    assert not failures, failures
