"""Pre-flight checks: the audit refuses (:class:`AuditRefused`) a deployment it cannot measure rather than
report it as safe: probability outputs, untrained weights, no gradient, a team map whose gradient disagrees
with its finite differences."""

from __future__ import annotations

import torch
from underfire.attacks.blackbox import THREATS
from underfire.audit.config import (
    AuditError,
    AuditRefused,
    Target,
    adaptive_names,
    adv2_names,
    ensemble_names,
    stability_names,
)
from underfire.audit.defenses import NEEDS_TWO, TABLE, parts


def _looks_like_probabilities(z: torch.Tensor) -> bool:
    """(B, K) outputs that are non-negative and sum to 1 per row: softmax probabilities, not logits."""
    return bool((z >= 0).all()) and torch.allclose(z.sum(1), torch.ones_like(z[:, 0]), atol=1e-3)


def check_outputs(t: Target, model, x: torch.Tensor) -> None:
    """Finite (B, K) outputs, and logits unless the target declares probabilities."""
    with torch.no_grad():
        z = model(x[:8])
    if not torch.isfinite(z).all():
        raise AuditError(f"model {model.name} returns NaN or inf on the audit data")
    if z.ndim != 2 or z.shape[1] != model.num_classes:
        raise AuditError(f"model {model.name} must return logits (B, {model.num_classes}), got {tuple(z.shape)}")
    probs = _looks_like_probabilities(z)
    if probs and t.outputs == "logits":
        raise AuditRefused(f"model {model.name} returns probabilities (non-negative, each row sums to 1), not "
                           f"logits: the attacks' losses assume logits and would under-report. Declare it with "
                           f"--outputs probs (outputs = \"probs\") and the audit takes their log")
    if not probs and t.outputs == "probs":
        raise AuditError(f"outputs = 'probs' was declared, but model {model.name}'s outputs are not probabilities "
                         f"(negative values, or rows that do not sum to 1); drop --outputs probs")


# the one-sided binomial test behind "at chance": a model whose accuracy cannot be told from 1/K at this level
CHANCE_P = 0.01


def check_trained(t: Target, model, pred: torch.Tensor, labels: torch.Tensor | None, probs: torch.Tensor) -> None:
    """Refuse a model that is at chance on its own audit data (labelled), or whose predictions on unlabelled
    data are near-uniform or one class for everything: an untrained net, wrong weights, a wrong class order."""
    from scipy.stats import binomtest

    k_cls = model.num_classes
    hint = ("untrained weights, the wrong weights file, or data in another class order? Check with "
            "`underfire predict`; for torchvision:<arch>, --weights random audits random weights on purpose")
    if labels is not None:
        k, n = int((pred == labels).sum()), len(pred)
        p = binomtest(k, n, 1 / k_cls, alternative="greater").pvalue
        if p > CHANCE_P:
            raise AuditRefused(f"model {model.name} is at chance on {t.data}: {k}/{n} correct ({k / n:.1%}; chance "
                               f"{1 / k_cls:.1%}, one-sided binomial p = {p:.2g}) — {hint}")
        return
    top = probs.amax(1)
    floor = 1 / k_cls + 0.05 * (1 - 1 / k_cls)
    if len(pred) >= 4 and len(set(pred.tolist())) == 1:
        raise AuditRefused(f"model {model.name} predicts class {int(pred[0])} for every one of the {len(pred)} "
                           f"inputs of {t.data} — {hint}")
    if float(top.median()) < floor:
        raise AuditRefused(f"model {model.name} is near-uniform on {t.data}: median top-1 probability "
                           f"{float(top.median()):.3f} (uniform {1 / k_cls:.3f}) — {hint}")


def _gradient_names(t: Target) -> set[str]:
    """Interpreters a gradient attack of this target optimises through."""
    names = set()
    if "adv2" in t.attacks:
        names |= set(adv2_names(t))
    if "stadv2" in t.attacks and "cam" in t.interpreters:
        names.add("cam")
    if "adaptive" in t.attacks and t.defenses:
        names |= set(adaptive_names(t))
        reads = {g for d in t.defenses if parts(d)[1] in TABLE for g in TABLE[parts(d)[1]].reads}
        if "ensemble" in reads:
            names |= set(ensemble_names(t))
        if "stability" in reads:
            names |= set(stability_names(t))
    return names


def preflight(t: Target, model, interps: dict, x: torch.Tensor, y: torch.Tensor, opaque: set) -> list[str]:
    """Gradient checks: PGD needs the logits' gradient (a missing one refuses the audit: it would report a
    deployment it could not attack as safe); a map without a gradient is added to ``opaque`` and attacked with
    queries instead (black-box ADV²). Returns warnings."""
    warnings = []
    if model.training:
        model.eval()
        warnings.append("model was in training mode; the audit put it in eval mode")
    xg = x[:2].clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(xg).gather(1, y[:2, None]).sum(), xg, allow_unused=True)
    if g is None or not torch.isfinite(g).all() or float(g.abs().sum()) == 0:
        raise AuditRefused(f"model {model.name}'s logits have no gradient w.r.t. the input (masked or "
                           f"non-differentiable preprocessing): PGD and ADV² cannot attack it, and an audit would "
                           f"report it safe. Audit the differentiable model behind the preprocessing")
    for name, it in interps.items():
        if it.traits.iterative or name in opaque:
            continue  # an iterative map's (MASK's) gradient flows through its unrolled inner steps: tested
        xg = x[:2].clone().requires_grad_(True)
        e = it(xg)
        g = None
        if e.saliency.requires_grad:
            (g,) = torch.autograd.grad(e.saliency.sum(), xg, allow_unused=True)
        if g is None or not torch.isfinite(g).all() or float(g.abs().sum()) == 0:
            opaque.add(name)
    return warnings


