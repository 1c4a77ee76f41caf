"""Reproduce the shape of the ADV² paper's tables on real models and data, and print them.

    .venv/bin/python benchmarks/adv2_tables.py --model fmnist_resnet --n 200 --interpreters grad,cam,rts
    .venv/bin/python benchmarks/adv2_tables.py --model mobilenet_v2 --interpreters grad,cam,mask --eps 8

Per interpreter: PGD and ADV² (benign target map) → ASR, MC, L1 and mean IoU to the benign map, and the
ratio L1(ADV²)/L1(PGD) (Table 3, Figures 5–6); optionally ADV² with random-shape and other-class target
maps (Tables 6, 8: L1 of the adversarial map to the target vs the benign map's L1 to it) and the
transfer matrix (Table 9: x* made against A, L1 of B's map to B's benign map). Only correctly classified
inputs are attacked. Results go to stdout (markdown) and --json.
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

from attacks.adv2 import PGD, make_adv2  # noqa: E402
from attacks.targets import benign_maps, other_class_maps, random_shapes, target_classes  # noqa: E402
from audit.metrics import confidence, iou_mean, l1  # noqa: E402
from guard.interpreters import build_interpreter  # noqa: E402
from guard.models import load_model  # noqa: E402
from training.data import fashion_mnist, photos  # noqa: E402


def pick_inputs(model, n: int, seed: int, skip: int = 0):
    if model.input_size[1] == 28:
        x, y = fashion_mnist("test").tensors
        x, y = x[: (n + skip) * 2], y[: (n + skip) * 2]
        pool = fashion_mnist("test").tensors
        pool = (pool[0][5000:7000], pool[1][5000:7000])
    else:
        x, _ = photos()
        with torch.no_grad():
            y = model(x).argmax(1)  # the photos have no labels: the model's own prediction is "y"
        pool = None
    with torch.no_grad():
        ok = model(x).argmax(1) == y
    return x[ok][skip:skip + n], y[ok][skip:skip + n], pool


def summarise(r, ref_map, y_t):
    s = r.success
    d = l1(r.explanation.saliency, ref_map)
    iou = iou_mean(r.explanation.saliency, ref_map)
    return {"asr": float(s.float().mean()), "mc": float(confidence(r.explanation.logits)[s].mean()) if s.any() else None,
            "l1": float(d[s].mean()) if s.any() else None, "iou": float(iou[s].mean()) if s.any() else None,
            "n": int(len(s))}


def batched(fn, n, bs):
    out = []
    for i in range(0, n, bs):
        out.append(fn(slice(i, min(n, i + bs))))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="fmnist_resnet")
    ap.add_argument("--interpreters", default="grad,cam,rts")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--skip", type=int, default=0,
                    help="skip the first K correctly classified inputs (split one run into parallel shards)")
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--eps", type=float, default=None, help="in 1/255 units (default 24 for 28×28, 8 otherwise)")
    ap.add_argument("--schedule", default="short", choices=["short", "paper"])
    ap.add_argument("--shorten", type=int, default=4)
    ap.add_argument("--lam-scale", type=float, default=1.0)
    ap.add_argument("--pgd-steps", type=int, default=None)
    ap.add_argument("--mask-interp-steps", type=int, default=300)
    ap.add_argument("--mask-steps", default=None, help="stage1,stage2 for MASK-ADV² (default: schedule)")
    ap.add_argument("--mask-lookahead", default="contrast", choices=["contrast", "unroll"],
                    help="MASK-ADV²'s interpretation term (attacks/adv2.py MaskAdv2)")
    ap.add_argument("--mask-resolve", type=int, default=None,
                    help="MASK-ADV² re-solves the mask every this many steps (default: stage 2 / 20)")
    ap.add_argument("--joint-step", type=float, default=None,
                    help="stage-2 sign-step size of ADV² against GRAD / CAM / RTS, in 1/255 units (default 1)")
    ap.add_argument("--mask-track", type=int, default=2,
                    help="MASK-ADV²'s Adam steps tracking the mask between re-solves, per attack step")
    ap.add_argument("--mask-contrast-weight", type=float, default=10.0,
                    help="weight of MASK-ADV²'s contrast lookahead term")
    ap.add_argument("--targets", default="benign", help="comma list of benign,shapes,other")
    ap.add_argument("--transfer", action="store_true", help="also the transfer matrix (needs ≥2 interpreters)")
    ap.add_argument("--stadv", action="store_true", help="also stAdv vs stAdv-ADV² on CAM")
    ap.add_argument("--stadv-steps", default="200,600", help="stage1,stage2 of stAdv-ADV² (stAdv runs stage1+stage2)")
    ap.add_argument("--stadv-lam", default="20,40", help="λ ramp start,end of stAdv-ADV²")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    eps = (args.eps if args.eps is not None else (24 if model.input_size[1] == 28 else 8)) / 255
    x, y, pool = pick_inputs(model, args.n, args.seed, args.skip)
    gen = torch.Generator().manual_seed(args.seed)
    y_t = target_classes(y, model.num_classes, gen)
    names = [s.strip() for s in args.interpreters.split(",") if s.strip()]
    interps = {n: build_interpreter(n, model, **({"steps": args.mask_interp_steps} if n == "mask" else {}))
               for n in names}
    mask_steps = tuple(int(v) for v in args.mask_steps.split(",")) if args.mask_steps else None
    pgd_steps = args.pgd_steps or (1000 if args.schedule == "paper" else 1000 // args.shorten)
    out = {"model": args.model, "n": len(x), "eps_255": round(eps * 255, 2), "schedule": args.schedule,
           "shorten": args.shorten if args.schedule == "short" else 1, "pgd_steps": pgd_steps,
           "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
           "date": time.strftime("%Y-%m-%d"), "mask_lookahead": args.mask_lookahead,
           "mask_resolve": args.mask_resolve, "mask_track": args.mask_track,
           "mask_contrast_weight": args.mask_contrast_weight, "joint_step_255": args.joint_step, "rows": {}}
    t_all = time.time()
    pgd = PGD(eps, steps=pgd_steps)
    pgd_x = torch.cat(batched(lambda s: pgd(interps[names[0]], x[s], y_t[s]).x_adv, len(x), args.batch))
    adv_x = {}
    for name in names:
        it = interps[name]
        t0 = time.time()
        bm = torch.cat(batched(lambda s: benign_maps(it, x[s]), len(x), args.batch))
        row = {}

        def judge(xa):
            from attacks.pgd import AttackResult

            with torch.no_grad():
                e = it(xa)
            return AttackResult(xa, e, e.logits.argmax(1) == y_t[: len(xa)])

        row["pgd"] = summarise(judge(pgd_x), bm, y_t)
        atk = make_adv2(name, eps, args.schedule, shorten=args.shorten, lam_scale=args.lam_scale,
                        **({"steps": mask_steps} if name == "mask" and mask_steps else {}),
                        **({"lookahead": args.mask_lookahead, "resolve_every": args.mask_resolve, "track": args.mask_track,
                           "contrast_weight": args.mask_contrast_weight} if name == "mask" else {}),
                        **({"joint_lr": args.joint_step / 255} if args.joint_step and name != "mask" else {}))
        for kind in args.targets.split(","):
            if kind == "benign":
                mt = bm
            elif kind == "shapes":
                mt = random_shapes(len(x), it.native_size(tuple(x.shape[-2:])), gen).to(x.dtype)
            elif kind == "other":
                if pool is None:
                    continue
                mt = other_class_maps(it, y_t, pool[0], pool[1], gen)
            rs = batched(lambda s: atk(it, x[s], y_t[s], mt[s]), len(x), args.batch)
            xa = torch.cat([r.x_adv for r in rs])
            if kind == "benign":
                adv_x[name] = xa
            res = judge(xa)
            row[f"adv2_{kind}"] = summarise(res, mt, y_t)
            if kind != "benign":
                row[f"adv2_{kind}"]["benign_l1_to_target"] = float(l1(bm, mt).mean())
        row["seconds"] = round(time.time() - t0, 1)
        if row["pgd"]["l1"] and row.get("adv2_benign", {}).get("l1") is not None:
            row["l1_ratio"] = row["adv2_benign"]["l1"] / row["pgd"]["l1"]
        out["rows"][name] = row
        print(f"[{name}] done in {row['seconds']}s: {json.dumps(row)}", file=sys.stderr, flush=True)
    if args.stadv:
        from attacks.stadv import StAdv, StAdv2

        it = build_interpreter("cam", model)
        bm = torch.cat(batched(lambda s: benign_maps(it, x[s]), len(x), args.batch))
        s1, s2 = (int(v) for v in args.stadv_steps.split(","))
        lam = tuple(float(v) for v in args.stadv_lam.split(","))
        t0 = time.time()
        rs = torch.cat(batched(lambda s: StAdv(steps=s1 + s2)(it, x[s], y_t[s]).x_adv, len(x), args.batch))
        ra = torch.cat(batched(lambda s: StAdv2(steps=(s1, s2), lam=lam)(it, x[s], y_t[s], bm[s]).x_adv, len(x), args.batch))
        row = {}
        for key, xa in (("stadv", rs), ("stadv2", ra)):
            with torch.no_grad():
                e = it(xa)
            from attacks.pgd import AttackResult

            row[key] = summarise(AttackResult(xa, e, e.logits.argmax(1) == y_t), bm, y_t)
        row["l1_ratio"] = (row["stadv2"]["l1"] or 0) / max(row["stadv"]["l1"] or 1e-9, 1e-9)
        row["seconds"] = round(time.time() - t0, 1)
        row["lam"] = list(lam)
        out["stadv_cam"] = row
        print(f"[stadv] done: {json.dumps(row)}", file=sys.stderr, flush=True)
    if args.transfer and len(adv_x) > 1:
        bms = {b: torch.cat(batched(lambda s: benign_maps(interps[b], x[s]), len(x), args.batch)) for b in names}
        out["transfer"] = {a: {b: float(l1(torch.cat(batched(lambda s: interps[b](xa[s]).saliency, len(x), args.batch)),
                                           bms[b]).mean()) for b in names} for a, xa in adv_x.items()}
    out["seconds"] = round(time.time() - t_all, 1)
    print_tables(out)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))


def _f(v, pct=False):
    if v is None:
        return "–"
    return f"{v:.0%}" if pct else f"{v:.3f}"


def print_tables(out: dict) -> None:
    print(f"\n### {out['model']}: {out['n']} images, ε = {out['eps_255']}/255, schedule {out['schedule']} "
          f"(÷{out['shorten']}), PGD {out['pgd_steps']} steps; {out['machine']}; {out['seconds']}s\n")
    print("| interpreter | PGD ASR (MC) | ADV² ASR (MC) | L1 PGD | L1 ADV² | ratio | IoU PGD | IoU ADV² |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in out["rows"].items():
        p, a = r["pgd"], r.get("adv2_benign", {})
        print(f"| {name} | {_f(p['asr'], True)} ({_f(p['mc'])}) | {_f(a.get('asr'), True)} ({_f(a.get('mc'))}) | "
              f"{_f(p['l1'])} | {_f(a.get('l1'))} | {_f(r.get('l1_ratio'))} | {_f(p['iou'])} | {_f(a.get('iou'))} |")
    for kind in ("shapes", "other"):
        rows = [(n, r[f"adv2_{kind}"]) for n, r in out["rows"].items() if f"adv2_{kind}" in r]
        if rows:
            print(f"\n| target map: {kind} | ASR | L1(adv map, target) | L1(benign map, target) |")
            print("|---|---|---|---|")
            for n, r in rows:
                print(f"| {n} | {_f(r['asr'], True)} | {_f(r['l1'])} | {_f(r['benign_l1_to_target'])} |")
    if "stadv_cam" in out:
        r = out["stadv_cam"]
        print("\n| CAM, spatial attack | ASR (MC) | L1 to benign map | IoU |")
        print("|---|---|---|---|")
        for k, label in (("stadv", "stAdv"), ("stadv2", "stAdv-ADV²")):
            print(f"| {label} | {_f(r[k]['asr'], True)} ({_f(r[k]['mc'])}) | {_f(r[k]['l1'])} | {_f(r[k]['iou'])} |")
        print(f"| ratio | | {_f(r['l1_ratio'])} | |")
    if "transfer" in out:
        names = list(out["transfer"])
        print("\n| source \\ read by | " + " | ".join(names) + " |")
        print("|---" * (len(names) + 1) + "|")
        for a in names:
            print(f"| {a} | " + " | ".join(_f(out["transfer"][a][b]) for b in names) + " |")


if __name__ == "__main__":
    main()
