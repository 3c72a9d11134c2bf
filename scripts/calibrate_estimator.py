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
litellm's bundled files, see _tiktoken_files.py). numpy and scipy are needed by this script only:
they are neither a runtime nor a test dependency of llmtally (install them by hand to refit).

    python scripts/calibrate_estimator.py --vocab             # rewrite estimate_vocab/*.words
    python scripts/calibrate_estimator.py /tmp/corpus.jsonl   # refit on the built corpus too
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
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


def load_corpus(extra: list[Path]) -> list[dict[str, object]]:
    """The hand-written corpus (splits calib/eval) and the built ones (calib/heldout)."""
    rows = []
    for path in [CORPUS, *extra]:
        rows += [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return rows


def boundaries(text: str, enc: object) -> np.ndarray:
    """Byte offsets where tiktoken's tokens of ``text`` start, and its length in bytes."""
    lengths = [len(b) for b in enc.decode_tokens_bytes(enc.encode_ordinary(text))]  # type: ignore[attr-defined]
    return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])


# Sets weighed more than one language each: most text sent to a model is English, code or JSON.
HEAVY = {"english": 8.0, "python": 4.0, "javascript": 4.0, "rust": 4.0, "go": 4.0, "c": 4.0}
HEAVY |= {"json": 4.0, "en@quot": 2.0, "en@boldquot": 2.0}
# The hand-written prose of tests/data/corpus.jsonl: running text, not interface strings.
HEAVY |= dict.fromkeys(["german", "french", "spanish", "russian", "arabic", "emoji"], 6.0)
HEAVY |= dict.fromkeys(["korean", "chinese", "japanese"], 3.0)


def lang_weights(rows: list[dict[str, object]]) -> dict[str, float]:
    """Each language weighs the same in the fit, whatever its amount of text (HEAVY apart)."""
    chars: dict[str, int] = defaultdict(int)
    for r in rows:
        chars[str(r["lang"])] += len(str(r["text"]))
    return {lang: HEAVY.get(lang, 1.0) * 1e6 / n for lang, n in chars.items()}


Stats = list[dict[int, list[float]]]


def context_stats(rows: list[dict[str, object]], key: str, enc: object) -> tuple[Stats, Stats]:
    """Per back-off level (0: the character and two before it ... 3: the letter class), the
    weighted sum of values, weight and count of every context seen, and each context's parent
    (the next shorter one).

    A character's value is the number of token boundaries inside it, plus one when a token starts
    at it and it is not the first letter of its word or the first mark of its run."""
    weights = lang_weights(rows)
    acc: Stats = [defaultdict(lambda: [0.0, 0.0, 0.0]) for _ in range(4)]
    parent: Stats = [{} for _ in range(4)]
    for r in rows:
        text = str(r["text"])
        w = weights[str(r["lang"])]
        starts = boundaries(text, enc)
        rows_ctx = _core._estimate_contexts(text, key)
        if not rows_ctx:
            continue
        se = np.array([(s, e) for s, e, _ in rows_ctx], dtype=np.int64)
        lo = np.searchsorted(starts, se[:, 0])
        hi = np.searchsorted(starts, se[:, 1])
        begins = (lo < len(starts)) & (starts[np.minimum(lo, len(starts) - 1)] == se[:, 0])
        values = hi - lo
        for (_, _, (pos, keys)), v, b in zip(
            rows_ctx, values.tolist(), begins.tolist(), strict=True
        ):
            if pos in (0, 4) and b:
                v -= 1
            for level, k in enumerate(keys):
                a = acc[level][k]
                a[0] += w * v
                a[1] += w
                a[2] += 1
                if level < 3:
                    parent[level][k] = keys[level + 1]  # type: ignore[assignment]
    return acc, parent


MIN_COUNT = (4, 3, 1, 1)  # times a context must be seen to be kept, per level
MIN_MOVE = (0.12, 0.08, 0.0, 0.0)  # tokens it must differ from its back-off by


