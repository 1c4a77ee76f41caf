"""Targeted PGD attack success vs ε after 8-bit quantisation: which ε a dataset needs.

    .venv/bin/python benchmarks/eps_curve.py --model fmnist_resnet --n 200 --steps 100
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from underfire.attacks.adv2 import PGD  # noqa: E402
from underfire.attacks.targets import target_classes  # noqa: E402
from underfire.guard.interpreters import CAM  # noqa: E402
from underfire.guard.models import load_model  # noqa: E402
from underfire.training.data import fashion_mnist  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="fmnist_resnet")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--eps", default="4,8,16,24,32", help="ε values in 1/255 units")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    x, y = fashion_mnist("test").tensors
    with torch.no_grad():
        ok = model(x[: 2 * args.n]).argmax(1) == y[: 2 * args.n]
    x, y = x[: 2 * args.n][ok][: args.n], y[: 2 * args.n][ok][: args.n]
    yt = target_classes(y, model.num_classes, torch.Generator().manual_seed(0))
    interp = CAM(model)  # only its model is used: PGD has no interpretation term
    print(f"| ε (/255) | targeted PGD ASR, {args.steps} steps, 8-bit ({args.model}, {len(x)} images) |")
    print("|---|---|")
    for e in (float(v) for v in args.eps.split(",")):
        r = PGD(e / 255, steps=args.steps)(interp, x, yt)
        print(f"| {e:g} | {float(r.success.float().mean()):.1%} |", flush=True)


if __name__ == "__main__":
    main()
