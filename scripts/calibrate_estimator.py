"""Fit the estimator's per-feature costs against tiktoken and rewrite rust/estimate_coef.rs.

The Rust pre-tokenizer cuts each calibration sample into the same pieces as tiktoken's regex and
lists the features of each piece (``_core._estimate_pieces``). tiktoken's BPE never crosses a
piece, so every piece has an exact token count of its own; the costs are the least squares fit
of those counts (each language weighted equally; every cost >= 0, see ``lower_bounds``), then
adjusted so the estimate never decreases when text is appended (see ``constrain``).

    pip install -e . tiktoken litellm numpy scipy
    python scripts/calibrate_estimator.py          # fit on the calib split, report both splits
    pip install -e .                               # rebuild with the new costs

Needs the compiled extension (for the pre-tokenizer) and tiktoken's encodings (offline through
litellm's bundled files, see _tiktoken_files.py).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy.optimize import lsq_linear

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tiktoken_files import load_encodings

from llmtally import _core

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "data" / "corpus.jsonl"
OUT = ROOT / "rust" / "estimate_coef.rs"
VOCAB_DIR = ROOT / "rust" / "estimate_vocab"
VOCAB_SIZE = (16384, 4096)  # words after a space, words without one
SCALE_BITS = 12
SCALE = 1 << SCALE_BITS

# Classes the corpus does not cover borrow the costs of a similar one.
ANALOGS = {
    "greek": "cyrillic",
    "hebrew": "arabic",
    "other_letter": "arabic",
    "sym4": "emoji",
    "tab": "space",
    "other]": "space]",
}


def load_corpus(split: str | None) -> list[dict[str, object]]:
    rows = [json.loads(line) for line in CORPUS.read_text(encoding="utf-8").splitlines()]
    return [r for r in rows if split is None or r["split"] == split]


def piece_rows(text: str, key: str, enc: object) -> list[tuple[tuple[int, ...], int]]:
    """(feature counts as a sorted tuple of ids, exact tokens) for each piece of ``text``."""
    raw = text.encode()
    out = []
    for start, end, feats in _core._estimate_pieces(text, key):
        tokens = len(enc.encode_ordinary(raw[start:end].decode()))  # type: ignore[attr-defined]
        out.append((tuple(sorted(feats)), tokens))
    return out


def fit(
    rows: list[dict[str, object]], key: str, enc: object, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares costs (in tokens, bounded below) and how often each feature was seen."""
    lang_tokens: dict[str, int] = defaultdict(int)
    for r in rows:
        lang_tokens[str(r["lang"])] += int(r[key])  # type: ignore[call-overload]
    groups: dict[tuple[int, ...], list[float]] = defaultdict(lambda: [0.0, 0.0])
    seen = np.zeros(n)
    for r in rows:
        w = 1.0 / lang_tokens[str(r["lang"])]
        for feats, tokens in piece_rows(str(r["text"]), key, enc):
            g = groups[feats]
            g[0] += w
            g[1] += w * tokens
            for f in feats:
                seen[f] += 1
    a = np.zeros((len(groups), n))
    y = np.zeros(len(groups))
    for k, (feats, (w, wt)) in enumerate(groups.items()):
        sw = np.sqrt(w)
        for f in feats:
            a[k, f] += sw
        y[k] = sw * (wt / w)
    cols = np.flatnonzero(seen)
    lower = lower_bounds(list(_core._estimate_feature_names()))[cols]
    coef = np.zeros(n)
    coef[cols] = lsq_linear(a[:, cols], y, bounds=(lower, np.inf)).x
    return coef, seen


def lower_bounds(names: list[str]) -> np.ndarray:
    """0 for every cost, and 1 for the feature that opens a piece on its own (a piece is at least
    one token), so no non-empty text is estimated at 0."""
    opening = ("word_first[none]", "vocab[none]", "digits")
    return np.array(
        [
            1.0
            if name.startswith(opening)
            or (name.endswith("][0]") and name.startswith(("punct[", "ws[")))
            else 0.0
            for name in names
        ]
    )


def fill_unseen(coef: np.ndarray, seen: np.ndarray, names: list[str]) -> None:
    """Unseen features take the cost of an analogous class, else of the previous position."""
    index = {name: i for i, name in enumerate(names)}
    for i, name in enumerate(names):
        if seen[i]:
            continue
        for a, b in ANALOGS.items():
            j = index.get(name.replace(a, b))
            if a in name and j is not None and seen[j]:
                coef[i] = coef[j]
                break
        else:
            same_group = (
                i > 0 and name[: name.rfind("[")] == names[i - 1][: names[i - 1].rfind("[")]
            )
            coef[i] = coef[i - 1] if same_group else 1.0


def constrain(coef: np.ndarray, names: list[str]) -> None:
    """Make the estimate non-decreasing under appending (all costs are already >= 0).

    - A whitespace character that leaves the end of a run to lead the next word costs what it
      cost alone, so no later position of a whitespace class may cost more than its first.
    - ``'l`` (a word after an apostrophe) becomes the contraction ``'ll``: the contraction must
      cost at least as much as an ASCII letter leading a word after punctuation.
    - A listed word that grows into an unlisted one (``B`` into ``Bd``) is then costed letter by
      letter: its first letter must cost at least what the listed word did.
    """
    index = {name: i for i, name in enumerate(names)}
    for prefix in ("none", "space"):
        listed = coef[index[f"vocab[{prefix}]"]]
        for c in ("ascii_lower", "ascii_upper"):
            j = index[f"word_first[{prefix}][{c}]"]
            coef[j] = max(coef[j], listed)
    for w in ("space", "tab", "newline", "other"):
        first = coef[index[f"ws[{w}][0]"]]
        for pos in range(1, 9):
            j = index[f"ws[{w}][{pos}]"]
            coef[j] = min(coef[j], first)
    floor = max(coef[index[f"word_first[other][{c}]"]] for c in ("ascii_lower", "ascii_upper"))
    coef[index["contraction"]] = max(coef[index["contraction"]], floor)