def prune_table(acc: Stats, parent: Stats) -> dict[int, int]:
    """The contexts worth keeping, as fixed-point costs: every letter class and character seen,
    and a longer context only where it was seen often enough and moves the cost."""
    kept: dict[int, float] = {}
    effective: list[dict[int, float]] = [{} for _ in range(4)]
    for level in (3, 2, 1, 0):
        for k, (vw, w, n) in acc[level].items():
            value = vw / w
            base = value if level == 3 else effective[level + 1][parent[level][k]]  # type: ignore[index]
            if n >= MIN_COUNT[level] and (level == 3 or abs(value - base) >= MIN_MOVE[level]):
                kept[k] = value
                effective[level][k] = value
            else:
                effective[level][k] = base
    return {k: min(round(v * SCALE), 0xFFFF) for k, v in kept.items()}


def write_table(table: dict[int, int], key: str) -> None:
    path = VOCAB_DIR / f"{key}.ctx"
    with path.open("wb") as f:
        for k in sorted(table):
            f.write(struct.pack("<IH", k, table[k]))
    print(f"wrote {len(table)} contexts to {path}")


LONG_RUN = 32  # a repeated character from this position on costs 1 / its longest run token


def long_runs(table: dict[int, int], key: str, enc: object) -> None:
    """Costs of a punctuation character repeated far into a run, from the vocabulary rather than
    the corpus (long runs are rare there): BPE merges a run of ``c`` pairwise, so tiktoken cuts a
    long run into tokens of ``L`` characters, the largest power of two whose run ``c * L`` is a
    token (``=`` 64, ``~`` 32, ``─`` 8 in cl100k...); each character from position LONG_RUN on
    costs 1 / L."""
    import unicodedata

    longest: dict[str, int] = {}
    for rank in range(enc.n_vocab):  # type: ignore[attr-defined]
        try:
            text = enc.decode_single_token_bytes(rank).decode()  # type: ignore[attr-defined]
        except (KeyError, UnicodeDecodeError):
            continue
        c = text[:1]
        if c and ord(c) < 0x1_0000 and text == c * len(text) and unicodedata.category(c)[0] in "PS":
            longest[c] = max(longest.get(c, 0), len(text))
    for c, n in longest.items():
        n = 1 << (n.bit_length() - 1)
        for pos, (_, _, (_, keys)) in enumerate(_core._estimate_contexts(c * 512, key), start=1):
            if pos >= LONG_RUN and pos & (pos - 1) == 0:  # the first position of each bucket
                table[keys[0]] = round(SCALE / n)


def table_cost(table: dict[int, int], keys: list[int]) -> int:
    for k in keys:
        if k in table:
            return table[k]
    return 0


