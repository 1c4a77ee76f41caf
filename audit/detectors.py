"""The detectors of a target's defenses, calibrated on benign data at the FPR (the learned detector trained
on attacked calibration images)."""

from __future__ import annotations

import torch
from underfire.attacks.targets import benign_maps, target_classes
from underfire.audit.config import AuditError, Progress, Target, adaptive_names, ensemble_names, stability_names
from underfire.audit.defenses import DETECTORS, TABLE, parts
from underfire.audit.deployment import Deployment
from underfire.audit.plan import adv2_attack, pgd_attack
from underfire.guard.learned import LearnedDetector

def _make_detector(t: Target, dep: Deployment, d: str):
    """Detector ``d`` of the defense table, reading the target's ensemble and stability members."""
    members = [dep.interpreters[n] for n in ensemble_names(t)]
    return TABLE[d].build(dep.model, members, [dep.interpreters[n] for n in stability_names(t)])


def _train_learned(t: Target, dep: Deployment, det: LearnedDetector, progress: Progress) -> torch.Tensor:
    """Train on the first half of the calibration set: benign, and PGD + each adaptive interpreter's ADV² of its
    first ``learned_n`` images (their own predictions as classes). Returns the other half, for the threshold."""
    half = len(dep.x_cal) // 2
    if half < 2:
        raise AuditError(f"the learned defense needs at least 4 benign calibration inputs; {t.data} has "
                         f"{len(dep.x_cal)}")
    x_fit, x_thr = dep.x_cal[:half], dep.x_cal[half:]
    xa = x_fit[: t.learned_n]
    with torch.no_grad():
        y = dep.model(xa).argmax(1)
    y_t = target_classes(y.cpu(), dep.model.num_classes, torch.Generator().manual_seed(1)).to(y.device)
    progress(f"{t.key()}: learned detector: attacking {len(xa)} calibration inputs (PGD, ADV² "
             f"{', '.join(adaptive_names(t))})")
    attacked = [pgd_attack(t, dep)(next(iter(dep.interpreters.values())), xa, y_t).x_adv]
    for n in adaptive_names(t):
        it = dep.interpreters[n]
        attacked.append(adv2_attack(t, dep, n)(it, xa, y_t, benign_maps(it, xa)).x_adv)
    det.train(x_fit, torch.cat(attacked))
    return x_thr


def build_detectors(t: Target, dep: Deployment, fpr: float, progress: Progress) -> dict:
    dets = {}
    for d in dict.fromkeys(parts(x)[1] for x in t.defenses):  # detectors, alone or combined with a map defense
        if d not in DETECTORS:
            continue
        if dep.x_cal is None or len(dep.x_cal) == 0:
            raise AuditError(f"the {d} defense needs benign calibration data; {t.data} has none to spare")
        det = _make_detector(t, dep, d)
        x_thr = _train_learned(t, dep, det, progress) if d == "learned" else dep.x_cal
        progress(f"{t.key()}: calibrating {d} at FPR {fpr:.0%} on {len(x_thr)} benign inputs")
        det.calibrate(x_thr, fpr, heldout=dep.x_heldout)
        dets[d] = det
    return dets
