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

Any interpreter name of the registry is an attack row (``gradcam``, ``gradcampp``, ``inputxgrad``, ``ig``,
``smoothgrad``, ``smooth:cam``, ``beta:grad``, ...); maps that average several passes (IG's path steps,
SmoothGrad's and smoothing's noise samples) also get the ratio per pass, whose target is GRAD's (≤ 4).
``--detectors`` adds each detector's scoring cost per input (as a ratio to the floor per input; target ≤ 0.1
for those that run no interpreter), ``--blackbox`` the query rate of black-box ADV² (queries per second,
attacks/blackbox.py) against each named interpreter, and ``--peers`` the same batch through the reference
libraries where installed (torchattacks' PGD step; captum's Saliency and IntegratedGradients and
pytorch-grad-cam's GradCAM maps beside ours), so the docs show underfire beside them rather than alone.
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

from underfire.attacks.adv2 import PGD, MaskAdv2, make_adv2  # noqa: E402
from underfire.guard.registry import build_interpreter  # noqa: E402
from underfire.guard.models import load_model  # noqa: E402
from underfire.training.data import fashion_mnist, photos  # noqa: E402

TARGETS = {"pgd": None, "cam": 1.3, "rts": 2.5, "grad": 4.0, "mask": 12.0, "mask-unroll": 12.0, "gradcam": 4.0,
           "gradcampp": 4.0, "inputxgrad": 4.0, "beta:grad": 4.0}
PASSES = {"ig": 16, "smoothgrad": 16}  # passes per map (path steps / noise samples); smooth:<name>: 8
PER_PASS_TARGET = 4.0


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
    return make_adv2(name, eps, steps=(0, k), check_every=10 ** 6, **kw)


def step_cost(name, interp, x, y_t, target, eps, dev, k1, k2, precision="fp32", compile=False):
    def run(k):
        atk = attack_for(name, eps, k, precision, compile)
        return timed(lambda: atk(interp, x, y_t, None if name == "pgd" else target), dev, 3 if compile else 2)
    return (run(k2) - run(k1)) / (k2 - k1)


def detector_rows(model, x, x_cal, base, dev, names) -> dict:
    """Scoring cost per input of each detector, calibrated on ``x_cal`` (as a ratio to the floor per input)."""
    from underfire.guard.ensemble import NormalisedDisagreementDetector
    from underfire.guard.squeeze import SqueezeDetector
    from underfire.guard.stability import StabilityDetector

    members = [build_interpreter(n, model) for n in ("grad", "cam")]
    make = {"squeeze": lambda: SqueezeDetector(model), "squeeze-torch": lambda: SqueezeDetector(
                model, ("bits-2", "bits-3", "median-2", "median-3")),
            "ensemble-norm": lambda: NormalisedDisagreementDetector(members),
            "stability": lambda: StabilityDetector(members)}
    rows = {}
    for d in names:
        det = make[d]()
        det.calibrate(x_cal, 0.05)
        t = timed(lambda: det.scores(x), dev, 3)
        # squeezing runs the classifier once per squeezer, the others run interpreters: forwards the target
        # (scoring arithmetic ≤ 0.1 floor per input) cannot include
        runs = {"ensemble-norm": "runs interpreters", "stability": "runs interpreters"}.get(
            d, f"runs the classifier on {len(det.thresholds) - 1 if 'joint' in det.thresholds else len(det.thresholds)} "
               f"squeezed copies")
        rows[d] = {"per_input_s": t / len(x), "ratio": t / base, "target": None, "note": runs}
        print(f"[detector {d}] {json.dumps(rows[d])}", file=sys.stderr, flush=True)
    return rows


def blackbox_rows(model, x, y_t, eps, base, dev, names) -> dict:
    """Black-box ADV²'s query rate: one refinement step estimates with 2 · samples queries per image."""
    from underfire.attacks.blackbox import Counted, QueryAdv2

    rows = {}
    for n in names:
        oracle = Counted(build_interpreter(n, model))
        with torch.no_grad():
            target = oracle(x).saliency

        def run(budget):
            atk = QueryAdv2(eps, budget, samples=10, check_every=10 ** 6)
            return atk(oracle, x, y_t, target, start=x.clone())
        per_step = 2 * 10
        t1 = timed(lambda: run(2 + 2 * per_step), dev, 2)
        t2 = timed(lambda: run(2 + 6 * per_step), dev, 2)
        step = (t2 - t1) / 4
        rows[n] = {"queries_per_step": per_step, "step_s": step, "queries_per_s": per_step * len(x) / step,
                   "ratio": step / base}
        print(f"[blackbox {n}] {json.dumps(rows[n])}", file=sys.stderr, flush=True)
    return rows


def peer_rows(model, x, y_t, eps, base, dev, k1, k2) -> dict:
    """The same batch through torchattacks, captum and pytorch-grad-cam (where installed) beside underfire."""
    import importlib.util

    rows = {}
    if importlib.util.find_spec("torchattacks"):
        import torchattacks

        def theirs(k):
            atk = torchattacks.PGD(model, eps=eps, alpha=1 / 255, steps=k, random_start=False)
            atk.set_mode_targeted_by_label(quiet=True)
            return timed(lambda: atk(x, y_t), dev, 2)
        cam = build_interpreter("cam", model)
        # alternate the two, three rounds, and keep each one's fastest: a busy neighbour slows both alike
        ours, peer = [], []
        for _ in range(3):
            ours.append(step_cost("pgd", cam, x, y_t, None, eps, dev, k1, k2))
            peer.append((theirs(k2) - theirs(k1)) / (k2 - k1))
        rows["PGD step"] = {"ours": min(ours) / base, "theirs": min(peer) / base, "library": "torchattacks",
                            "rounds": 3}
    maps = []
    if importlib.util.find_spec("captum"):
        maps += [("GRAD map", "grad", "captum:Saliency"), ("IG map (16 steps)", "ig", "captum:IntegratedGradients")]
    if importlib.util.find_spec("pytorch_grad_cam"):
        maps += [("Grad-CAM map", "gradcam", "gradcam:GradCAM")]
    for label, ours_name, peer in maps:
        ours_i = build_interpreter(ours_name, model)
        kw = {"n_steps": 16} if peer.endswith("IntegratedGradients") else {}
        peer_i = build_interpreter(peer, model, **kw)
        t_ours = timed(lambda: ours_i(x), dev, 3)  # the map alone, as the library computes it
        t_graph = timed(lambda: ours_i(x.clone().requires_grad_(True)), dev, 3)  # with the graph an attack needs
        t_peer = timed(lambda: peer_i(x), dev, 3)
        rows[label] = {"ours": t_ours / base, "ours_attack_graph": t_graph / base, "theirs": t_peer / base,
                       "library": peer.split(":")[0]}
        print(f"[peer {label}] {json.dumps(rows[label])}", file=sys.stderr, flush=True)
    return rows


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
    ap.add_argument("--weights", default=None, help="for torchvision:<arch>: weights (\"random\" costs the same as trained)")
    ap.add_argument("--detectors", default="", help="comma list of detectors to time: squeeze,ensemble-norm,stability")
    ap.add_argument("--blackbox", default="", help="comma list of interpreters to time black-box ADV² queries against")
    ap.add_argument("--peers", action="store_true", help="also time torchattacks / captum / pytorch-grad-cam where installed")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    model = load_model(a.model, a.weights).to(dev).eval()
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
    big_floor: dict[int, float] = {}  # passes -> floor of batch × passes images
    for name, prec, comp in ((n, p, c) for n in a.interpreters.split(",") for p in precisions for c in compiles):
        if comp and name in ("grad", "mask-unroll"):
            continue  # a double backward: compiled graphs do not support it
        interp = build_interpreter("cam" if name == "pgd" else name.removesuffix("-unroll"), model)
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
        passes = PASSES.get(name, 8 if name.startswith("smooth:") else None)
        out["rows"][row] = {"step_s": c, "ratio": c / base, "target": TARGETS.get(name), "peak_mem_mib": mem,
                            "precision": prec, "compile": comp}
        if passes:
            # per pass against the floor of this batch, and against the floor of the same number of images
            # (batch × passes in one forward + backward): the second isolates the method's cost from a large
            # batch's slower memory traffic
            if passes not in big_floor:
                big_floor[passes] = floor(model, x.repeat(passes, 1, 1, 1), y_t.repeat(passes), dev, 2)
            out["rows"][row].update(passes=passes, ratio_per_pass=c / base / passes, target_per_pass=PER_PASS_TARGET,
                                    ratio_per_pass_same_images=c / big_floor[passes],
                                    floor_same_images_s=big_floor[passes])
        print(f"[{row}] {json.dumps(out['rows'][row])}", file=sys.stderr, flush=True)
    pool_cal = pool[a.batch: a.batch + 32] if len(pool) >= a.batch + 8 else pool
    out["detectors"] = detector_rows(model, x, pool_cal, base, dev, [d for d in a.detectors.split(",") if d])
    out["blackbox"] = blackbox_rows(model, x, y_t, eps, base, dev, [n for n in a.blackbox.split(",") if n])
    out["peers"] = peer_rows(model, x, y_t, eps, base, dev, k1, k2) if a.peers else {}
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
        label = "PGD" if name == "pgd" else (f"{name.removesuffix('-unroll').upper()}-ADV²"
                                             + (" (unrolled)" if name.endswith("-unroll") else ""))
        label += ("" if len(precisions) == 1 else f", {r['precision']}") + (", compiled" if r["compile"] else "")
        tgt = f"≤ {r['target']}" if r["target"] else "–"
        if "passes" in r:
            label += (f" ({r['passes']} passes: {r['ratio_per_pass']:.2f} per pass, "
                      f"{r['ratio_per_pass_same_images']:.2f} of the floor of {a.batch}×{r['passes']} images)")
            tgt = f"≤ {r['target_per_pass']} per pass"
        print(f"| {label} | {r['step_s'] * 1e3:.1f} | {r['ratio']:.2f} | {tgt} | {r['peak_mem_mib']:.0f} |")
    if out["detectors"]:
        print("\n| detector | scoring per input (ms) | ratio to the floor per input | target |\n|---|---|---|---|")
        for d, r in out["detectors"].items():
            print(f"| {d} | {r['per_input_s'] * 1e3:.2f} | {r['ratio']:.3f} | {r['target'] or '– (' + r['note'] + ')'} |")
    if out["blackbox"]:
        print("\n| black-box ADV² against | queries per step per image | step (ms) | queries / s |\n|---|---|---|---|")
        for n, r in out["blackbox"].items():
            print(f"| {n} | {r['queries_per_step']} | {r['step_s'] * 1e3:.1f} | {r['queries_per_s']:.0f} |")
    if out["peers"]:
        print("\n| same batch | underfire (ratio to floor) | reference library (ratio to floor) |\n|---|---|---|")
        for n, r in out["peers"].items():
            print(f"| {n} | {r['ours']:.2f} | {r['theirs']:.2f} ({r['library']}) |")
    print("\n| batch | CAM-ADV² images·steps/s |\n|---|---|")
    for b, v in thr.items():
        print(f"| {b} | {v:.0f} |")
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
