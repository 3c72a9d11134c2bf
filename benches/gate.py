"""Regression gate: a reduced B1 run (well under a minute) whose ratios must stay above the
thresholds committed in benches/thresholds.json, less the allowed margin.

    python benches/gate.py            # exit 1 when a ratio fell past its margin

Ratios, not times: llmtally against LangChain and against the empty harness, in the same run,
so a slower machine does not fail the gate, a slower llmtally does.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("LLMTALLY_METRICS", "0")  # as installed without the [prometheus] extra

from llmtally.bench import _measure


def main() -> int:
    config = json.loads((Path(__file__).parent / "thresholds.json").read_text())
    margin = float(config["margin"])
    results = asyncio.run(_measure(quick=False))
    if "langchain" not in results:
        print("gate: langchain-core is not installed (pip install -e '.[bench]')", file=sys.stderr)
        return 2
    empty, ours, peer = results["empty"], results["llmtally"], results["langchain"]
    measured = {
        "b1_sequential_vs_langchain": (peer["sequential"] - empty["sequential"])
        / (ours["sequential"] - empty["sequential"]),
        "b1_concurrent_vs_langchain": (peer["concurrent"] - empty["concurrent"])
        / (ours["concurrent"] - empty["concurrent"]),
        "b1_concurrent_share_of_empty": empty["concurrent"] / ours["concurrent"],
    }
    failed = 0
    for name, threshold in config["ratios"].items():
        value = measured[name]
        floor = threshold * (1 - margin)
        ok = value >= floor
        failed += not ok
        status = "ok  " if ok else "FAIL"
        print(f"{status} {name}: {value:.2f} (threshold {threshold}, floor {floor:.2f})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
