"""RTS against RTS^A on the real Fashion-MNIST test set (the ADV² paper's Figures 15 and 16, in numbers).

    .venv/bin/python benchmarks/rts_adv.py --model fmnist_resnet --rtsa guard/checkpoints/rts_adv_fmnist_resnet.pt

Prints, for the bundled RTS and the RTS^A checkpoint:
- clean quality (preserved / destroyed accuracy, mask area) on --quality-n test images;
- noise sensitivity: mean L1 between the map of x and of x + noise (Gaussian σ, uniform ±a), class = label;
- ADV²-RTS at a fixed budget (ε, schedule): ASR and L1 between the adversarial map and its target (the
  interpreter's own benign map).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from underfire.attacks.adv2 import Adv2  # noqa: E402
from underfire.attacks.targets import target_classes  # noqa: E402
from underfire.guard.interpreters.rts import RTS  # noqa: E402
from underfire.guard.maps import l1  # noqa: E402
from underfire.guard.models import load_model  # noqa: E402
from underfire.training.data import fashion_mnist  # noqa: E402
from underfire.training.rts import rts_quality  # noqa: E402

NOISE = [("gaussian", 0.02), ("gaussian", 0.05), ("gaussian", 0.1), ("uniform", 0.05), ("uniform", 0.1), ("uniform", 0.2)]


@torch.no_grad()
def noise_l1(interp, x, y, kind, level, gen):
    noise = torch.randn(x.shape, generator=gen) * level if kind == "gaussian" else (torch.rand(x.shape, generator=gen) * 2 - 1) * level
    return float(l1(interp(x, y).saliency, interp((x + noise).clamp(0, 1), y).saliency).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="fmnist_resnet")
    ap.add_argument("--rtsa", type=Path, required=True)
    ap.add_argument("--n", type=int, default=100, help="images attacked")
    ap.add_argument("--noise-n", type=int, default=500)
    ap.add_argument("--quality-n", type=int, default=2000)
    ap.add_argument("--eps", type=float, default=24)
    ap.add_argument("--shorten", type=int, default=4)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = load_model(a.model)
    test = fashion_mnist("test")
    xs, ys = test.tensors
    with torch.no_grad():
        ok = model(xs[:2 * a.n]).argmax(1) == ys[:2 * a.n]
    x, y = xs[:2 * a.n][ok][: a.n], ys[:2 * a.n][ok][: a.n]
    y_t = target_classes(y, 10, torch.Generator().manual_seed(0))
    out = {"model": a.model, "rtsa": str(a.rtsa), "n": len(x), "eps_255": a.eps, "shorten": a.shorten,
           "machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "date": time.strftime("%Y-%m-%d"),
           "rows": {}}
    for label, interp in (("RTS", RTS.for_model(model)), ("RTS^A", RTS.for_model(model, a.rtsa))):
        t0 = time.time()
        row = {"quality": rts_quality(interp, test, limit=a.quality_n)}
        gen = torch.Generator().manual_seed(1)
        row["noise_l1"] = {f"{k} {v}": noise_l1(interp, xs[:a.noise_n], ys[:a.noise_n], k, v, gen) for k, v in NOISE}
        asr, dist = [], []
        for i in range(0, len(x), a.batch):
            xb, tb = x[i:i + a.batch], y_t[i:i + a.batch]
            with torch.no_grad():
                target = interp(xb).saliency
            r = Adv2("rts", a.eps / 255, "short", shorten=a.shorten)(interp, xb, tb, target)
            with torch.no_grad():
                m = interp(r.x_adv).saliency
            asr.append(r.success.float())
            dist.append(l1(m, target))
        s, d = torch.cat(asr), torch.cat(dist)
        row["adv2"] = {"asr": float(s.mean()), "l1_to_target": float(d[s.bool()].mean()) if s.any() else None,
                       "l1_to_target_all": float(d.mean())}
        row["seconds"] = round(time.time() - t0, 1)
        out["rows"][label] = row
        print(f"[{label}] {json.dumps(row)}", file=sys.stderr, flush=True)
    r, ra = out["rows"]["RTS"], out["rows"]["RTS^A"]
    print(f"\n### {a.model}: RTS vs RTS^A ({out['n']} attacked images, ε = {a.eps:g}/255, ADV² ÷{a.shorten}; "
          f"{out['machine']})\n")
    print("| | preserved | destroyed | area | ADV² ASR | L1(adv map, target) | " + " | ".join(f"noise {k}" for k in r["noise_l1"]) + " |")
    print("|---" * (6 + len(r["noise_l1"])) + "|")
    for label, row in out["rows"].items():
        q, adv = row["quality"], row["adv2"]
        print(f"| {label} | {q['preserved_acc']:.1%} | {q['destroyed_acc']:.1%} | {q['area']:.3f} | {adv['asr']:.0%} | "
              f"{adv['l1_to_target'] if adv['l1_to_target'] is None else round(adv['l1_to_target'], 3)} | "
              + " | ".join(f"{v:.3f}" for v in row["noise_l1"].values()) + " |")
    if r["adv2"]["l1_to_target"] and ra["adv2"]["l1_to_target"]:
        print(f"\nL1 ratio RTS^A / RTS under ADV²: {ra['adv2']['l1_to_target'] / r['adv2']['l1_to_target']:.2f} (bar ≥ 2)")
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
