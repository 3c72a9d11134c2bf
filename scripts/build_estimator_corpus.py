"""Build the estimator's multilingual calibration corpus from text already on this machine.

Sources, all read offline and none written for this project:

- gettext catalogs (``*.mo``) under /usr/share/locale, Vim's message catalogs and any ``locale``
  folder of the installed Python packages: every translated message, grouped by language;
- Vim's tutor translations (``tutor.XX.utf-8``);
- English prose: the licences in /usr/share/common-licenses and the READMEs and Markdown files in
  /usr/share/doc;
- code: the Python standard library, the Rust crates in the Cargo registry, C headers;
- JSON: the ``.json`` files of the installed Python packages;
- synthetic text the estimator must not miscount: base64 of random bytes and runs of repeated
  punctuation (rules, underlines, separators), with a fixed seed.

Each unit of text (one message, one file, one synthetic block) is assigned to the ``heldout``
split when the SHA-1 of its identity falls in the top quarter, else to ``calib``; documents are
built inside one split only, so the held-out documents share no message or file with the text
the estimator is fitted to. Document lengths are drawn log-uniformly between 80 and 2,500
characters. The exact counts come from tiktoken (offline, see _tiktoken_files.py).

    python scripts/build_estimator_corpus.py OUT.jsonl [--sample tests/data/heldout_sample.jsonl]

``--sample`` also writes a small part of the held-out split (a few short documents per language)
for the test suite.
"""

from __future__ import annotations

import argparse
import base64
import glob
import gzip
import hashlib
import json
import math
import os
import random
import struct
import sys
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tiktoken_files import load_encodings

MIN_CHARS, MAX_CHARS = 80, 2500
MIN_LANG_CHARS = 4000  # languages with less text than this are left out
MAX_LANG_CHARS = 150_000  # per language and split, to keep the fit balanced and quick
SAMPLE_DOCS, SAMPLE_MAX_CHARS = 4, 700

# Script of each language code (the part before '_' or '@'); anything else is 'latin'.
SCRIPTS = {
    **dict.fromkeys(
        "ru uk be bg mk sr kk ky mn tg tt cv ab ba ce os udm sah uz@cyrillic".split(), "cyrillic"
    ),
    **dict.fromkeys("ar fa ur ps ug ckb sd ku_IQ pa_PK".split(), "arabic"),
    **dict.fromkeys("he yi".split(), "hebrew"),
    "el": "greek",
    **dict.fromkeys("hi mr ne mai kok sa bho brx doi".split(), "devanagari"),
    **dict.fromkeys("bn bn_IN bn_BD as mni".split(), "bengali"),
    "pa": "gurmukhi",
    "gu": "gujarati",
    "or": "oriya",
    "ta": "tamil",
    "te": "telugu",
    "kn": "kannada",
    "ml": "malayalam",
    "si": "sinhala",
    "th": "thai",
    "lo": "lao",
    **dict.fromkeys("bo dz".split(), "tibetan"),
    "my": "myanmar",
    "km": "khmer",
    "ka": "georgian",
    "hy": "armenian",
    **dict.fromkeys("am ti tig gez byn wal".split(), "ethiopic"),
    "ja": "japanese",
    "ko": "hangul",
    **dict.fromkeys("zh_CN zh_Hans zh_SG".split(), "han_simplified"),
    **dict.fromkeys("zh_TW zh_HK zh_Hant".split(), "han_traditional"),
    "en@shaw": "shavian",
    "iu": "canadian",
    "chr": "cherokee",
    "dv": "thaana",
}


def normalize_lang(label: str) -> str:
    """A locale label as a language code: the charset dropped and the territory upper-cased
    (Vim's ``ko.UTF-8``, ``pl.cp1250`` and ``zh_tw`` are ``ko``, ``pl`` and ``zh_TW``); Vim's
    Chinese tutor without a territory is in traditional characters."""
    base, _, modifier = label.partition("@")
    base = base.split(".")[0]
    lang, _, territory = base.partition("_")
    if len(territory) == 2:
        territory = territory.upper()
    base = f"{lang.lower()}_{territory}" if territory else lang.lower()
    if base == "zh":
        base = "zh_TW"
    return f"{base}@{modifier}" if modifier else base


def script_of(lang: str) -> str:
    if lang.endswith(("@latin", "@iqtelif")):
        return "latin"
    if lang in SCRIPTS:
        return SCRIPTS[lang]
    base = lang.split("@")[0]
    if base in SCRIPTS:
        return SCRIPTS[base]
    return SCRIPTS.get(base.split("_")[0], "latin")