def fit(
    rows: list[dict[str, object]], key: str, enc: object, n: int, table: dict[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares feature costs (in tokens, bounded below) for what the context costs leave,
    and how often each feature was seen."""
    weights = lang_weights(rows)
    groups: dict[tuple[int, ...], list[float]] = defaultdict(lambda: [0.0, 0.0])
    seen = np.zeros(n)
    for r in rows:
        text = str(r["text"])
        w = weights[str(r["lang"])]
        starts = boundaries(text, enc)
        pieces = _core._estimate_pieces(text, key)
        ctx_rows = _core._estimate_contexts(text, key)
        ci = 0
        for start, end, feats in pieces:
            tokens = int(np.searchsorted(starts, end) - np.searchsorted(starts, start))
            offset = 0
            while ci < len(ctx_rows) and ctx_rows[ci][0] < end:
                offset += table_cost(table, list(ctx_rows[ci][2][1]))
                ci += 1
            g = groups[tuple(sorted(feats))]
            g[0] += w
            g[1] += w * (tokens - offset / SCALE)
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
    for prefix in ("none", "space", "other"):
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


def write_vocab(encs: dict[str, object]) -> None:
    """Every token of each encoding that is a whole word piece: letters (``\\p{L}``, and
    ``\\p{M}`` for o200k, whose word pattern takes marks) in any script, after at most one
    character that is neither a letter, a number nor a newline (a space, ``.``, ``_``, ``(``...);
    sorted and front-coded (per word: bytes shared with the previous word, bytes that follow, those
    bytes). Needs the ``regex`` module (a dependency of tiktoken)."""
    import regex

    prefix = r"^[^\r\n\p{L}\p{N}]?"
    patterns = {
        "cl100k": regex.compile(prefix + r"\p{L}+$"),
        "o200k": regex.compile(prefix + r"[\p{L}\p{M}]+$"),
    }
    VOCAB_DIR.mkdir(exist_ok=True)
    for key, enc in encs.items():
        words: list[bytes] = []
        for rank in range(enc.n_vocab):  # type: ignore[attr-defined]
            try:
                raw = enc.decode_single_token_bytes(rank)  # type: ignore[attr-defined]
                text = raw.decode()
            except (KeyError, UnicodeDecodeError):
                continue
            if patterns[key].match(text):
                words.append(raw)
        words.sort()
        out = bytearray()
        prev = b""
        for w in words:
            shared = 0
            while shared < min(len(w), len(prev), 255) and w[shared] == prev[shared]:
                shared += 1
            assert len(w) - shared < 256, w
            out += bytes([shared, len(w) - shared]) + w[shared:]
            prev = w
        path = VOCAB_DIR / f"{key}.words"
        path.write_bytes(bytes(out))
        print(f"wrote {len(words)} words ({len(out)} bytes) to {path}")


def write(tables: dict[str, np.ndarray], names: list[str]) -> None:
    lines = [
        "//! Costs of the estimator's features, in 1/2^SCALE_BITS tokens.",
        "//!",
        "//! Generated by scripts/calibrate_estimator.py (tests/data/corpus.jsonl and the",
        "//! corpus of scripts/build_estimator_corpus.py); context costs in estimate_vocab/*.ctx.",
        "",
        f"pub const SCALE_BITS: u32 = {SCALE_BITS};",
    ]
    for const, key in (("CL100K", "cl100k"), ("O200K", "o200k")):
        lines += ["", "#[rustfmt::skip]", f"pub const {const}: [u32; super::N_FEATURES] = ["]
        lines += [f"    {int(v)}, // {name}" for v, name in zip(tables[key], names, strict=True)]
        lines.append("];")
    OUT.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {OUT}")


def fit_encoding(key: str, extra: list[Path], split: str) -> tuple[dict[int, int], np.ndarray]:
    """The context costs and the feature costs (fixed point) of one encoding."""
    encs = load_encodings()
    assert encs is not None
    enc = encs[key]
    names = list(_core._estimate_feature_names())
    train = [r for r in load_corpus(extra) if split == "all" or r["split"] == split]
    acc, parent = context_stats(train, key, enc)
    table = prune_table(acc, parent)
    long_runs(table, key, enc)
    coef, seen = fit(train, key, enc, len(names), table)
    fill_unseen(coef, seen, names)
    constrain(coef, names)
    return table, np.round(coef * SCALE).astype(np.int64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "corpus",
        type=Path,
        nargs="*",
        help="built corpora (scripts/build_estimator_corpus.py) to fit on besides "
        "tests/data/corpus.jsonl",
    )
    parser.add_argument("--split", default="calib", help="split to fit on ('all' for every sample)")
    parser.add_argument(
        "--vocab",
        action="store_true",
        help="rewrite the word lists, then stop: rebuild the extension and run again to fit the "
        "costs",
    )
    args = parser.parse_args()
    encs = load_encodings()
    if encs is None:
        sys.exit("tiktoken with cl100k_base/o200k_base is needed (pip install tiktoken litellm)")
    if args.vocab:
        write_vocab(encs)
        return
    names = list(_core._estimate_feature_names())
    keys = list(encs)
    with ProcessPoolExecutor(len(keys)) as pool:
        results = list(pool.map(fit_encoding, keys, [args.corpus] * 2, [args.split] * 2))
    tables = {}
    for key, (table, coef) in zip(keys, results, strict=True):
        write_table(table, key)
        tables[key] = coef
    write(tables, names)
    print("rebuild the extension, then: python scripts/estimator_table.py CORPUS.jsonl")


if __name__ == "__main__":
    main()
