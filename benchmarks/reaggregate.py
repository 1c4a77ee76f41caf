"""Recompute the summaries of saved audit records with this version's aggregation (after a definition changed),
without re-running any attack: per-sample records in, summaries, statuses and headline out.

    python benchmarks/reaggregate.py benchmarks/results/defenses_*_report.json

Each record whose summaries change is rewritten in place (as the audit writes it) with ``reaggregated`` = {underfire version, git revision, date}; a record
of an older schema is refused by name and left as it is. Then ``python benchmarks/docs.py`` regenerates docs/.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from underfire.audit.aggregate import reaggregate  # noqa: E402

from underfire.audit.config import AuditError  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("records", nargs="+", type=Path)
    args = ap.parse_args()
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    failed = 0
    for path in args.records:
        text = path.read_text()
        report = json.loads(text)
        def state(r: dict) -> str:
            return json.dumps([r.get("definitions"), {k: (t["summary"], t.get("status"))
                                                      for k, t in r.get("targets", {}).items()}], sort_keys=True)
        before = state(report)
        try:
            reaggregate(report)
        except AuditError as e:
            print(f"{path}: {e}", file=sys.stderr)
            failed += 1
            continue
        if state(report) == before:
            print(f"{path}: unchanged")
            continue
        report["reaggregated"] = {"underfire": version("underfire"), "git": git,
                                  "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")}
        path.write_text(json.dumps(report, indent=1 if "\n" in text.strip() else None))  # keep the file's layout
        print(f"{path}: summaries recomputed; headline {report['headline']['spoofability']}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
