"""Build the calibration corpus, tests/data/corpus.jsonl, from the hand-written pools.

Each line is one sample: ``{"lang", "split", "text", "cl100k", "o200k"}``. Prose, code and emoji
samples are composed from the sentences or snippets in tests/data/pools/ (even-numbered ones go to
the ``calib`` split, odd-numbered ones to ``eval``, so the evaluation split never shares a sentence
with the one the estimator was tuned on); JSON and number-heavy samples are synthesized, with a
different seed per split. Sample lengths are drawn log-uniformly between 50 and 2000 characters.
The exact counts come from tiktoken (loaded offline, see _tiktoken_files.py), so tests can check
the estimator's error without tiktoken installed.

    python scripts/make_corpus.py            # rewrite tests/data/corpus.jsonl
"""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tiktoken_files import load_encodings

ROOT = Path(__file__).resolve().parent.parent
POOLS = ROOT / "tests" / "data" / "pools"
OUT = ROOT / "tests" / "data" / "corpus.jsonl"
PER_SPLIT = 14
MIN_CHARS, MAX_CHARS = 50, 2000

PROSE = {
    "english": " ",
    "german": " ",
    "french": " ",
    "spanish": " ",
    "russian": " ",
    "arabic": " ",
    "korean": " ",
    "chinese": "",
    "japanese": "",
    "emoji": "\n",
}
CODE = ["python", "javascript", "rust", "go"]


def target_length(rng: random.Random) -> int:
    return int(math.exp(rng.uniform(math.log(MIN_CHARS), math.log(MAX_CHARS))))


def half(items: list[str], split: str) -> list[str]:
    return items[0::2] if split == "calib" else items[1::2]


def prose_sample(pool: list[str], sep: str, rng: random.Random) -> str:
    want = target_length(rng)
    out: list[str] = []
    size = 0
    order: list[str] = []
    while size < want:
        if not order:
            order = pool[:]
            rng.shuffle(order)
        sentence = order.pop()
        if out:
            joiner = "\n\n" if rng.random() < 0.2 else sep
            out.append(joiner)
            size += len(joiner)
        out.append(sentence)
        size += len(sentence)
    return "".join(out)


