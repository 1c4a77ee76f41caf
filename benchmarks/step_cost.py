"""Cost of one attack step, as a ratio to the floor: one forward + backward of the classifier w.r.t. the input.

    .venv/bin/python benchmarks/step_cost.py --model fmnist_resnet --batch 32
    .venv/bin/python benchmarks/step_cost.py --model mobilenet_v2 --batch 8 --device cuda
    .venv/bin/python benchmarks/step_cost.py --model mobilenet_v2 --batch 64 --device cuda --precision fp32,bf16 --channels-last
    .venv/bin/python benchmarks/step_cost.py --interpreters pgd,cam,rts,mask --compile   # + torch.compile rows

Every number comes from one run on one machine, model and batch (ratios, since shared machines are noisy).
A step's cost is measured through the real loop: (T(k2 steps) − T(k1 steps)) / (k2 − k1), so set-up costs
(MASK-ADV²'s initial mask solve, the final judgement) cancel. Also prints throughput against batch size
(CAM-ADV² images·steps per second) and peak memory (CUDA: max allocated; CPU: growth of the process's max RSS).
With ``--compile`` every attack also gets a row with ``Attack(compile=True)`` (timed after a warm-up call that
pays the compilation; the floor stays the eager forward + backward, so a ratio below 1 is a speed-up).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attacks.adv2 import PGD, Adv2, MaskAdv2  # noqa: E402
from guard.interpreters import build_interpreter  # noqa: E402
from guard.models import load_model  # noqa: E402
from training.data import fashion_mnist, photos  # noqa: E402

TARGETS = {"pgd": None, "cam": 1.3, "rts": 2.5, "grad": 4.0, "mask": 12.0, "mask-unroll": 12.0}


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, dev, repeat=1):
    best = float("inf")
    for _ in range(repeat):
        sync(dev)
        t0 = time.perf_counter()
        fn()
        sync(dev)
        best = min(best, time.perf_counter() - t0)
    return best


def floor(model, x, y, dev, reps):
    def fb():
        xi = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(xi), y), xi)
    fb()
    return timed(lambda: [fb() for _ in range(reps)], dev, 3) / reps


def attack_for(name, eps, k, precision="fp32", compile=False):
    kw = {"precision": precision, "compile": compile}
    if name == "pgd":
        return PGD(eps, steps=k, check_every=10 ** 6, **kw)
    if name.startswith("mask"):  # "mask": the default contrast lookahead; "mask-unroll": the paper's
        return MaskAdv2(eps, steps=(0, k), resolve_every=10 ** 6, **kw,
                        lookahead="unroll" if name == "mask-unroll" else "contrast")
    return Adv2(name, eps, steps=(0, k), check_every=10 ** 6, **kw)


def step_cost(name, interp, x, y_t, target, eps, dev, k1, k2, precision="fp32", compile=False):
    def run(k):
        atk = attack_for(name, eps, k, precision, compile)
        return timed(lambda: atk(interp, x, y_t, None if name == "pgd" else target), dev, 3 if compile else 2)
    return (run(k2) - run(k1)) / (k2 - k1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="fmnist_resnet")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--interpreters", default="pgd,cam,rts,grad,mask,mask-unroll")
    ap.add_argument("--batches", default="8,32,128", help="batch sizes for the throughput curve (CAM-ADV²)")
    ap.add_argument("--k", default="5,15", help="step counts k1,k2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", default="fp32", help="comma list of fp32,bf16,fp16: one row per attack and precision")
    ap.add_argument("--channels-last", action="store_true", help="model and inputs in channels-last memory format")
    ap.add_argument("--compile", action="store_true", help="also a torch.compile row per attack (not GRAD, mask-unroll)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    model = load_model(a.model).to(dev).eval()
    if a.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if model.input_size[1] == 28:
        pool = fashion_mnist("test").tensors[0][:max(int(b) for b in a.batches.split(",")) + a.batch]
        eps = 24 / 255
    else:
        p, _ = photos()
        pool = p.repeat(max(1, (max(int(b) for b in a.batches.split(",")) + a.batch) // len(p) + 1), 1, 1, 1)
        eps = 8 / 255
    pool = pool.to(dev)
    if a.channels_last:
        pool = pool.contiguous(memory_format=torch.channels_last)
    x = pool[: a.batch]
    with torch.no_grad():
        y_t = (model(x).argmax(1) + 1) % model.num_classes
    k1, k2 = (int(v) for v in a.k.split(","))
    base = floor(model, x, y_t, dev, 10)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"model": a.model, "batch": a.batch, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else
           f"cpu {platform.machine()}, {torch.get_num_threads()} threads", "torch": str(torch.__version__),
           "date": time.strftime("%Y-%m-%d"), "floor_s": base, "channels_last": a.channels_last, "rows": {}}
    precisions = a.precision.split(",")
    compiles = [False, True] if a.compile else [False]
    for name, prec, comp in ((n, p, c) for n in a.interpreters.split(",") for p in precisions for c in compiles):
        if comp and name in ("grad", "mask-unroll"):
            continue  # a double backward: compiled graphs do not support it
        interp = build_interpreter("cam" if name == "pgd" else name.split("-")[0], model)
        if name.startswith("mask"):  # a short initial solve: set-up cost only, but its noise would swamp k2 − k1 steps
            interp.cfg.steps = 10
        with torch.no_grad():
            target = interp(x).saliency
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        c = step_cost(name, interp, x, y_t, target, eps, dev, k1, k2, prec, comp)
        mem = (torch.cuda.max_memory_allocated(dev) / 2 ** 20 if dev.type == "cuda"
               else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024)
        row = (name if len(precisions) == 1 else f"{name}@{prec}") + ("+compile" if comp else "")
        out["rows"][row] = {"step_s": c, "ratio": c / base, "target": TARGETS.get(name), "peak_mem_mib": mem,
                            "precision": prec, "compile": comp}
        print(f"[{row}] {json.dumps(out['rows'][row])}", file=sys.stderr, flush=True)
    thr = {}
    cam = build_interpreter("cam", model)
    for b in (int(v) for v in a.batches.split(",")):
        xb = pool[:b]
        with torch.no_grad():
            yb, tb = (model(xb).argmax(1) + 1) % model.num_classes, cam(xb).saliency
        c = step_cost("cam", cam, xb, yb, tb, eps, dev, k1, k2)
        thr[b] = b / c
    out["throughput_cam_img_steps_per_s"] = thr
    print(f"\n### one attack step / one forward+backward of {a.model}, batch {a.batch}, {out['device']}, "
          f"torch {out['torch']}, {out['date']} (floor {base * 1e3:.1f} ms)\n")
    print("| attack | step (ms) | ratio to floor | target | peak memory (MiB) |")
    print("|---|---|---|---|---|")
    for row, r in out["rows"].items():
        name = row.split("@")[0].split("+")[0]
        label = "PGD" if name == "pgd" else f"{name.split('-')[0].upper()}-ADV²" + (" (unrolled)" if "-" in name else "")
        label += ("" if len(precisions) == 1 else f", {r['precision']}") + (", compiled" if r["compile"] else "")
        tgt = f"≤ {r['target']}" if r["target"] else "–"
        print(f"| {label} | {r['step_s'] * 1e3:.1f} | {r['ratio']:.2f} | {tgt} | {r['peak_mem_mib']:.0f} |")
    print("\n| batch | CAM-ADV² images·steps/s |\n|---|---|")
    for b, v in thr.items():
        print(f"| {b} | {v:.0f} |")
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
