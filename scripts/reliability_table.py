"""Turn the lines the reliability tests report into RELIABILITY.md's table.

    LLMTALLY_RELIABILITY_REPORT=/tmp/rel.jsonl pytest tests -p no:randomly
    python scripts/reliability_table.py /tmp/rel.jsonl

One row per scenario and backend (several runs of one scenario are summed): calls sent (the
calls whose end was accepted), stored, lost, doubled.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def main(path: str) -> None:
    rows: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0, 0, 0])
    notes: dict[tuple[str, str], list[str]] = defaultdict(list)
    with open(path, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            key = (r["scenario"], r["backend"])
            row = rows[key]
            row[0] += 1
            row[1] += r["sent"]
            row[2] += r["stored"]
            row[3] += max(0, r["sent"] - r["stored"])
            row[4] += max(0, r["stored"] - r["sent"] - r.get("in_flight", 0))
            if r.get("note"):
                notes[key].append(r["note"])
    print("| scenario | backend | runs | calls sent | stored | lost | doubled | note |")
    print("|---|---|---|---|---|---|---|---|")
    for (scenario, backend), (runs, sent, stored, lost, doubled) in rows.items():
        note = "; ".join(notes.get((scenario, backend), []))
        print(
            f"| {scenario} | {backend} | {runs} | {sent:,} | {stored:,} | {lost:,} | {doubled:,} "
            f"| {note} |"
        )


if __name__ == "__main__":
    main(sys.argv[1])