def split_of(identity: str) -> str:
    h = int.from_bytes(hashlib.sha1(identity.encode()).digest()[:4], "big")
    return "heldout" if h % 4 == 0 else "calib"


def read_mo(path: str) -> list[str]:
    """The translations (msgstr) of a GNU .mo catalog, plural forms apart; the header skipped."""
    data = Path(path).read_bytes()
    if len(data) < 20:
        return []
    magic = struct.unpack("<I", data[:4])[0]
    order = "<" if magic == 0x950412DE else ">" if magic == 0xDE120495 else None
    if order is None:
        return []
    _, count, _orig, trans = struct.unpack(order + "4I", data[4:20])
    out = []
    for k in range(count):
        length, offset = struct.unpack(order + "2I", data[trans + 8 * k : trans + 8 * k + 8])
        raw = data[offset : offset + length]
        for part in raw.split(b"\0"):
            try:
                text = part.decode("utf-8")
            except UnicodeDecodeError:
                continue
            if text and not text.startswith("Project-Id-Version"):
                out.append(text)
    return out


def catalog_lang(path: str) -> str | None:
    parts = Path(path).parts
    if "LC_MESSAGES" not in parts:
        return None
    lang = normalize_lang(parts[parts.index("LC_MESSAGES") - 1])
    if lang.startswith("en") and "@" not in lang:
        return None  # English catalogs are mostly untranslated copies
    return lang


def catalogs() -> Iterator[str]:
    patterns = [
        "/usr/share/locale/*/LC_MESSAGES/*.mo",
        "/usr/share/vim/*/lang/*/LC_MESSAGES/*.mo",
    ]
    patterns += [
        os.path.join(root, "**", "LC_MESSAGES", "*.mo")
        for root in sys.path
        if root.endswith("site-packages")
    ]
    seen: set[str] = set()
    for pattern in patterns:
        for path in sorted(glob.glob(pattern, recursive=True)):
            if path not in seen:
                seen.add(path)
                yield path


def read_text(path: str) -> str | None:
    try:
        if path.endswith(".gz"):
            with gzip.open(path) as f:
                raw = f.read()
        else:
            raw = Path(path).read_bytes()
        return raw.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError):
        return None


def file_units(patterns: list[str], limit: int) -> list[tuple[str, str]]:
    """(path, text) of the files matching ``patterns``, deduplicated, at most ``limit``."""
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for pattern in patterns:
        for path in sorted(glob.glob(pattern, recursive=True)):
            text = read_text(path) if os.path.isfile(path) else None
            if not text or len(text) < 200:
                continue
            digest = hashlib.sha1(text.encode()).hexdigest()
            if digest in seen:
                continue
            seen.add(digest)
            out.append((path, text))
            if len(out) >= limit:
                return out
    return out


def synthetic_units(rng: random.Random) -> dict[str, list[tuple[str, str]]]:
    units: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for k in range(400):
        n = int(math.exp(rng.uniform(math.log(12), math.log(3000))))
        blob = base64.b64encode(rng.randbytes(n)).decode()
        if rng.random() < 0.5:
            blob = "\n".join(blob[i : i + 76] for i in range(0, len(blob), 76))
        units["base64"].append((f"base64-{k}", blob))
    chars = "=-*#_~+.:/\\|<>^`'\"!?,;()[]{}─━═·•…\u2014\u2013"
    for k in range(400):
        lines = []
        for _ in range(rng.randint(1, 8)):
            c = rng.choice(chars)
            n = int(math.exp(rng.uniform(math.log(2), math.log(200))))
            run = c * n
            if rng.random() < 0.3:
                run = rng.choice(["# ", "// ", "", "  ", "/* "]) + run
            lines.append(run)
            if rng.random() < 0.5:
                lines.append(rng.choice(["Section", "Introduction", "Notes", "API", "Usage"]))
        units["punct_runs"].append((f"punct-{k}", "\n".join(lines) + "\n"))
    # Long rules and separators (64 to 2,000 characters), drawn apart so the rest is unchanged.
    long_rng = random.Random(64)
    for k in range(150):
        c = long_rng.choice(chars)
        n = int(math.exp(long_rng.uniform(math.log(64), math.log(2000))))
        units["punct_runs"].append((f"punct-long-{k}", c * n + "\n"))
    return units


def python_stdlib() -> list[str]:
    lib = os.path.dirname(os.__file__)
    return [os.path.join(lib, "*.py"), os.path.join(lib, "*", "*.py")]