def write_vocab(encs: dict[str, object], spaced: int, bare: int) -> None:
    """The lowest-ranked tokens of each encoding that are an ASCII word: ``spaced`` of them with a
    leading space, ``bare`` without."""
    patterns = ((re.compile(rb"^ [A-Za-z]+$"), spaced), (re.compile(rb"^[A-Za-z]+$"), bare))
    VOCAB_DIR.mkdir(exist_ok=True)
    for key, enc in encs.items():
        words: list[str] = []
        for pattern, size in patterns:
            found = []
            for rank in range(enc.n_vocab):  # type: ignore[attr-defined]
                try:
                    raw = enc.decode_single_token_bytes(rank)  # type: ignore[attr-defined]
                except KeyError:
                    continue
                if pattern.match(raw):
                    found.append(raw.decode())
                    if len(found) == size:
                        break
            words += sorted(found)
        (VOCAB_DIR / f"{key}.txt").write_text("\n".join(words) + "\n", encoding="ascii")
        print(f"wrote {len(words)} words to {VOCAB_DIR / f'{key}.txt'}")


def estimate(fixed: np.ndarray, text: str, key: str) -> int:
    """The Rust estimator's arithmetic, with the given fixed-point costs."""
    total = sum(int(fixed[f]) for _, _, feats in _core._estimate_pieces(text, key) for f in feats)
    return (total + SCALE // 2) >> SCALE_BITS


def mre(rows: list[dict[str, object]], key: str, count: Callable[[str], int]) -> float:
    """Mean over samples of |count - exact| / exact."""
    errs = [abs(count(str(r["text"])) - int(r[key])) / int(r[key]) for r in rows]  # type: ignore[call-overload]
    return sum(errs) / len(errs)


def report(tables: dict[str, np.ndarray], rows: list[dict[str, object]]) -> None:
    for split in ("calib", "eval"):
        print(f"\nmean relative error per sample, split={split}")
        print(f"{'lang':12s} {'cl100k':>8s} {'o200k':>8s} {'len//4 cl':>10s} {'len//4 o':>9s}")
        by_lang: dict[str, list[dict[str, object]]] = defaultdict(list)
        for r in rows:
            if r["split"] == split:
                by_lang[str(r["lang"])].append(r)
        for lang, rs in by_lang.items():
            cells = []
            for key in ("cl100k", "o200k"):
                err = mre(rs, key, lambda text, key=key: estimate(tables[key], text, key))
                cells.append(f"{100 * err:7.1f}%")
            cells += [
                f"{100 * mre(rs, key, lambda text: len(text) // 4):8.1f}%"
                for key in ("cl100k", "o200k")
            ]
            print(f"{lang:12s} " + " ".join(cells))


def write(tables: dict[str, np.ndarray], names: list[str]) -> None:
    lines = [
        "//! Costs of the estimator's features, in 1/2^SCALE_BITS tokens.",
        "//!",
        "//! Generated by scripts/calibrate_estimator.py from tests/data/corpus.jsonl.",
        "",
        f"pub const SCALE_BITS: u32 = {SCALE_BITS};",
    ]
    for const, key in (("CL100K", "cl100k"), ("O200K", "o200k")):
        lines += ["", "#[rustfmt::skip]", f"pub const {const}: [u32; super::N_FEATURES] = ["]
        lines += [f"    {int(v)}, // {name}" for v, name in zip(tables[key], names, strict=True)]
        lines.append("];")
    OUT.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {OUT}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", default="calib", help="split to fit on ('all' for every sample)")
    parser.add_argument("--dry-run", action="store_true", help="report, do not rewrite the costs")
    parser.add_argument(
        "--vocab",
        type=int,
        nargs=2,
        metavar=("SPACED", "BARE"),
        help="rewrite the word lists (SPACED words after a space, BARE without; the shipped "
        f"lists use {VOCAB_SIZE[0]} {VOCAB_SIZE[1]}), then stop: rebuild the extension and run "
        "again to fit the costs",
    )
    args = parser.parse_args()
    encs = load_encodings()
    if encs is None:
        sys.exit("tiktoken with cl100k_base/o200k_base is needed (pip install tiktoken litellm)")
    if args.vocab is not None:
        write_vocab(encs, *args.vocab)
        return
    names = list(_core._estimate_feature_names())
    rows = load_corpus(None)
    train = [r for r in rows if args.split == "all" or r["split"] == args.split]
    tables = {}
    for key, enc in encs.items():
        coef, seen = fit(train, key, enc, len(names))
        fill_unseen(coef, seen, names)
        constrain(coef, names)
        tables[key] = np.round(coef * SCALE).astype(np.int64)
    report(tables, rows)
    if not args.dry_run:
        write(tables, names)


if __name__ == "__main__":
    main()
