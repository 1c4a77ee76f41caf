"""Time CI's test command on a fresh clone and keep the result as a record (the suite's size and duration quoted in
README.md and docs/testing.md come from it, through benchmarks/docs.py).

    python benchmarks/suite_time.py                 # clone HEAD to a temporary folder, run `bash .ci/run` there
    python benchmarks/suite_time.py --note "one benchmark job beside it"

Writes benchmarks/results/suite.json: commit, date, machine, cores, passed / skipped / failed, the seconds pytest
reports and the seconds of the whole command (setup included: a fresh clone builds its own .venv). The output
of the run streams to the terminal; a failing run is recorded too (its exit status is in the record) and the
script exits with it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "suite.json"


def summary(log: str) -> dict:
    """Counts and seconds from pytest's last summary line, e.g. '== 319 passed, 1 skipped in 629.12s (0:10:29) =='."""
    lines = [ln for ln in log.splitlines() if re.search(r"\b(passed|failed|error)\b.* in [\d.]+s", ln)]
    if not lines:
        return {}
    last = lines[-1]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|skipped|failed|errors?|deselected)", last)}
    return {"passed": counts.get("passed", 0), "skipped": counts.get("skipped", 0),
            "failed": counts.get("failed", 0) + counts.get("error", 0) + counts.get("errors", 0),
            "seconds_tests": float(re.search(r" in ([\d.]+)s", last).group(1))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--note", default="", help="what else ran on the machine meanwhile (kept in the record)")
    args = ap.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="underfire-suite-") as tmp:
        clone = Path(tmp) / "underfire"
        subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
        start = time.monotonic()
        proc = subprocess.Popen(["bash", ".ci/run"], cwd=clone, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        log = []
        for line in proc.stdout:
            sys.stdout.write(line)
            log.append(line)
        rc = proc.wait()
        total = time.monotonic() - start
    record = {"kind": "suite", "command": "bash .ci/run (fresh clone)", "commit": commit, "exit_status": rc,
              "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU" if not shutil.which("nvidia-smi")
              else f"{platform.machine()}, {os.cpu_count()} cores, GPU",
              "cores": os.cpu_count(), "chromium": bool(shutil.which("chromium") or shutil.which("chromium-browser")),
              "seconds_total": round(total, 1), **summary("".join(log)), "note": args.note}
    OUT.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}: {json.dumps(record)}")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
