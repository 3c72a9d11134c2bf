"""Regenerate llmtally's bundled price table, python/llmtally/data/prices.json.

The source is LiteLLM's public price list, ``model_prices_and_context_window.json`` (maintained at
https://github.com/BerriAI/litellm; the ``litellm`` wheel on PyPI ships a copy as
``litellm/model_prices_and_context_window_backup.json``). Refresh:

    pip install -U litellm            # or download the JSON file from the LiteLLM repository
    python scripts/update_prices.py   # reads the installed copy, rewrites the bundled table
    python scripts/update_prices.py --source path/to/model_prices_and_context_window.json
    pytest tests/unit/test_pricing.py tests/unit/test_price_diff.py

A user refreshes their own copy with ``llmtally prices update [FILE]`` instead (same code,
written to ``$XDG_DATA_HOME/llmtally/prices.json``). Unchanged rows keep their effective date;
a changed row gets ``--effective`` (default today, UTC) and keeps its old version in its
history; prices that moved more than 100x are listed. The field mapping and the file layout are
in ``llmtally.price_table``'s docstring.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "python"))

from llmtally.price_table import update, write  # noqa: E402

OUTPUT = ROOT / "python" / "llmtally" / "data" / "prices.json"
SOURCE_NAMES = (
    "model_prices_and_context_window.json",
    "model_prices_and_context_window_backup.json",
)


def find_source() -> Path:
    spec = importlib.util.find_spec("litellm")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("litellm is not installed: pip install litellm, or pass --source FILE")
    for folder in spec.submodule_search_locations:
        for name in SOURCE_NAMES:
            path = Path(folder) / name
            if path.is_file():
                return path
    sys.exit("no model_prices_and_context_window*.json inside the litellm package")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, help="LiteLLM's price JSON (default: installed)")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    parser.add_argument("--source-name", help="what to record as the source in the table")
    parser.add_argument("--effective", help="effective date of changed prices (default: today)")
    args = parser.parse_args(argv)
    path = args.source or find_source()
    label = args.source_name
    if label is None:
        label = f"litellm {_litellm_version()} {path.name}" if args.source is None else path.name
    effective = args.effective or datetime.datetime.now(datetime.UTC).date().isoformat()
    previous = None
    if args.output.is_file():
        previous = json.loads(args.output.read_text(encoding="utf-8"))
    result = update(json.loads(path.read_text(encoding="utf-8")), previous, effective, label)
    size = write(result.table, args.output)
    print(f"wrote {args.output} ({size // 1024} KB) from {label}")
    print(f"  {len(result.table['models'])} names (aliases included); rows per provider:")
    print("  " + ", ".join(f"{p} {n}" for p, n in sorted(result.coverage.items())))
    print(
        f"  {len(result.added)} added, {len(result.changed)} changed (effective {effective}),"
        f" {len(result.removed)} removed"
    )
    for name, kind, old, new in result.big_moves:
        print(f"  MOVED MORE THAN 100x: {name} {kind} {old} -> {new} USD per 1M tokens")
    for line in result.rounded:
        print(f"  rounded to 6 decimals: {line}")
    return 0


def _litellm_version() -> str:
    try:
        from importlib.metadata import version

        return version("litellm")
    except Exception:
        return "unknown"


if __name__ == "__main__":
    raise SystemExit(main())
