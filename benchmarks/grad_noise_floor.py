"""How far random noise moves an interpreter's map: the floor under any "map close to benign" claim.

    .venv/bin/python benchmarks/grad_noise_floor.py --model mobilenet_v2 --interpreter grad --n 8

Adds uniform noise ±a/255 to each (8-bit) input, re-quantises, and prints the mean L1 per pixel between the
interpreter's map of the noisy input and of the clean one. An attack whose steps move every pixel by ±a/255
(sign steps of a/255) cannot settle closer to benign than level a does; finer steps can (MobileNetV2 GRAD:
floor 0.049 at ±1/255, ADV² with 0.25/255 steps 0.036; benchmarks/results/mobilenet_v2_grad_noise_floor.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attacks.threats import quantize  # noqa: E402
from guard.interpreters import build_interpreter  # noqa: E402
from guard.maps import l1  # noqa: E402
from guard.models import load_model  # noqa: E402
from training.data import fashion_mnist, photos  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mobilenet_v2")
    ap.add_argument("--interpreter", default="grad")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--levels", default="1,2,4,8", help="noise amplitudes in 1/255 units")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = load_model(a.model)
    x = (photos()[0] if model.input_size[1] != 28 else fashion_mnist("test").tensors[0])[: a.n]
    interp = build_interpreter(a.interpreter, model)
    clean = interp(x).saliency
    gen = torch.Generator().manual_seed(0)
    print(f"| noise | L1 to the clean {a.interpreter.upper()} map ({a.model}, {len(x)} inputs) |\n|---|---|")
    for lv in (float(v) for v in a.levels.split(",")):
        noise = (torch.rand(x.shape, generator=gen) * 2 - 1) * lv / 255
        print(f"| ±{lv:g}/255 | {float(l1(interp(quantize((x + noise).clamp(0, 1))).saliency, clean).mean()):.3f} |")


if __name__ == "__main__":
    main()