def code_sample(pool: list[str], rng: random.Random) -> str:
    want = target_length(rng)
    order = pool[:]
    rng.shuffle(order)
    text = "\n\n\n".join(order)
    while len(text) < want:
        text += "\n\n\n" + text
    lines = text.splitlines(keepends=True)
    start = rng.randrange(0, max(1, len(lines) // 3))
    out = ""
    for line in lines[start:]:
        if len(out) >= want:
            break
        out += line
    return out.rstrip("\n") if len(out) >= MIN_CHARS else text[:want]


WORDS = [
    "id",
    "name",
    "email",
    "status",
    "created",
    "updated",
    "amount",
    "currency",
    "region",
    "items",
    "price",
    "quantity",
    "sku",
    "tags",
    "active",
    "score",
    "latency",
    "retries",
    "owner",
    "description",
    "title",
    "url",
    "count",
    "total",
    "user",
    "order",
    "product",
    "category",
    "enabled",
    "version",
    "timestamp",
    "message",
    "level",
    "host",
    "port",
    "path",
    "method",
]
VALUES = [
    "pending",
    "shipped",
    "delivered",
    "cancelled",
    "eu-west-1",
    "us-east-2",
    "admin",
    "editor",
    "viewer",
    "warning",
    "error",
    "info",
    "debug",
    "GET",
    "POST",
    "PUT",
    "application/json",
    "text/html",
    "gzip",
    "Berlin",
    "Lisbon",
    "Tokyo",
    "Nairobi",
]


def json_value(rng: random.Random, depth: int) -> object:
    r = rng.random()
    if depth < 2 and r < 0.15:
        return {rng.choice(WORDS): json_value(rng, depth + 1) for _ in range(rng.randint(1, 4))}
    if depth < 2 and r < 0.25:
        return [json_value(rng, depth + 1) for _ in range(rng.randint(1, 4))]
    if r < 0.4:
        return rng.randint(0, 10 ** rng.randint(1, 7))
    if r < 0.5:
        return round(rng.uniform(0, 1000), rng.randint(1, 4))
    if r < 0.55:
        return rng.choice([True, False, None])
    if r < 0.65:
        return f"{rng.choice(WORDS)}_{rng.randint(1, 999)}@example.com"
    if r < 0.72:
        return (
            "".join(rng.choices("0123456789abcdef", k=8))
            + "-"
            + "".join(rng.choices("0123456789abcdef", k=4))
        )
    if r < 0.8:
        month, day, hour, minute = (
            rng.randint(1, 12),
            rng.randint(1, 28),
            rng.randint(0, 23),
            rng.randint(0, 59),
        )
        return f"2024-{month:02d}-{day:02d}T{hour:02d}:{minute:02d}:00Z"
    if r < 0.9:
        return rng.choice(VALUES)
    return " ".join(rng.choices(WORDS, k=rng.randint(2, 8))).capitalize() + "."


def json_sample(rng: random.Random) -> str:
    want = target_length(rng)
    indent = rng.choice([None, None, 2, 4])
    records: list[object] = []
    text = "[]"
    while len(text) < want:
        keys = rng.sample(WORDS, rng.randint(2, 7))
        records.append({k: json_value(rng, 0) for k in keys})
        text = json.dumps(records, indent=indent)
    if rng.random() < 0.3 and len(records) == 1:
        return json.dumps(records[0], indent=indent)
    return text


def number_line(rng: random.Random) -> str:
    n = rng.randint
    templates = [
        lambda: (
            f"Order #{n(10000, 99999)} shipped on 2024-{n(1, 12):02d}-{n(1, 28):02d} at "
            f"{n(0, 23):02d}:{n(0, 59):02d}, total ${n(1, 9)},{n(100, 999)}.{n(0, 99):02d} "
            f"({n(1, 12)} items)."
        ),
        lambda: (
            f"Q{n(1, 4)} revenue: {n(1, 999)}.{n(0, 9)}M (+{n(0, 40)}.{n(0, 9)}% YoY), "
            f"EBITDA margin {n(5, 45)}.{n(0, 9)}%."
        ),
        lambda: (
            f"Call +1 ({n(200, 999)}) {n(200, 999)}-{n(1000, 9999)} or "
            f"+49 {n(30, 89)} {n(1000000, 99999999)}."
        ),
        lambda: (
            f"{n(1, 31)}/{n(1, 12)}/{n(1990, 2030)}  {n(0, 99999)}  "
            f"{n(0, 9999)}.{n(0, 99):02d}  {n(-50, 50)}"
        ),
        lambda: (
            f"Temperature {n(-30, 45)}.{n(0, 9)} °C, humidity {n(10, 99)}%, "
            f"pressure {n(950, 1050)} hPa, wind {n(0, 120)} km/h."
        ),
        lambda: ", ".join(str(n(0, 10 ** n(1, 9))) for _ in range(n(3, 12))),
        lambda: (
            f"Version {n(0, 20)}.{n(0, 30)}.{n(0, 200)} released {n(1, 28)} March "
            f"{n(2015, 2025)}; build {n(1000, 99999)}."
        ),
        lambda: (
            f"pi ≈ 3.{n(1000, 9999)}{n(1000, 9999)}, e ≈ 2.{n(10000, 99999)}, "
            f"2^{n(10, 64)} = {2 ** n(10, 64)}"
        ),
        lambda: (
            f"Invoice {n(2020, 2025)}-{n(1, 9999):04d}: {n(1, 99)} x {n(1, 999)}.{n(0, 99):02d} "
            f"EUR = {n(1, 99999)}.{n(0, 99):02d} EUR"
        ),
        lambda: (
            f"{n(100, 255)}.{n(0, 255)}.{n(0, 255)}.{n(0, 255)} - - [{n(1, 28)}/Oct/2024:"
            f"{n(0, 23):02d}:{n(0, 59):02d}:{n(0, 59):02d} +0000] "
            f'"GET /api/v{n(1, 3)}/items/{n(1, 99999)} HTTP/1.1" '
            f"{rng.choice([200, 201, 304, 404, 500])} {n(100, 99999)}"
        ),
    ]
    return rng.choice(templates)()


def numbers_sample(rng: random.Random) -> str:
    want = target_length(rng)
    lines: list[str] = []
    while sum(len(x) + 1 for x in lines) < want:
        lines.append(number_line(rng))
    return "\n".join(lines)


def read_pool(name: str) -> list[str]:
    text = (POOLS / f"{name}.txt").read_text(encoding="utf-8")
    if name in CODE:
        return [s.strip("\n") for s in text.split("\n%%%\n")]
    return [line for line in text.splitlines() if line.strip()]


def main() -> None:
    encs = load_encodings()
    if encs is None:
        sys.exit("tiktoken with cl100k_base/o200k_base is needed (pip install tiktoken litellm)")
    rows = []
    for split, seed in (("calib", 1), ("eval", 2)):
        for lang, sep in PROSE.items():
            rng = random.Random(f"{lang}-{seed}")
            pool = half(read_pool(lang), split)
            rows += [(lang, split, prose_sample(pool, sep, rng)) for _ in range(PER_SPLIT)]
        for lang in CODE:
            rng = random.Random(f"{lang}-{seed}")
            pool = half(read_pool(lang), split)
            rows += [(lang, split, code_sample(pool, rng)) for _ in range(PER_SPLIT)]
        rng = random.Random(f"json-{seed}")
        rows += [("json", split, json_sample(rng)) for _ in range(PER_SPLIT)]
        rng = random.Random(f"numbers-{seed}")
        rows += [("numbers", split, numbers_sample(rng)) for _ in range(PER_SPLIT)]
    with OUT.open("w", encoding="utf-8") as fh:
        for lang, split, text in rows:
            counts = {k: len(e.encode(text, disallowed_special=())) for k, e in encs.items()}
            record = {"lang": lang, "split": split, "text": text, **counts}
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} samples, {OUT.stat().st_size // 1024} KiB, to {OUT}")


if __name__ == "__main__":
    main()
