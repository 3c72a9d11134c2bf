"""The estimator's per-language table on the held-out split: error and speed against tiktoken.

    python scripts/estimator_table.py CORPUS.jsonl [--split heldout] [--by script|lang]
        [--markdown] [--no-speed]

CORPUS.jsonl is written by build_estimator_corpus.py (or is the committed sample,
tests/data/heldout_sample.jsonl). For each language (or script): the number of documents, the
mean relative error per document (|estimate - exact| / exact) for cl100k_base and o200k_base,
and the estimator's speed as a multiple of tiktoken's on the same documents (best of five passes
each, same process).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tiktoken_files import load_encodings

from llmtally import _core

KEYS = ("cl100k", "o200k")


def best_time(fn: Callable[[], object], passes: int = 5) -> float:
    best = float("inf")
    for _ in range(passes):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("corpus", type=Path)
    parser.add_argument("--split", default="heldout")
    parser.add_argument("--by", choices=("lang", "script"), default="lang")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--no-speed", action="store_true")
    args = parser.parse_args()
    rows = [json.loads(line) for line in args.corpus.read_text(encoding="utf-8").splitlines()]
    groups: dict[str, list[dict[str, object]]] = defaultdict(list)
    for r in rows:
        if r["split"] == args.split:
            groups[str(r[args.by])].append(r)
    encs = None if args.no_speed else load_encodings()
    head = ["group", "script", "docs", "err cl100k", "err o200k", "bias cl", "bias o"]
    if encs is not None:
        head += ["x tiktoken cl", "x tiktoken o"]
    out = []
    worst = {k: (0.0, "") for k in KEYS}
    for name in sorted(groups, key=lambda g: (str(groups[g][0]["script"]), g)):
        rs = groups[name]
        texts = [str(r["text"]) for r in rs]
        cells = [name, str(rs[0]["script"]), str(len(rs))]
        biases = []
        for key in KEYS:
            est = [_core.estimate_text(t, key) for t in texts]
            exact = [int(r[key]) for r in rs]  # type: ignore[call-overload]
            err = sum(abs(e - x) / x for e, x in zip(est, exact, strict=True)) / len(rs)
            bias = sum((e - x) / x for e, x in zip(est, exact, strict=True)) / len(rs)
            cells.append(f"{100 * err:.1f}%")
            biases.append(f"{100 * bias:+.1f}%")
            worst[key] = max(worst[key], (err, name))
        cells += biases
        if encs is not None:
            for key in KEYS:
                encode = encs[key].encode_ordinary  # type: ignore[attr-defined]

                def run_est(key: str = key, texts: list[str] = texts) -> None:
                    for t in texts:
                        _core.estimate_text(t, key)

                def run_tik(
                    encode: Callable[[str], object] = encode, texts: list[str] = texts
                ) -> None:
                    for t in texts:
                        encode(t)

                t_est, t_tik = best_time(run_est), best_time(run_tik)
                cells.append(f"{t_tik / t_est:.1f}x")
        out.append(cells)
    if args.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for cells in out:
            print("| " + " | ".join(cells) + " |")
    else:
        widths = [max(len(c[i]) for c in [head, *out]) for i in range(len(head))]
        for cells in [head, *out]:
            print("  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)))
    for key in KEYS:
        err, name = worst[key]
        print(f"worst {key}: {name} {100 * err:.1f}%")


if __name__ == "__main__":
    main()
