"""Keep committed audit records small: the pictures leave, the numbers stay.

A report.json carries PNGs (base64) of the first inputs of every row and of the report's examples: most of its
bytes, and nothing a page, a script or ``benchmarks/reaggregate.py`` reads. This strips them from the records in
benchmarks/results and writes compact JSON (every per-sample number stays as it was, so summaries can be
recomputed exactly) and notes where the pictures went: re-run the audit for them.

    python benchmarks/slim.py            # every *_report.json under benchmarks/results
    python benchmarks/slim.py --check    # exit 1 when a committed record still carries pictures
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
NOTE = ("pictures left out of the committed record (benchmarks/slim.py); re-run the audit (its config is in this "
        "record) for report.html with the example images and maps")


def slim(report: dict) -> bool:
    """Strip the pictures of one report in place; True when there were any."""
    changed = False
    for tg in report.get("targets", {}).values():
        for rows in tg.get("records", {}).get("interpreters", {}).values():
            for row in rows.values():
                if isinstance(row, dict):
                    for k in ("images", "maps"):
                        if row.get(k):
                            row[k], changed = [], True
        ex = tg.get("examples")
        if isinstance(ex, dict) and (ex.get("images") or ex.get("maps")):
            tg["examples"], changed = {"left_out": NOTE}, True
    return changed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only report records that still carry pictures")
    args = ap.parse_args()
    heavy = []
    for f in sorted(RESULTS.rglob("*_report.json")):
        text = f.read_text()
        report = json.loads(text)
        compact = json.dumps(report, separators=(",", ":")) + "\n"
        if slim(report):
            heavy.append(f)
            compact = json.dumps(report, separators=(",", ":")) + "\n"
        if not args.check and text != compact:  # e.g. a record benchmarks/reaggregate.py rewrote indented
            f.write_text(compact)
    for f in heavy:
        print(("carries pictures: " if args.check else "slimmed: ") + str(f.relative_to(RESULTS.parent.parent)))
    return 1 if args.check and heavy else 0


if __name__ == "__main__":
    sys.exit(main())
