"""One batch of the audit: every attack, every metric, per sample (journaled as one record)."""

from __future__ import annotations

import torch
from underfire.attacks.adaptive import adaptive
from underfire.attacks.blackbox import Counted
from underfire.attacks.stadv import StAdv2
from underfire.attacks.targets import benign_maps
from underfire.audit.config import (
    ADAPTIVE_LAM,
    CERT_K,
    CERT_SAMPLES,
    Progress,
    Target,
    adaptive_names,
    adv2_names,
    ensemble_names,
    strong_rows,
)
from underfire.audit.defenses import DETECTORS, TABLE, parts
from underfire.audit.deployment import Deployment
from underfire.audit.metrics import l1
from underfire.audit.plan import (
    adv2_attack,
    blackbox_attack,
    blackbox_names,
    detect,
    make_target_maps,
    noise_l1,
    pgd_attack,
    record,
    step_bar,
    strongest_attack,
    transfer_attack,
)
from underfire.guard.adapters import Transfer
from underfire.guard.ensemble import InterpreterEnsemble
from underfire.guard.registry import label_of
from underfire.guard.smoothing import Smoothed


def attack_batch(t: Target, dep: Deployment, dets: dict, sl: slice, seed: int, keep: int,
                  progress: Progress) -> dict:
    x, y_t = dep.x[sl], dep.y_t[sl]
    keep = max(0, min(keep - sl.start, len(x)))  # samples of this batch shown in the report
    out: dict = {"index": list(range(sl.start, sl.stop)), "interpreters": {}}
    bms = {name: benign_maps(it, x) for name, it in dep.interpreters.items()}
    noise = ({n: dep.noise[n][sl] for n in dep.interpreters} if dep.noise is not None
             else noise_l1(t, dep, sl, seed, bms))
    for name, d in noise.items():
        out["interpreters"][name] = {"noise_l1": d}
    for name, it in dep.interpreters.items():
        if isinstance(it, Smoothed):  # the certificate of its benign top-k map, per input
            progress(f"certifying {name}")
            cert = it.certify(x, dep.y[sl], samples=CERT_SAMPLES, k=CERT_K)
            out["interpreters"][name]["certified"] = cert["certified"].tolist()  # (B, len(RADII))
    adv_x, spent = {}, {}
    if "pgd" in t.attacks:
        progress("PGD")
        first = next(iter(dep.interpreters.values()))
        xp = pgd_attack(t, dep)(first, x, y_t, progress=step_bar(progress)).x_adv
        flags = detect(dets, xp)
        for name, it in dep.interpreters.items():
            out["interpreters"][name]["pgd"] = record(it, xp, y_t, bms[name], dets, keep, flags)
    for name, it in dep.interpreters.items():
        if "adv2" in t.attacks and name in adv2_names(t) and name not in dep.opaque:
            for kind in t.target_maps:
                progress(f"ADV²-{label_of(name)}" + ("" if kind == "benign" else f" → {kind} target maps"))
                map_t = bms[name] if kind == "benign" else make_target_maps(kind, it, dep, x, y_t, seed + sl.start)
                if kind == "benign" and isinstance(it, Transfer):  # its judgements read the real map: queries
                    r, spent[name] = transfer_attack(t, dep, name, it, x, y_t, map_t)
                elif kind == "benign" and strong_rows(t):  # the attack ensemble, worst case per input
                    r = strongest_attack(t, dep, f"ADV²-{label_of(name)}", name, it, x, y_t, map_t, dep.tau[name], dets,
                                None, keep, progress)
                else:
                    r = adv2_attack(t, dep, name)(dep.views.get(name, it), x, y_t, map_t, progress=step_bar(progress))
                rec = r.record if hasattr(r, "record") else record(it, r.x_adv, y_t, map_t, dets, keep)
                if kind == "benign":
                    adv_x[name] = r.x_adv
                    if name in spent:
                        rec["queries"] = spent[name].tolist()
                    out["interpreters"][name]["adv2"] = rec
                else:
                    rec["benign_l1_to_target"] = l1(bms[name], map_t).tolist()
                    out["interpreters"][name][f"adv2-{kind}"] = rec
        if name in blackbox_names(t, dep):
            if isinstance(it, Transfer) and name not in spent:  # the transfer result is the start
                r, spent[name] = transfer_attack(t, dep, name, it, x, y_t, bms[name])
                adv_x[name] = r.x_adv
            progress(f"black-box ADV²-{name} ({t.threat_model}, ≤ {t.queries} queries per image"
                     + (", from the transfer result)" if name in spent else ")"))
            r = blackbox_attack(t, dep, sl.start)(Counted(it), x, y_t, bms[name], start=adv_x.get(name) if name in spent
                                            else None, spent=spent.get(name, 0), progress=step_bar(progress))
            rec = record(it, r.x_adv, y_t, bms[name], dets, keep)
            rec["queries"], rec["trace"] = r.history["queries"], r.history["trace"]
            out["interpreters"][name]["blackbox"] = rec
        if "adaptive" in t.attacks and name in adaptive_names(t):
            for d in t.defenses:
                if d in DETECTORS and not TABLE[d].joint:  # a joint detector's attack covers all members, below
                    progress(f"adaptive ADV²-{label_of(name)} vs {d}")
                    if strong_rows(t):
                        r = strongest_attack(t, dep, f"adaptive ADV²-{label_of(name)} vs {d}", name, it, x, y_t, bms[name],
                                    dep.tau[name], dets, d, keep, progress, ADAPTIVE_LAM)
                        out["interpreters"][name][f"adaptive-{d}"] = r.record
                        continue
                    a = adaptive(adv2_attack(t, dep, name, lam_scale=ADAPTIVE_LAM), dets[d])
                    r = a(dep.views.get(name, it), x, y_t, bms[name], progress=step_bar(progress))
                    out["interpreters"][name][f"adaptive-{d}"] = record(it, r.x_adv, y_t, bms[name], dets, keep)
                elif name in dep.defended.get(parts(d)[0], {}):
                    out["interpreters"][name][f"defense-{d}"] = _map_defense(t, dep, d, name, sl, seed, keep,
                                                                              bms[name], progress, dets)
    if "adaptive" in t.attacks and "ensemble" in t.defenses:
        members = [dep.interpreters[n] for n in ensemble_names(t)]  # the loss covers every member at once
        if len(members) >= 2:
            ens = InterpreterEnsemble(members)
            progress(f"adaptive ADV² vs the ensemble ({ens.name})")
            a = adaptive(adv2_attack(t, dep, ens, lam_scale=ADAPTIVE_LAM), dets["ensemble"])
            xe = a(ens, x, y_t, benign_maps(ens, x), progress=step_bar(progress)).x_adv
            flags = detect(dets, xe)
            for name, it in dep.interpreters.items():
                out["interpreters"][name]["adaptive-ensemble"] = record(it, xe, y_t, bms[name], dets, keep, flags)
    if "stadv2" in t.attacks and "cam" in dep.interpreters:
        progress("stAdv-ADV²-CAM")
        it = dep.interpreters["cam"]
        s = 1 if t.schedule == "paper" else t.shorten
        r = StAdv2(steps=(max(1, 200 // s), max(1, 600 // s)), **dep.attack_kw)(it, x, y_t, bms["cam"])
        out["interpreters"]["cam"]["stadv2"] = record(it, r.x_adv, y_t, bms["cam"], dets, keep)
    out["transfer"] = {a: {b: l1(benign_maps(dep.interpreters[b], xa), bms[b]).tolist() for b in dep.interpreters}
                       for a, xa in adv_x.items()}
    return out


def _map_defense(t: Target, dep: Deployment, d: str, name: str, sl: slice, seed: int, keep: int,
                 plain_bm: torch.Tensor, progress: Progress, dets: dict) -> dict:
    """A map defense of interpreter ``name`` (alone, or with a detector: ``smooth+squeeze``): its own noise
    level, ADV² against the defended map itself (for smoothing an EOT attack: every step's map averages fresh
    noise; with a detector, its hinge added), the fidelity cost L1(defended benign map, plain benign map), and for
    smoothing the certificate."""
    m, det = parts(d)
    it = dep.defended[m][name]
    x, y, y_t = dep.x[sl], dep.y[sl], dep.y_t[sl]
    bm = benign_maps(it, x)
    progress(f"ADV²-{label_of(name)} vs its {d} defense ({it.name}" + (f" + {det} detector)" if det else ")"))
    judged = {det: dets[det]} if det else {}
    if strong_rows(t):
        rec = strongest_attack(t, dep, f"ADV²-{label_of(name)} vs {d}", it.name, it, x, y_t, bm, dep.tau[f"{d}/{name}"],
                      judged, det, keep, progress, ADAPTIVE_LAM if det else 1.0).record
        rec["noise_l1"] = dep.noise[f"{d}/{name}"][sl]
    else:
        atk = adaptive(adv2_attack(t, dep, it, lam_scale=ADAPTIVE_LAM), dets[det]) if det else adv2_attack(t, dep, it)
        r = atk(it, x, y_t, bm)
        rec = record(it, r.x_adv, y_t, bm, judged, keep)
        rec["noise_l1"] = noise_l1(t, dep, sl, seed, {it.name: bm}, {it.name: it})[it.name]
    rec["fidelity_l1"] = l1(bm, plain_bm).tolist()
    if isinstance(it, Smoothed):
        rec["certified"] = it.certify(x, y, samples=CERT_SAMPLES, k=CERT_K)["certified"].tolist()
    return rec


def example_pictures(t: Target, dep: Deployment, k: int) -> dict:
    from underfire.audit.report import png_b64

    x = dep.x[:k]
    ex = {"images": [png_b64(im) for im in x], "classes": dep.y[:k].tolist(), "targets": dep.y_t[:k].tolist(),
          "categories": list(dep.model.categories or map(str, range(dep.model(dep.x[:1]).shape[1]))), "maps": {}}
    for name, it in dep.interpreters.items():
        bm = benign_maps(it, x) if k else []
        ex["maps"][name] = [png_b64(it.upsample(m[None], x.shape[-2:])[0], cmap=True) for m in bm]
    return ex
