"""Bring a journal written before batches carried digests and calibration fingerprints up to this version, so a
long run (benchmarks/results/strength_runs/) resumes instead of starting over.

    .venv/bin/python benchmarks/upgrade_journal.py benchmarks/configs/strength_fmnist_resnet_200.toml \
        benchmarks/results/strength_runs

For every batch of every target: the batch's own fingerprint (weights, audited data, settings) must equal what
this version computes for the config (else it is refused, as --resume would); then the calibration fingerprint
is added (computed now: the batch's record cannot show which benign images its detectors used, so only run this
where they cannot have changed, e.g. Fashion-MNIST's fixed test split) and the digest of the content is
written. Batches already carrying a digest are left as they are.
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from underfire.audit.config import AuditConfig, resolve_device  # noqa: E402

from underfire.audit.deployment import build_deployment  # noqa: E402

from underfire.audit.journal import Journal, digest, fingerprint  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", type=Path)
    ap.add_argument("out", type=Path, help="the --out folder of the run")
    args = ap.parse_args()
    cfg = AuditConfig.from_dict(tomllib.loads(args.config.read_text()))
    cfg.validate()
    run = args.out / cfg.name
    for t in cfg.targets:
        dep = build_deployment(t, cfg.seed, resolve_device("cpu"), cfg.precision)
        fp = fingerprint(cfg, t, dep)
        journal = Journal(run, t.key())
        for p in sorted(journal.dir.glob("batch_*.json")):
            rec = json.loads(p.read_text())
            if "digest" in rec:
                continue
            old = rec.get("fingerprint", {})
            if {k: old.get(k) for k in ("model", "data", "config")} != {k: fp[k] for k in ("model", "data", "config")}:
                raise SystemExit(f"{p}: its fingerprint differs from this config's: not upgraded")
            rec["fingerprint"] = fp
            rec["digest"] = digest(rec)
            tmp = p.with_suffix(".tmp")
            tmp.write_text(json.dumps(rec))
            tmp.replace(p)
            print(f"upgraded {p.relative_to(ROOT) if p.is_relative_to(ROOT) else p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