def gradient_agreement(it, x: torch.Tensor, y: torch.Tensor, directions: int = 6, h: float = 1e-3,
                       seed: int = 0) -> dict:
    """How well a map's autograd gradient predicts its change: along ``directions`` random ±1 directions v, the
    directional derivative ∇⟨w, g(x)⟩·v against the central difference (⟨w, g(x + hv)⟩ − ⟨w, g(x − hv)⟩) / 2h,
    for a fixed random projection w; the RNG is reseeded for every call (a random map compares like with like).
    Returns the cosine between the two vectors and the ratio of their norms. A gradient attack can only follow a
    map whose gradient agrees (cosine ≳ 0.9 for CAM and Grad-CAM on the bundled ResNet); a map detached from its
    input plus a tiny term in x gives cosine ≈ 0 and ratio ≈ 0."""
    gen = torch.Generator().manual_seed(seed)
    x = x.detach().clamp(h, 1 - h)

    def proj(xx: torch.Tensor, w: torch.Tensor | None = None):
        with torch.random.fork_rng(devices=[xx.device] if xx.device.type == "cuda" else []):
            torch.manual_seed(seed)
            m = it(xx, y).saliency
        return m if w is None else (m * w).sum()

    xg = x.clone().requires_grad_(True)
    m = proj(xg)
    w = (torch.randn(m.shape, generator=gen) / m[0].numel() ** 0.5).to(m)
    g = torch.autograd.grad((m * w).sum(), xg, allow_unused=True)[0] if m.requires_grad else None
    g = torch.zeros_like(x) if g is None else g.detach()
    ad, fd = [], []
    for _ in range(directions):
        v = (torch.randint(0, 2, x.shape, generator=gen) * 2 - 1).to(x)
        ad.append(float((g * v).sum()))
        fd.append(float(proj(x + h * v, w).detach() - proj(x - h * v, w).detach()) / (2 * h))
    a, f = torch.tensor(ad), torch.tensor(fd)
    if max(float(a.norm()), float(f.norm())) < 1e-8:
        return {"cosine": 1.0, "ratio": 1.0}  # a flat map: nothing to disagree about
    cos = float(a @ f / (a.norm() * f.norm()).clamp_min(1e-12))
    return {"cosine": round(cos, 3), "ratio": round(float(a.norm() / f.norm().clamp_min(1e-12)), 3)}


def check_faithful(interps: dict, names: list[str], x: torch.Tensor, y: torch.Tensor, opaque: set) -> dict:
    """A team's maps whose gradient disagrees with their finite differences (cosine < 0.5, or a norm ratio off by
    10×): {name: why}. Their gradient attacks follow another function, so their spoofability is a lower bound."""
    out = {}
    for name in names:
        if name in opaque:
            continue
        ag = gradient_agreement(interps[name], x[:2], y[:2])
        if ag["cosine"] < 0.5 or not 0.1 <= ag["ratio"] <= 10:
            out[name] = (f"its gradient disagrees with its finite differences (cosine {ag['cosine']:.2f}, norm ratio "
                         f"{ag['ratio']:.2f} along random directions): the gradient attack followed another function")
    return out


def exclude_opaque(t: Target, opaque: set, warnings: list[str]) -> None:
    """Interpreters without a gradient (and no native twin) leave every gradient attack: ADV² becomes black-box
    ADV², and defaults that would optimise through them (the members of the ensemble and stability detectors,
    the adaptive attacks) leave them out, with a note. Named explicitly there, the audit is refused: an
    adaptive attack blind to a member would overstate the defense."""
    for name in sorted(opaque):
        warnings.append(f"BLACK BOX: the {name} map has no gradient w.r.t. the input and no native twin; ADV² "
                        f"attacks it with queries ({THREATS[t.threat_model]}; ≤ {t.queries} queries per image). "
                        f"Its spoofability is a lower bound: a white-box attacker could do at least as well")
    if not opaque:
        return
    for group in ("ensemble_members", "stability_members", "adaptive_interpreters"):
        named = getattr(t, group)
        if named is not None and (bad := opaque & set(named)):
            raise AuditRefused(f"{sorted(bad)} in {group} have no gradient: an adaptive attack cannot optimise "
                               f"through them and would overstate the defense. Leave them out of {group}")
        if named is None:
            default = {"ensemble_members": ensemble_names, "stability_members": stability_names,
                       "adaptive_interpreters": adaptive_names}[group](t)
            setattr(t, group, [n for n in default if n not in opaque])
    for d in NEEDS_TWO:
        if any(parts(x)[1] == d for x in t.defenses) and len(t.ensemble_members) < 2:
            t.defenses = [x for x in t.defenses if parts(x)[1] != d]
            warnings.append(f"note: the {d} defense is dropped: fewer than two interpreters with a gradient to "
                            f"compare once {', '.join(sorted(opaque))} left its members")
    if not t.stability_members:
        for d in ("stability", "learned"):
            if any(parts(x)[1] == d for x in t.defenses):
                t.defenses = [x for x in t.defenses if parts(x)[1] != d]
                warnings.append(f"note: the {d} defense is dropped: no interpreter with a gradient to watch")
