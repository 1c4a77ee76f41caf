"""What each attack strength costs on the default audit's targets, measured in one run (ratios: shared machines
are noisy).

    .venv/bin/python benchmarks/strength_cost.py                          # quick, standard, thorough
    .venv/bin/python benchmarks/strength_cost.py --levels quick,standard --note "a job beside it"

Runs the bundled default audit (``audit.presets.default``) once per level, in this one process, on the same
inputs, and writes ``benchmarks/results/strength_cost.json``: per level the wall seconds and their ratio to
``quick``, and per row (target, interpreter, defense) the attacker compute per input in preset attacks (the
members' costs × the inputs each ran on, ÷ n: independent of the machine's load), the spoofability and the
convergence status. docs/attack-strength.md's cost table is generated from that record (benchmarks/docs.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from underfire.attacks.strength import STRENGTHS  # noqa: E402
from underfire.audit.presets import default  # noqa: E402
from underfire.audit.runner import run_audit  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "strength_cost.json"


def rows(report: dict) -> list[dict]:
    """One entry per measured row of every target: compute per input, spoofability, convergence status."""
    out = []
    for key, tg in report["targets"].items():
        for name, a in tg["summary"]["interpreters"].items():
            found = [("none", a.get("spoofability"), a.get("convergence"))]
            found += [(d, a.get(f"spoofability_{d}"), info.get("convergence"))
                      for d, info in a.get("defense_info", {}).items()]
            for d, sp, conv in found:
                if sp is None:
                    continue
                conv = conv or {}
                out.append({"target": key, "interpreter": name, "defense": d, "spoofed": sp["k"], "n": sp["n"],
                            "compute_per_input": conv.get("compute_per_input", 1.0),
                            "status": conv.get("status", "unchecked"), "worst_member": conv.get("worst_member")})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levels", default=",".join(STRENGTHS), help="comma-separated strengths, quick first")
    ap.add_argument("--note", default="", help="what else ran on the machine meanwhile (kept in the record)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    levels = [s.strip() for s in args.levels.split(",")]
    unknown = [s for s in levels if s not in STRENGTHS]
    if unknown or not levels or levels[0] != "quick":
        raise SystemExit(f"--levels: a comma-separated list of {', '.join(STRENGTHS)} starting with quick")
    result = {"levels": {}, "config": "underfire.audit.presets.default",
              "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
              "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "cores": os.cpu_count(),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "note": args.note}
    for level in levels:
        cfg = default()
        for t in cfg.targets:
            t.attack_strength = level
        with tempfile.TemporaryDirectory(prefix="underfire-strength-") as tmp:
            t0 = time.perf_counter()
            report = run_audit(cfg, Path(tmp) / cfg.name, progress=lambda msg: print(f"[{level}] {msg}", flush=True))
            seconds = time.perf_counter() - t0
        result["levels"][level] = {"seconds": round(seconds, 1), "rows": rows(report),
                                   "headline": report["headline"]}
        quick = result["levels"]["quick"]["seconds"]
        print(f"{level:>9}: {seconds:7.1f} s  ×{seconds / quick:.2f} of quick", flush=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")  # after every level: a long run keeps what it has
        print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
