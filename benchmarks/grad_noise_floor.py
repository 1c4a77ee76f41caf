"""How far random noise moves an interpreter's map: the floor under any "map close to benign" claim.

    .venv/bin/python benchmarks/grad_noise_floor.py --model mobilenet_v2 --interpreter grad --n 8
    .venv/bin/python benchmarks/grad_noise_floor.py --model fmnist_resnet --interpreter smoothgrad --n 64 \
        --levels 0,1,4 --json benchmarks/results/noise_floor_fmnist_resnet_smoothgrad.json

Adds uniform noise ±a/255 to each (8-bit) input, re-quantises, and prints the mean L1 per pixel between the
interpreter's map of the noisy input and of the clean one. An attack whose steps move every pixel by ±a/255
(sign steps of a/255) cannot settle closer to benign than level a does; finer steps can (MobileNetV2 GRAD:
floor 0.049 at ±1/255, ADV² with 0.25/255 steps 0.036; benchmarks/results/mobilenet_v2_grad_noise_floor.md).
Level 0 calls the interpreter again on the same input: for a randomised map (SmoothGrad) that is the floor its
own sampling leaves. ``--json`` keeps the table as a record (quoted in docs/ through benchmarks/docs.py).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from underfire.attacks.threats import quantize  # noqa: E402
from underfire.guard.registry import build_interpreter  # noqa: E402
from underfire.guard.maps import l1  # noqa: E402
from underfire.guard.models import load_model  # noqa: E402
from underfire.training.data import fashion_mnist, photos  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mobilenet_v2")
    ap.add_argument("--interpreter", default="grad")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--levels", default="1,2,4,8", help="noise amplitudes in 1/255 units")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the table as a record to this file")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = load_model(a.model)
    x = (photos()[0] if model.input_size[1] != 28 else fashion_mnist("test").tensors[0])[: a.n]
    interp = build_interpreter(a.interpreter, model)
    clean = interp(x).saliency
    gen = torch.Generator().manual_seed(a.seed)
    print(f"| noise | L1 to the clean {a.interpreter.upper()} map ({a.model}, {len(x)} inputs) |\n|---|---|")
    floor = {}
    for lv in (float(v) for v in a.levels.split(",")):
        noise = (torch.rand(x.shape, generator=gen) * 2 - 1) * lv / 255
        floor[f"{lv:g}"] = float(l1(interp(quantize((x + noise).clamp(0, 1))).saliency, clean).mean())
        print(f"| ±{lv:g}/255 | {floor[f'{lv:g}']:.3f} |")
    if a.json:
        a.json.write_text(json.dumps({
            "kind": "noise_floor", "model": a.model, "interpreter": a.interpreter, "n": len(x), "seed": a.seed,
            "l1_by_noise_255": floor, "machine": f"cpu ({platform.machine()}), {a.threads} thread(s)",
            "torch": torch.__version__, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
            "command": "python benchmarks/grad_noise_floor.py " + " ".join(sys.argv[1:])}, indent=1) + "\n")


if __name__ == "__main__":
    main()