def gather(rng: random.Random) -> dict[str, list[tuple[str, str]]]:
    """Units of text per language: (identity, text)."""
    units: dict[str, list[tuple[str, str]]] = defaultdict(list)
    seen: dict[str, set[str]] = defaultdict(set)
    for path in catalogs():
        lang = catalog_lang(path)
        if lang is None:
            continue
        for text in read_mo(path):
            if text not in seen[lang]:
                seen[lang].add(text)
                units[lang].append((text, text))
    for path in sorted(glob.glob("/usr/share/vim/*/tutor/tutor.*.utf-8")):
        lang = normalize_lang(path.rsplit(".", 2)[-2])
        text = read_text(path)
        if text:
            for k, para in enumerate(text.split("\n\n")):
                units[lang].append((f"{path}:{k}", para + "\n\n"))
    sources = {
        "english": (
            [
                "/usr/share/common-licenses/*",
                "/usr/share/doc/**/README*",
                "/usr/share/doc/**/*.md",
                "/usr/share/doc/**/*.md.gz",
            ],
            400,
        ),
        "python": (python_stdlib(), 600),
        "rust": ([os.path.expanduser("~/.cargo/registry/src/*/*/src/**/*.rs")], 600),
        "c": (["/usr/include/*.h", "/usr/include/*/*.h"], 400),
        "json": ([os.path.join(r, "**", "*.json") for r in sys.path if "site-packages" in r], 400),
    }
    for lang, (patterns, limit) in sources.items():
        units[lang] += file_units(patterns, limit)
    for lang, items in synthetic_units(rng).items():
        units[lang] += items
    return units


def documents(units: list[tuple[str, str]], rng: random.Random, budget: int) -> list[str]:
    """Documents of log-uniform length made of consecutive units (shuffled), one split only."""
    order = units[:]
    rng.shuffle(order)
    docs: list[str] = []
    total = 0
    current: list[str] = []
    size = 0
    want = 0
    for _, text in order:
        if not want:
            want = int(math.exp(rng.uniform(math.log(MIN_CHARS), math.log(MAX_CHARS))))
        if len(text) > want - size and len(text) > MAX_CHARS:  # a long file: a window of it
            start = rng.randrange(0, len(text) - want)
            text = text[start : start + want - size]
        current.append(text)
        size += len(text)
        if size >= want:
            doc = "\n".join(current)
            docs.append(doc)
            total += len(doc)
            current, size, want = [], 0, 0
            if total >= budget:
                break
    if size >= MIN_CHARS:
        docs.append("\n".join(current))
    return docs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--sample", type=Path, help="also write a small held-out sample here")
    args = parser.parse_args()
    encs = load_encodings()
    if encs is None:
        sys.exit("tiktoken with cl100k_base/o200k_base is needed (pip install tiktoken litellm)")
    rng = random.Random(20240515)
    units = gather(rng)
    rows = []
    for lang in sorted(units):
        by_split: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for identity, text in units[lang]:
            by_split[split_of(f"{lang}\0{identity}")].append((identity, text))
        if sum(len(t) for _, t in by_split["heldout"]) < MIN_LANG_CHARS // 4:
            continue
        if sum(len(t) for _, t in units[lang]) < MIN_LANG_CHARS:
            continue
        for split in ("calib", "heldout"):
            for doc in documents(by_split[split], rng, MAX_LANG_CHARS):
                row = {"lang": lang, "script": script_of(lang), "split": split, "text": doc}
                for key, enc in encs.items():
                    row[key] = len(enc.encode_ordinary(doc))  # type: ignore[attr-defined]
                rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    langs = {r["lang"] for r in rows}
    print(f"wrote {len(rows)} documents in {len(langs)} languages to {args.out}")
    if args.sample:
        sample_rng = random.Random(7)
        picked = []
        by_lang: dict[str, list[dict[str, object]]] = defaultdict(list)
        for r in rows:
            if r["split"] == "heldout" and len(str(r["text"])) <= SAMPLE_MAX_CHARS:
                by_lang[str(r["lang"])].append(r)
        for lang in sorted(by_lang):
            docs = by_lang[lang]
            picked += sample_rng.sample(docs, min(SAMPLE_DOCS, len(docs)))
        with args.sample.open("w", encoding="utf-8") as f:
            for row in picked:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"wrote {len(picked)} held-out documents to {args.sample}")


if __name__ == "__main__":
    main()
