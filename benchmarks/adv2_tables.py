"""The ADV² paper's attack tables on real models, printed as markdown: a thin front end of the audit.

    .venv/bin/python benchmarks/adv2_tables.py --model fmnist_resnet --n 200 --interpreters grad,cam,rts
    .venv/bin/python benchmarks/adv2_tables.py --model mobilenet_v2 --interpreters grad --n 16 \\
        --adv2 joint_lr=0.00098 --adv2 lam_scale=10          # a tuning run: options of every ADV²
    .venv/bin/python benchmarks/adv2_tables.py --targets benign,shapes,other --stadv --json out.json
    .venv/bin/python benchmarks/adv2_tables.py --n 200 --run-dir runs/t3   # a killed run resumes from its journal

It builds one audit target (PGD and ADV² against each interpreter, no defenses) and runs it with
``audit.runner.run_audit``, the code behind ``underfire audit`` and ``underfire reproduce``, so the attacks,
the input choice (correctly classified test images / the bundled photos), the 8-bit judging and the metrics
are the audit's. From the audit record it prints, per interpreter: PGD and ADV² (benign target map) with
ASR, MC, L1 and IoU to the benign map and the ratio L1(ADV²)/L1(PGD) (Table 3, Figures 5–6); with
``--targets`` the random-shape and other-class target maps (Tables 6, 8); with ``--stadv`` stAdv-ADV²
against CAM (when CAM is named); and, with two interpreters or more, the transfer matrix (Table 9: x* made against A, L1 of B's
map to B's benign map). ``--json`` keeps the whole audit record. ``underfire reproduce <table>`` runs the
presets of the same experiments and prints the paper's numbers beside ours.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from underfire.audit.progress import Progress  # noqa: E402
from underfire.audit.config import AuditConfig, Target  # noqa: E402
from underfire.audit.runner import run_audit  # noqa: E402


def option(text: str) -> tuple[str, object]:
    """``key=value`` with a Python literal value (``lam_scale=10``, ``steps=(100,300)``); a bare word stays a string."""
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"--adv2 takes key=value, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def config(a: argparse.Namespace) -> AuditConfig:
    data = a.data or ("fashion-mnist" if a.model.startswith("fmnist") else "photos")
    attacks = ["pgd", "adv2"] + (["stadv2"] if a.stadv else [])
    target = Target(a.model, interpreters=a.interpreters.split(","), data=data, n=a.n, eps=a.eps, attacks=attacks,
                    defenses=[], schedule=a.schedule, shorten=a.shorten, target_maps=a.targets.split(","),
                    adv2_options=dict(a.adv2) or None, attack_samples=a.attack_samples)
    return AuditConfig(name="adv2_tables", targets=[target], batch_size=a.batch, seed=a.seed, device=a.device)


def _f(v, pct=False):
    if v is None:
        return "–"
    return f"{v:.0%}" if pct else f"{v:.3f}"


def _m(row: dict | None, key: str):
    """The mean of one metric of an attack's summary row (None when the attack did not run or had no success)."""
    v = (row or {}).get(key)
    return v.get("mean") if isinstance(v, dict) else v


BAR = (0.95, 0.5)  # ADV² ASR at least, L1(ADV²)/L1(PGD) at most: the paper's shape, as for its four interpreters


