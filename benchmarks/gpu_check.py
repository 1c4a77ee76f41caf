"""The GPU check's measurements that are not step ratios (benchmarks/gpu_check.sh runs this after step_cost.py).

    python benchmarks/gpu_check.py --device cuda            # on one H100/H200
    python benchmarks/gpu_check.py --dry                    # tiny, on CPU: the same code paths, in seconds

1. the paper's full CAM-ADV² schedule (400 + 1200 steps) on ResNet-50 (random weights cost what trained ones
   do) for 100 images at 224²: wall time (goal ≤ 20 s on one H100/H200);
2. a small audit with ``--device cuda --batch-size auto`` and the same audit on the CPU: their verdicts (per
   input and interpreter: reached c_t, map within τ) must agree; prints the disagreements and exits 1 when more
   than one input's verdict differs (float sums differ between devices, so a borderline input may flip).
Writes a JSON record with --json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from underfire.attacks.adv2 import make_adv2  # noqa: E402
from underfire.audit.config import AuditConfig, Target  # noqa: E402
from underfire.audit.runner import run_audit  # noqa: E402
from underfire.guard.registry import build_interpreter  # noqa: E402
from underfire.guard.models import load_model  # noqa: E402


def paper_cam_schedule(dev: torch.device, dry: bool) -> dict:
    model = load_model("fmnist_resnet" if dry else "torchvision:resnet50", None if dry else "random").to(dev).eval()
    n, size, steps = (4, 28, (2, 4)) if dry else (100, 224, (400, 1200))
    x = torch.rand(n, model.input_size[0], size, size, generator=torch.Generator().manual_seed(0)).to(dev)
    cam = build_interpreter("cam", model)
    with torch.no_grad():
        y_t = (model(x).argmax(1) + 1) % model.num_classes
        target = cam(x).saliency
    atk = make_adv2("cam", 8 / 255, steps=steps, precision="fp32")
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    atk(cam, x, y_t, target)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    out = {"model": model.name, "images": n, "steps": list(steps), "seconds": time.perf_counter() - t0, "goal_s": 20}
    print(f"CAM-ADV², {steps[0]} + {steps[1]} steps, {n} images of {model.name}: {out['seconds']:.1f} s "
          f"(goal ≤ 20 s on one H100/H200)", flush=True)
    return out


def verdicts(report: dict) -> dict:
    out = {}
    for key, tg in report["targets"].items():
        for name, per in tg["records"]["interpreters"].items():
            tau = tg["summary"]["interpreters"][name]["tau"]
            rec = per["adv2"]
            out[f"{key}/{name}"] = [bool(s) and d <= tau for s, d in zip(rec["success"], rec["l1"])]
    return out


def audit_agreement(dev: torch.device, dry: bool, work: Path) -> dict:
    def cfg(device, batch):
        return AuditConfig(name=f"check-{device}", device=device, batch_size=batch, bootstrap=50, examples=0,
                           targets=[Target("fmnist_resnet", interpreters=["cam"] if dry else ["grad", "cam"],
                                           n=2 if dry else 64, attacks=["pgd", "adv2"], defenses=[],
                                           shorten=100 if dry else 4, noise_draws=1 if dry else 4)])
    runs = {}
    for role, device, batch in (("reference", "cpu", 32), ("check", dev.type, "auto")):
        t0 = time.perf_counter()
        runs[role] = (run_audit(cfg(device, batch), work / role), time.perf_counter() - t0)
    a, b = verdicts(runs["reference"][0]), verdicts(runs["check"][0])
    differ = sum(x != y for k in a for x, y in zip(a[k], b[k]))
    out = {"seconds": {f"{r} ({runs[r][0]['environment']['device']})": round(s, 1) for r, (_, s) in runs.items()},
           "verdicts_differing": differ, "verdicts": sum(len(v) for v in a.values())}
    print(f"audit on {dev.type} (batch auto) vs cpu: {differ} of {out['verdicts']} verdicts differ; "
          f"{out['seconds']}", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dry", action="store_true", help="tiny sizes on the CPU (CI)")
    ap.add_argument("--work", type=Path, default=Path("runs/gpu_check"))
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    dev = torch.device("cpu" if a.dry else a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: run with --dry for the CPU check", file=sys.stderr)
        return 2
    rec = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d"), "dry": a.dry,
           "paper_cam_schedule": paper_cam_schedule(dev, a.dry), "audit": audit_agreement(dev, a.dry, a.work)}
    if a.json:
        a.json.write_text(json.dumps(rec, indent=1))
    return 1 if rec["audit"]["verdicts_differing"] > 1 else 0


if __name__ == "__main__":
    raise SystemExit(main())
