"""What a stronger ADV² buys against SmoothGrad, read two ways (a sweep kept as a log, not a record).

    .venv/bin/python benchmarks/smoothgrad_variants.py VARIANT [N]

fmnist_resnet, the first N (32) correctly classified test images among the first 80, ε = 24/255, GRAD's
preset ÷4, stage-2 rule "momentum" unless VARIANT says "sign". VARIANT joins parts with "+": ``base`` (none),
``exp`` (the attacker aims at the 256-copy map of x instead of the deployment's one draw), ``sK`` (the
attacker's map from K copies per step), ``longK`` (K stage-2 steps), ``lamK`` (λ × K). Prints the ADV² map's
L1 to the deployment's benign draw (three fresh draws), to the 256-copy benign map ("vs exp"), PGD's two
readings, and the floor (a second draw on the clean images). Log: benchmarks/results/smoothgrad_variants_32.log.
"""
import sys, time, torch
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from underfire.attacks.adv2 import make_adv2
from underfire.attacks.targets import target_classes
from underfire.guard.registry import build_interpreter
from underfire.guard.maps import l1
from underfire.guard.models import load_model
from underfire.training.data import fashion_mnist
from underfire.guard.adapters import Transfer
torch.set_num_threads(1)
torch.manual_seed(0)
variant = sys.argv[1]; n = int(sys.argv[2]) if len(sys.argv) > 2 else 32
model = load_model("fmnist_resnet")
x, y = fashion_mnist("test").tensors
x, y = x[:80], y[:80]
ok = (model(x).argmax(1) == y).nonzero().squeeze(1)[:n]
x, y = x[ok], y[ok]
yt = target_classes(y, 10, torch.Generator().manual_seed(0))
sg = build_interpreter("smoothgrad", model)
t_draw = sg(x).saliency.detach()
big = build_interpreter("smoothgrad", model, samples=256)
t_exp = big(x).saliency.detach()
opts = dict(joint_rule="momentum")
interp, target = sg, t_draw
for part in variant.split("+"):
    if part == "exp": target = t_exp
    elif part.startswith("s"): interp = Transfer(build_interpreter("smoothgrad", model, samples=int(part[1:])), sg)
    elif part.startswith("long"): opts["steps"] = (75, int(part[4:]))
    elif part.startswith("lam"): opts["lam_scale"] = float(part[3:])
    elif part == "sign": opts["joint_rule"] = "sign"
from underfire.attacks.adv2 import PGD
xp = PGD(eps=24/255, steps=250)(sg, x, yt).x_adv
pgd_draw, pgd_exp = float(l1(sg(xp).saliency, t_draw).mean()), float(l1(big(xp).saliency, t_exp).mean())
t0 = time.time()
r = make_adv2("smoothgrad", eps=24/255, schedule="short", shorten=4, **opts)(interp, x, yt, target)
fresh = [sg(r.x_adv).saliency for _ in range(3)]
print(variant, "ASR", float(r.success.float().mean()), "L1 draw", round(float(l1(r.explanation.saliency, t_draw).mean()), 4),
      "fresh", [round(float(l1(f, t_draw).mean()), 4) for f in fresh],
      "vs exp", round(float(l1(big(r.x_adv).saliency, t_exp).mean()), 4),
      "pgd draw/exp", round(pgd_draw, 4), round(pgd_exp, 4), "floor", round(float(l1(sg(x).saliency, t_draw).mean()), 4), f"{time.time()-t0:.0f}s", flush=True)