def tables(report: dict) -> str:
    """The markdown tables of one adv2_tables audit record (Table 3 with the bar; target maps; stAdv; Table 9)."""
    (tg,) = report["targets"].values()
    cfg, env = report["config"]["targets"][0], report["environment"]
    interps = tg["summary"]["interpreters"]
    out = [f"{tg['model']}: {tg['n']} images, ε = {tg['eps_255']:g}/255, schedule {cfg['schedule']} "
           f"(÷{cfg['shorten'] if cfg['schedule'] == 'short' else 1})"
           + (f", ADV² options {cfg['adv2_options']}" if cfg.get("adv2_options") else "")
           + (f", the attacker's map estimated from {cfg['attack_samples']} samples per step (judged by the deployed "
              f"map)" if cfg.get("attack_samples") else "")
           + f"; {env.get('device', '?')}, {env.get('threads', '?')} threads, torch {env.get('torch', '?')}, "
           f"{env.get('date', '?')[:10]}; {report['seconds'] / 60:.0f} min", "",
           "| interpreter | PGD ASR (MC) | ADV² ASR (MC) | L1 PGD | L1 ADV² | ratio | IoU PGD | IoU ADV² "
           f"| bar: ASR ≥ {BAR[0]:.0%}, ratio ≤ {BAR[1]} |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in interps.items():
        p, a = r.get("pgd"), r.get("adv2")
        ratio = _m(a, "l1") / _m(p, "l1") if _m(a, "l1") is not None and _m(p, "l1") else None
        bar = ("–" if ratio is None or a is None else
               "met" if _m(a, "asr") >= BAR[0] and ratio <= BAR[1] else "**missed**")
        out.append(f"| {name} | {_f(_m(p, 'asr'), True)} ({_f(_m(p, 'mc'))}) | {_f(_m(a, 'asr'), True)} "
                   f"({_f(_m(a, 'mc'))}) | {_f(_m(p, 'l1'))} | {_f(_m(a, 'l1'))} | {_f(ratio)} | {_f(_m(p, 'iou'))} "
                   f"| {_f(_m(a, 'iou'))} | {bar} |")
    for kind in ("shapes", "other"):
        rows = [(n, r[f"adv2-{kind}"]) for n, r in interps.items() if f"adv2-{kind}" in r]
        if rows:
            out += ["", f"| target map: {kind} | ASR | L1(adversarial map, target) | L1(benign map, target) |",
                    "|---|---|---|---|"]
            out += [f"| {n} | {_f(_m(r, 'asr'), True)} | {_f(_m(r, 'l1'))} | {_f(_m(r, 'benign_l1_to_target'))} |"
                    for n, r in rows]
    stadv = [(n, r["stadv2"]) for n, r in interps.items() if "stadv2" in r]
    if stadv:
        out += ["", "| spatial attack | stAdv-ADV² ASR (MC) | L1 to benign map | IoU |", "|---|---|---|---|"]
        out += [f"| {n} | {_f(_m(s, 'asr'), True)} ({_f(_m(s, 'mc'))}) | {_f(_m(s, 'l1'))} | {_f(_m(s, 'iou'))} |"
                for n, s in stadv]
    transfer = tg["summary"].get("transfer") or {}
    if len(transfer) > 1:
        names = list(transfer)
        readers = list(next(iter(transfer.values())))
        out += ["", "Transfer (Table 9): x* made against the row's interpreter, L1 of the column's map to its "
                "benign map; the diagonal is ADV²'s own result.", "",
                "| made against \\ read by | " + " | ".join(readers) + " |", "|---" * (len(readers) + 1) + "|"]
        for a in names:
            out.append(f"| {a} | " + " | ".join(("**" + _f(transfer[a][b]) + "**") if a == b else _f(transfer[a].get(b))
                                                for b in readers) + " |")
        cols = [b for b in readers if b in transfer]
        worst = [b for b in cols if min(transfer, key=lambda a: transfer[a][b]) != b]
        out += ["", "Diagonal lowest in every column (the paper's shape): "
                + ("yes." if not worst else f"no — in the columns of {', '.join(worst)} another interpreter's "
                   "ADV² leaves that map closer to its benign map.")]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="fmnist_resnet")
    ap.add_argument("--data", default=None, help="fashion-mnist, photos or an image folder (default: by model)")
    ap.add_argument("--interpreters", default="grad,cam,rts")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--eps", type=float, default=None, help="in 1/255 units (default 24 for 28×28, 8 otherwise)")
    ap.add_argument("--schedule", default="short", choices=["short", "paper"])
    ap.add_argument("--shorten", type=int, default=4)
    ap.add_argument("--targets", default="benign", help="comma list of benign,shapes,other (target maps)")
    ap.add_argument("--stadv", action="store_true", help="also stAdv-ADV² (spatial) against CAM")
    ap.add_argument("--adv2", type=option, action="append", default=[], metavar="KEY=VALUE",
                    help="an option of every ADV² (attacks/adv2.py: lam_scale, joint_lr, steps, MASK's lookahead, "
                         "resolve_every, track, contrast_weight, ...); repeatable")
    ap.add_argument("--attack-samples", type=int, default=None,
                    help="ADV² against ig / smoothgrad optimises an estimate from this many path points / noisy "
                         "copies, drawn afresh every step; every iterate is judged by the deployed map")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="write the whole audit record here")
    ap.add_argument("--run-dir", type=Path, default=None,
                    help="keep the audit's per-batch journal here: a killed run started again with the same "
                         "settings resumes from its finished batches (default: a temporary folder)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = config(a)
    if a.run_dir is not None:
        a.run_dir.mkdir(parents=True, exist_ok=True)
        report = run_audit(cfg, a.run_dir, resume=True, progress=Progress())
    else:
        with tempfile.TemporaryDirectory() as run_dir:  # the journal of this run; the record is what is kept
            report = run_audit(cfg, Path(run_dir), progress=Progress())
    print("\n### " + tables(report))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
