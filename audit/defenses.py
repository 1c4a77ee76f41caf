"""The defenses an audit compares, and the comparison itself.

Two kinds, each scored only under an attack that knows it:
- detectors (``DETECTORS``) flag inputs; the adaptive ADV² carries the detector's hinge and must go undetected
  (``attacks.adaptive``). Costs: a false-positive rate on held-out benign images, and extra model passes.
  ``squeeze`` feature squeezing; ``ensemble`` interpreter disagreement (mean 1 − Pearson r, attacked through
  the whole ensemble); ``ensemble-norm`` disagreement relative to each member pair's benign level;
  ``stability`` how far each member's map moves under noise, a one-pixel shift and a median filter;
  ``learned`` a logistic regression (scikit-learn) over the other detectors' scores, trained on benign vs
  PGD / ADV² examples of calibration images.
- map defenses (``MAPS``) replace the deployed map; ADV² attacks the replaced map itself (for ``smooth``,
  each step's map averages fresh noise copies: expectation over the transformation). Costs: how far the
  defended benign map is from the plain one (L1), and the extra map computations.
  ``smooth`` randomized smoothing (``guard.smoothing``); ``beta`` β-smoothed GRAD (softplus-β backward);
  ``rtsa`` RTS^A in place of RTS (an adversarially trained RTS; bundled for the Fashion-MNIST nets).

- combined defenses ``<map>+<detector>`` (e.g. ``smooth+squeeze``) deploy both: the adaptive attack is the map
  defense's with the detector's hinge, and a spoof must stay within the defended map's τ and go undetected.

None of them changes the classifier: clean accuracy is unchanged by construction (cost 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from underfire.guard.ensemble import DisagreementDetector, NormalisedDisagreementDetector
from underfire.guard.interpreters.base import Traits
from underfire.guard.learned import LearnedDetector
from underfire.guard.registry import traits_or_none
from underfire.guard.squeeze import SqueezeDetector
from underfire.guard.stability import StabilityDetector

# the learned detector's squeezing part keeps the torch squeezers: OpenCV's non-local means runs per image on the
# CPU and would dominate every step of its adaptive attack (it is in the squeeze defense itself)
TORCH_SQUEEZERS = ("bits-2", "bits-3", "median-2", "median-3")


@dataclass(frozen=True)
class Defense:
    """One defense an audit can deploy. ``TABLE`` is the registry: the config's checks, the CLI's help, the
    runner, the report's labels and the docs read it; adding a defense is one module (in guard/) and one row.

    kind: "detector" (flags inputs; its adaptive attack carries its hinge) or "map" (replaces the deployed map;
        ADV² attacks the replaced map).
    label: the report's name of its rows: "ADV²* vs <label>" (detectors), "ADV²* on <label> map" (maps).
    about: one line for help texts and docs.
    build: detectors: ``(model, members, stability_members) -> Detector`` (members: the interpreters it reads).
    defended: maps: ``(name, traits) -> registry name`` deployed in place of interpreter ``name``, or None
        where it does not apply (traits None: a team's own map).
    settings: maps: the defended interpreter's constructor keywords from the audit target's settings (a dict).
    maps: maps: interpreter maps per explanation, from the target's settings (in place of the one plain map).
    needs_two: it compares interpreters (at least two members).
    joint: its adaptive attack optimises every member's map at once (one row shared by all interpreters, not
        this interpreter's own map; not combinable with a map defense).
    reads: the member groups a detector reads (its adaptive attack differentiates through them, so the
        pre-flight checks their gradients): "ensemble" (ensemble_members), "stability" (stability_members).
    """

    name: str
    kind: str
    label: str
    about: str
    build: Callable | None = None
    defended: Callable[[str, Traits | None], str | None] | None = None
    settings: Callable = lambda t: {}
    maps: Callable = lambda t: 1
    needs_two: bool = False
    joint: bool = False
    reads: tuple[str, ...] = ()


def _learned(model, members, stability_members):
    parts = [SqueezeDetector(model, TORCH_SQUEEZERS)]
    if len(members) >= 2:
        parts.append(NormalisedDisagreementDetector(members))
    parts.append(StabilityDetector(stability_members))
    return LearnedDetector(parts)


def _variant(defense: str):
    """A map defense that deploys an interpreter's registered variant (``Traits.variants``)."""
    return lambda name, traits: traits.variant(defense) if traits else None


TABLE = {d.name: d for d in (
    Defense("squeeze", "detector", "squeezing", "feature squeezing: the prediction moves under bit-depth "
            "reduction and filters", build=lambda model, members, stab: SqueezeDetector(model)),
    Defense("ensemble", "detector", "ensemble", "interpreter disagreement (mean 1 − Pearson r), attacked through "
            "the whole ensemble", build=lambda model, members, stab: DisagreementDetector(members),
            needs_two=True, joint=True, reads=("ensemble",)),
    Defense("ensemble-norm", "detector", "ensemble-norm", "disagreement relative to each member pair's benign "
            "level", build=lambda model, members, stab: NormalisedDisagreementDetector(members), needs_two=True,
            reads=("ensemble",)),
    Defense("stability", "detector", "stability", "how far each member's map moves under noise, a one-pixel "
            "shift and a median filter", build=lambda model, members, stab: StabilityDetector(stab), reads=("stability",)),
    Defense("learned", "detector", "learned", "a logistic regression (scikit-learn) over the other detectors' "
            "scores, trained on benign vs PGD / ADV² examples of calibration images", build=_learned,
            reads=("ensemble", "stability")),
    Defense("smooth", "map", "smoothed", "randomized smoothing of the map (σ, noisy copies; EOT attack)",
            defended=lambda name, traits: (f"smooth:{name}" if traits and not traits.iterative and ":" not in name
                                           else None),
            settings=lambda t: {"sigma": t["smooth_sigma"], "samples": t["smooth_samples"]},
            maps=lambda t: t.get("smooth_samples", 8)),
    Defense("beta", "map", "β-smoothed", "softplus-β in place of ReLU in a gradient map's backward pass",
            defended=_variant("beta"), settings=lambda t: {"beta": t["beta"]}),
    Defense("rtsa", "map", "RTS^A", "RTS^A in place of RTS (an adversarially trained RTS; bundled for the "
            "Fashion-MNIST nets)", defended=_variant("rtsa")),
)}
DETECTORS = tuple(n for n, d in TABLE.items() if d.kind == "detector")
MAPS = tuple(n for n, d in TABLE.items() if d.kind == "map")
DEFENSES = DETECTORS + MAPS
NEEDS_TWO = tuple(n for n, d in TABLE.items() if d.needs_two)


def combo(defense: str) -> tuple[str, str] | None:
    """``"smooth+squeeze"`` → ("smooth", "squeeze"): a map defense deployed together with a detector. Its
    adaptive attack is the map defense's (EOT for smoothing) with the detector's hinge added, and a spoof must
    also go undetected. None for a single defense; ValueError for a combination that is not one map defense
    and one detector (a joint detector's attack optimises the ensemble's map, not this one: excluded)."""
    if "+" not in defense:
        return None
    m, _, d = defense.partition("+")
    combinable = [x for x in DETECTORS if not TABLE[x].joint]
    if m not in MAPS or d not in combinable:
        raise ValueError(f"{defense!r}: a combined defense is <map defense>+<detector>, map one of "
                         f"{', '.join(MAPS)}, detector one of {', '.join(combinable)}")
    return m, d


def parts(defense: str) -> tuple[str | None, str | None]:
    """(map defense, detector) of any defense name; None where it has no such part."""
    c = combo(defense)
    if c:
        return c
    return (defense, None) if defense in MAPS else (None, defense)


def map_defense_name(defense: str, interpreter: str) -> str | None:
    """The registry name of ``interpreter`` under a map defense (``smooth:cam``), or None when it does not apply
    (an iterative map such as MASK is never smoothed: 8 × 300 solver steps per map)."""
    return TABLE[defense].defended(interpreter, traits_or_none(interpreter))  # None: a team's own map


def detector_cost(det) -> dict:
    """Extra work per judged input: classifier forward passes and interpreter maps."""
    return det.cost()


def map_cost(defense: str, target: dict) -> dict:
    """A map defense's maps per explanation (in place of the one plain map); ``target``: the target's settings."""
    return {"forwards": 0, "maps": TABLE[defense].maps(target)}


def row_label(row: str) -> str:
    """The report's name of an attack row of the records: ``adaptive-<detector>``, ``defense-<map>[+<detector>]``
    or a plain attack (``ATTACK_ROWS``)."""
    if row in ATTACK_ROWS:
        return ATTACK_ROWS[row]
    kind, _, defense = row.partition("-")
    if kind == "adaptive" and defense in DETECTORS:
        return f"ADV²* vs {TABLE[defense].label}"
    if kind == "defense" and defense:
        m, d = parts(defense) if "+" in defense else (defense, None)
        if m in MAPS:
            return f"ADV²* on {TABLE[m].label} map" + (f" + {d}" if d else "")
    return row


# The plain attack rows of a record, in the report's order (the adaptive and defense rows follow the table)
ATTACK_ROWS = {"pgd": "PGD", "adv2": "ADV²", "blackbox": "ADV² by queries", "stadv2": "stAdv-ADV²",
               "adv2-shapes": "ADV² → shape map†", "adv2-other": "ADV² → other-class map†"}


def row_order() -> list[str]:
    """Every row a record can hold, in the report's order: plain attacks, adaptive attacks per detector, map
    defenses alone and combined."""
    combos = [f"defense-{m}+{d}" for m in MAPS for d in DETECTORS if not TABLE[d].joint]
    return [*ATTACK_ROWS, *(f"adaptive-{d}" for d in DETECTORS), *(f"defense-{m}" for m in MAPS), *combos]


def combined_cost(*costs: dict | None) -> dict:
    """The cost of defenses deployed together: their forwards and maps added."""
    out = {"forwards": 0, "maps": 0}
    for c in costs:
        for k in out:
            if out[k] is not None:
                out[k] = None if not c or c.get(k) is None else out[k] + c[k]
    return out


def cost_text(c: dict) -> str:
    parts = [f"{c[k]} {k if c[k] > 1 else k[:-1]}" for k in ("forwards", "maps") if c.get(k)]
    return " + ".join(parts) if parts else "none"


UNCHECKED = ("one attack at one strength (attack strength quick): nothing shows that more compute would not "
             "raise it; run --attack-strength standard for the ensemble and its convergence check")


def convergence(ens: dict | None, n: int) -> dict:
    """Whether a row's worst case over its attack ensemble has converged (attacks/strength.py).

    ``ens``: the record's "ensemble" part (per input ``spoofed_by``: the first member that spoofed it, −1 for
    none; per batch the members' ``names``, ``costs``, ``seconds``). Spoofability as a function of attacker
    compute is the share of inputs spoofed by members of at most that cost. The row is NOT CONVERGED when the
    strongest (costliest) members still raise it above the upper end of the exact 95% interval of what all
    cheaper members reached (more than the interval's noise); "unchecked" with a single member (quick)."""
    from underfire.audit.metrics import rate

    if not ens:
        return {"status": "unchecked", "reason": UNCHECKED}
    k = ens["count"][0]
    names, costs = ens["names"][:k], ens["costs"][:k]
    sb = ens["spoofed_by"]
    by_member = [sum(1 for s in sb if s == j) for j in range(k)]
    batches = len(ens["seconds"]) // k
    seconds = [round(sum(ens["seconds"][b * k + j] for b in range(batches)), 1) for j in range(k)]
    ran = [sum(ens["ran"][b * k + j] for b in range(batches)) for j in range(k)]
    tiers = sorted(set(costs))
    curve = [{"cost": c, "spoofed": rate(sum(1 for s in sb if s >= 0 and costs[s] <= c), n)} for c in tiers]
    members = [{"name": nm, "cost": c, "spoofed_first": by_member[j], "inputs_run": ran[j], "seconds": seconds[j]}
               for j, (nm, c) in enumerate(zip(names, costs))]
    compute = sum(costs[j] * ran[j] for j in range(k)) / max(n, 1)  # per input, in preset attacks
    out = {"members": members, "curve": curve, "compute_per_input": round(compute, 2),
           "worst_member": max(members, key=lambda m: m["spoofed_first"])["name"] if any(by_member) else None}
    if k == 1 or len(tiers) == 1:
        return {**out, "status": "unchecked", "reason": UNCHECKED}
    before, after = curve[-2]["spoofed"], curve[-1]["spoofed"]
    gain = after["k"] - before["k"]
    if after["mean"] > before["ci95"][1]:
        return {**out, "status": "not converged",
                "reason": f"the costliest members (×{tiers[-1]} compute) still spoofed {gain} more of {n} inputs "
                          f"({before['mean']:.0%} → {after['mean']:.0%}), above the 95% interval of the cheaper "
                          f"ones: the number is an upper bound on safety"}
    return {**out, "status": "converged",
            "reason": f"the costliest members (×{tiers[-1]} compute) added {gain} of {n} inputs, within the 95% "
                      f"interval of the cheaper ones"}


def compare(a: dict, defenses: list[str], fpr: float) -> dict:
    """The comparison of one interpreter's defenses from its aggregated summary ``a`` (see ``aggregate``):
    rows (undefended first) and a verdict naming the defense with the lowest adaptive spoofability among those
    whose held-out FPR is not significantly above the target ``fpr`` (its exact 95% interval reaches it; map
    defenses flag nothing), and whether it measurably helps (non-overlapping intervals)."""
    base = a.get("spoofability")
    rows = [{"defense": "none", "spoofability": base, "asr": (a.get("adv2") or {}).get("asr"), "fpr_heldout": None,
             "auc": None, "fidelity_l1": None, "cost": {"forwards": 0, "maps": 0}, "applies": base is not None,
             "convergence": a.get("convergence") or {"status": "unchecked", "reason": UNCHECKED}}]
    for d in defenses:
        info = a.get("defense_info", {}).get(d, {})
        row = {"defense": d, "spoofability": a.get(f"spoofability_{d}"), "asr": info.get("asr"),
               "own_map": not (d in TABLE and TABLE[d].joint),
               "fpr_heldout": info.get("fpr_heldout"), "fpr_heldout_rate": info.get("fpr_heldout_rate"),
               "auc": info.get("auc"), "auc_plain": info.get("auc_plain"),
               "fidelity_l1": info.get("fidelity_l1"), "tau": info.get("tau"), "cost": info.get("cost"),
               "applies": a.get(f"spoofability_{d}") is not None,
               "convergence": info.get("convergence") or {"status": "unchecked", "reason": UNCHECKED}}
        rows.append(row)
    return {"rows": rows, "verdict": verdict(rows, fpr), "fpr": fpr}


def too_many_false_alarms(row: dict, fpr: float) -> bool:
    """A detector whose held-out false-positive rate is significantly above the target (the lower end of its
    exact 95% interval is above ``fpr``)."""
    r = row.get("fpr_heldout_rate")
    return bool(r and r.get("ci95") and r["ci95"][0] > fpr)


def verdict(rows: list[dict], fpr: float) -> dict:
    base = rows[0]["spoofability"]
    measured = [r for r in rows[1:] if r["applies"] and r.get("own_map", True) and not too_many_false_alarms(r, fpr)]
    for r in rows:  # rows of records made before the attack ensemble existed: one attack, unchecked
        r.setdefault("convergence", {"status": "unchecked", "reason": UNCHECKED})
    usable = [r for r in measured if r["convergence"]["status"] == "converged"]
    costly = [r["defense"] for r in rows[1:] if r["applies"] and too_many_false_alarms(r, fpr)]
    weak = [r["defense"] for r in rows[1:] if r["applies"] and not r.get("own_map", True)]
    open_rows = [r for r in measured if r["convergence"]["status"] != "converged"]
    if measured and not usable:
        unchecked = all(r["convergence"]["status"] == "unchecked" for r in open_rows)
        out = {"best": None, "helps": False, "credited": False,
               "text": ("no defense is credited: each row was measured by one attack at one strength (attack "
                        "strength quick), so nothing shows its number would hold against a stronger attacker; run "
                        "--attack-strength standard" if unchecked else
                        "no defense is credited: under its attack ensemble no row converged (NOT CONVERGED: "
                        + ", ".join(r["defense"] for r in open_rows) + "); their numbers are upper bounds on safety")}
        lowest = min(measured, key=lambda r: (r["spoofability"]["mean"], r["spoofability"]["ci95"][1]))
        b = base or {}
        if b.get("mean") is not None:
            out["text"] += (f" (lowest measured: {lowest['defense']}, {b['mean']:.0%} → "
                            f"{lowest['spoofability']['mean']:.0%}, not credited)")
    else:
        out = _verdict(base, usable, fpr)
        out["credited"] = out["best"] is not None
        if open_rows:
            out["text"] += (" (not credited, NOT CONVERGED or unchecked under the attack ensemble: "
                            + ", ".join(r["defense"] for r in open_rows) + ")")
    if costly:
        out["text"] += f" (left out, held-out FPR significantly above {fpr:.0%}: {', '.join(costly)})"
    if weak:
        out["text"] += (f" (not counted: {', '.join(weak)}, whose attack optimises the ensemble's mean map rather than "
                        f"this interpreter's — a weaker attack here; ensemble-norm carries the detector's hinge on "
                        f"this interpreter's own ADV²)")
    return out


def _verdict(base: dict | None, usable: list[dict], fpr: float) -> dict:
    if base is None or base.get("mean") is None:
        return {"best": None, "helps": False, "text": "undefended spoofability not measured: nothing to compare"}
    if not usable:
        return {"best": None, "helps": False,
                "text": f"no defense was measured within the stated cost (held-out FPR not significantly above "
                        f"{fpr:.0%})"}
    best = min(usable, key=lambda r: (r["spoofability"]["mean"], r["spoofability"]["ci95"][1]))
    b, s = base, best["spoofability"]
    change = f"{b['mean']:.0%} → {s['mean']:.0%} ({s['k']}/{s['n']})"
    if s["mean"] >= b["mean"]:
        return {"best": None, "helps": False,
                "text": f"no defense lowers spoofability under its adaptive attack (best {best['defense']}: {change})"}
    if s["ci95"][1] < b["ci95"][0]:
        return {"best": best["defense"], "helps": True,
                "text": f"{best['defense']} lowers spoofability under its adaptive attack, {change}; the 95% "
                        f"intervals do not overlap"}
    return {"best": best["defense"], "helps": False,
            "text": f"{best['defense']} is lowest under its adaptive attack, {change}, but the 95% intervals overlap "
                    f"at n = {s['n']}: not a measured improvement"}
