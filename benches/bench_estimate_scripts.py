"""B3 by script: the Rust estimator next to tiktoken on every script of the held-out corpus.

The documents are the held-out split of scripts/build_estimator_corpus.py: by default the few
documents per language committed in tests/data/heldout_sample.jsonl, or the whole held-out split
of a corpus built on this machine (``LLMTALLY_ESTIMATOR_CORPUS=/path/corpus.jsonl``). For each
script and encoding, the estimator and tiktoken count the same documents in the same run; each
benchmark reports the exact tokens, tokens/s and the mean relative error per document. The last
benchmark prints the table (speed as a multiple of tiktoken's, error) and fails when a script is
below 5x tiktoken (the floor; the target is 10x) or above 10% mean error.

    pytest benches/bench_estimate_scripts.py --benchmark-only --benchmark-group-by group
    LLMTALLY_ESTIMATOR_CORPUS=/tmp/corpus.jsonl pytest benches/bench_estimate_scripts.py ...

tiktoken is skipped when its encodings cannot be loaded offline (install litellm, whose wheel
ships them, or set TIKTOKEN_CACHE_DIR).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bench_estimate import TIKTOKEN
from llmtally import _core

SAMPLE = Path(__file__).resolve().parent.parent / "tests" / "data" / "heldout_sample.jsonl"
CORPUS = Path(os.environ.get("LLMTALLY_ESTIMATOR_CORPUS") or SAMPLE)
SCRIPTS: dict[str, list[dict[str, Any]]] = defaultdict(list)
for _line in CORPUS.read_text(encoding="utf-8").splitlines():
    _row = json.loads(_line)
    if _row["split"] == "heldout":
        SCRIPTS[_row["script"]].append(_row)
ENCODINGS = ("cl100k", "o200k")
METHODS = ("llmtally", "tiktoken")
TARGET_RATIO, FLOOR_RATIO, MAX_ERROR = 10.0, 5.0, 0.10

# (script, encoding, method) -> (seconds per pass over the script's documents, mean error)
RESULTS: dict[tuple[str, str, str], tuple[float, float]] = {}


def _counter(method: str, key: str) -> Callable[[str], int]:
    if method == "llmtally":
        return lambda text: _core.estimate_text(text, key)
    if TIKTOKEN is None:
        pytest.skip("tiktoken or its encodings are not available offline")
    encode = TIKTOKEN[key].encode_ordinary
    return lambda text: len(encode(text))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("key", ENCODINGS)
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_b3_script(benchmark: Any, script: str, key: str, method: str) -> None:
    rows = SCRIPTS[script]
    texts = [r["text"] for r in rows]
    count = _counter(method, key)
    benchmark.group = f"B3 script {script} {key}"

    def count_all() -> list[int]:
        return [count(t) for t in texts]

    counts = benchmark.pedantic(count_all, rounds=20, warmup_rounds=2, iterations=1)
    exact = [int(r[key]) for r in rows]
    error = sum(abs(c - e) / e for c, e in zip(counts, exact, strict=True)) / len(rows)
    seconds = benchmark.stats.stats.min
    RESULTS[(script, key, method)] = (seconds, error)
    benchmark.extra_info.update(
        documents=len(rows),
        tokens=sum(exact),
        tokens_per_s=round(sum(exact) / seconds),
        mean_relative_error=round(error, 4),
    )
    if method == "tiktoken":
        assert error == 0.0  # the stored counts are tiktoken's


def test_b3_scripts_summary(benchmark: Any) -> None:
    """The per-script table; fails below the floor (5x tiktoken) or above 10% mean error."""
    benchmark.group = "B3 scripts summary"
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    if not RESULTS:
        pytest.skip("run with the per-script benchmarks")
    lines = [
        f"{'script':16s} {'enc':6s} {'docs':>5s} {'llmtally tok/s':>15s} {'tiktoken tok/s':>15s}"
        f" {'ratio':>6s} {'error':>6s}"
    ]
    ratios, failures = [], []
    for (script, key, method), (seconds, error) in sorted(RESULTS.items()):
        if method != "llmtally":
            continue
        rows = SCRIPTS[script]
        tokens = sum(int(r[key]) for r in rows)
        tik = RESULTS.get((script, key, "tiktoken"))
        ratio = tik[0] / seconds if tik else float("nan")
        lines.append(
            f"{script:16s} {key:6s} {len(rows):5d} {tokens / seconds:15,.0f} "
            + (f"{tokens / tik[0]:15,.0f} {ratio:5.1f}x" if tik else f"{'-':>15s} {'-':>6s}")
            + f" {100 * error:5.1f}%"
        )
        if error > MAX_ERROR:
            failures.append(f"{script}/{key}: error {error:.1%}")
        if tik:
            ratios.append(ratio)
            if ratio < FLOOR_RATIO:
                failures.append(f"{script}/{key}: {ratio:.1f}x tiktoken")
    if ratios:
        below = sum(r < TARGET_RATIO for r in ratios)
        lines.append(
            f"throughput vs tiktoken: min {min(ratios):.1f}x, max {max(ratios):.1f}x; "
            f"{below} of {len(ratios)} below the {TARGET_RATIO:.0f}x target"
        )
        benchmark.extra_info["min_ratio_vs_tiktoken"] = round(min(ratios), 2)
    print("\n" + "\n".join(lines))
    benchmark.extra_info["table"] = lines
    assert not failures, failures
