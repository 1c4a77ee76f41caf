"""From per-sample records to the report: rates with exact intervals, bootstrap means, spoofability per
interpreter and defense, each target's status and the headline."""

from __future__ import annotations

import math

import torch
from underfire.audit.config import CERT_K, CERT_SAMPLES, SPOOF_DEFINITION, AuditError
from underfire.audit.defenses import combined_cost, compare, convergence, map_cost, parts
from underfire.audit.metrics import K_GRID, rate
from underfire.audit.report import SCHEMA_VERSION
from underfire.guard.calibration import roc_auc
from underfire.guard.smoothing import RADII


def merge_batches(batches: list[dict]) -> dict:
    """Concatenate per-sample lists of batch records (in batch order) into one record of the same shape."""
    def cat(items):
        if isinstance(items[0], dict):
            return {k: cat([it[k] for it in items]) for k in items[0]}
        return [v for it in items for v in it]
    return cat(batches)


def _ci(values: list[float], n_boot: int, seed: int) -> dict:
    t = torch.tensor(values, dtype=torch.float64)
    if t.numel() == 0:
        return {"mean": None, "std": None, "ci95": None, "n": 0}
    if t.numel() == 1 or n_boot <= 0:
        return {"mean": float(t.mean()), "std": 0.0, "ci95": [float(t.mean())] * 2, "n": int(t.numel())}
    idx = torch.randint(0, t.numel(), (n_boot, t.numel()), generator=torch.Generator().manual_seed(seed))
    means = t[idx].mean(1)
    return {"mean": float(t.mean()), "std": float(t.std()), "n": int(t.numel()),
            "ci95": [float(means.quantile(0.025)), float(means.quantile(0.975))]}


def noise_level(per_input: list[list[float]], n_boot: int, seed: int) -> dict:
    """τ = the 95th percentile of the map-noise L1 pooled over inputs × draws, and its stability: the
    percentile-bootstrap 95% interval of that quantile when the inputs (with all their draws) are resampled."""
    d = torch.tensor(per_input, dtype=torch.float64)  # (N, draws)
    if d.numel() == 0:
        return {"tau": math.nan, "estimate": "none: no noise measurements"}
    tau = float(d.flatten().quantile(0.95))
    out = {"tau": tau, "estimate": "pooled over inputs x draws", "inputs": int(d.shape[0]), "draws": int(d.shape[1]),
           "ci95": [tau, tau]}
    if d.shape[0] > 1 and n_boot > 0:
        idx = torch.randint(0, d.shape[0], (n_boot, d.shape[0]), generator=torch.Generator().manual_seed(seed))
        qs = d[idx].flatten(1).quantile(0.95, dim=1)
        out["ci95"] = [float(qs.quantile(0.025)), float(qs.quantile(0.975))]
    return out


def aggregate(records: dict, decisions: dict, n_boot: int, seed: int, detectors: dict | None = None,
              defenses: list[str] | None = None, fpr: float = 0.05, target: dict | None = None) -> dict:
    """Per interpreter and attack: ASR, MC, L1/IoU over successes, detection rates; spoofability, undefended
    and under each defense's adaptive attack, and the defense comparison (:func:`audit.defenses.compare`).

    Rates (ASR, detection, spoofability) carry exact Clopper–Pearson intervals (:func:`audit.metrics.rate`);
    means of continuous scores (MC, L1, IoU) a percentile bootstrap. ``detectors``: per detector defense its
    decision's held-out FPR, held-out benign decision scores (ROC AUC's benign side) and cost."""
    detectors = detectors or {}
    agg = {}
    for name, per in records["interpreters"].items():
        noise = noise_level(per["noise_l1"], n_boot, seed)
        tau = noise["tau"]
        a_int = {"noise_l1": _ci([v for row in per["noise_l1"] for v in row], n_boot, seed), "tau": tau,
                 "tau_estimate": noise}
        if "certified" in per:
            c = torch.tensor(per["certified"], dtype=torch.float64)  # (N, len(RADII))
            a_int["certified"] = {"radii": list(RADII), "mean": c.mean(0).tolist(), "k": CERT_K,
                                  "samples": CERT_SAMPLES, "alpha": 0.05}
        spoofed = spoofed_inputs(per, tau)
        for atk, rec in per.items():
            if atk in ("noise_l1", "certified"):
                continue
            ok = rec["success"]
            succ = [i for i, s in enumerate(ok) if s]
            row = {"asr": rate(len(succ), len(ok)),
                   "mc": _ci([rec["confidence"][i] for i in succ], n_boot, seed),
                   "l1": _ci([rec["l1"][i] for i in succ], n_boot, seed),
                   "iou": _ci([sum(rec["iou_curve"][i]) / len(K_GRID) for i in succ], n_boot, seed),
                   "iou_curve": [sum(rec["iou_curve"][i][k] for i in succ) / max(len(succ), 1)
                                 for k in range(len(K_GRID))],
                   "detection": {d: {k: rate(sum(v[i] for i in succ), len(succ)) for k, v in flags.items()}
                                 for d, flags in rec["detected"].items()}}
            if "benign_l1_to_target" in rec:  # other target maps: how far the benign map is from the target
                row["benign_l1_to_target"] = _ci(rec["benign_l1_to_target"], n_boot, seed)
            close = [bool(s) and d <= tau for s, d in zip(ok, rec["l1"])]
            if "queries" in rec:  # transfer and black-box ADV²: what the attacker spent reading the real map
                row["queries"] = query_stats(rec, close, tau)
            if "ensemble" in rec:  # the attack ensemble of this row: its convergence check
                row["convergence"] = convergence(rec["ensemble"], len(ok))
                if atk == "adv2":
                    a_int["convergence"] = row["convergence"]
            if atk == "pgd":  # (ADV² and query ADV² need no branch: spoofed_inputs counts them)
                a_int["pgd_within_tau"] = rate(sum(close), len(ok))
            elif atk.startswith("adaptive-"):
                d = atk.split("-", 1)[1]
                undetected = [not f for f in rec["detected"][d][decisions[d]]]
                a_int[f"spoofability_{d}"] = rate(sum(c and u for c, u in zip(close, undetected)), len(ok))
                info = detectors.get(d, {})
                benign = info.get("heldout_scores", [])
                plain = per.get("adv2", {})
                a_int.setdefault("defense_info", {})[d] = {
                    "asr": row["asr"], "cost": info.get("cost"), **_detector_stats(info, rec, d, succ),
                    "convergence": row.get("convergence"),
                    "auc_plain": roc_auc(benign, [plain["detector_scores"][d][i] for i, s in enumerate(plain["success"])
                                                  if s]) if plain else None}
            elif atk.startswith("defense-"):  # a map defense: its own τ, the ADV² against the defended map
                d = atk.split("-", 1)[1]
                m, det = parts(d)
                noise_d = noise_level(rec["noise_l1"], n_boot, seed)
                close = [bool(s) and v <= noise_d["tau"] for s, v in zip(ok, rec["l1"])]
                if det:  # deployed with a detector: a spoof must also go undetected
                    close = [c and not f for c, f in zip(close, rec["detected"][det][decisions[det]])]
                a_int[f"spoofability_{d}"] = rate(sum(close), len(ok))
                a_int.setdefault("defense_info", {})[d] = {
                    "asr": row["asr"], "tau": noise_d["tau"], "tau_estimate": noise_d, "convergence": row.get("convergence"),
                    "fidelity_l1": _ci(rec["fidelity_l1"], n_boot, seed), "cost": map_cost(m, target or {})}
                if det:
                    info = detectors.get(det, {})
                    a_int["defense_info"][d].update(
                        cost=combined_cost(map_cost(m, target or {}), info.get("cost")),
                        **_detector_stats(info, rec, det, succ))
                if "certified" in rec:
                    c = torch.tensor(rec["certified"], dtype=torch.float64)
                    a_int["defense_info"][d]["certified"] = {"radii": list(RADII), "mean": c.mean(0).tolist(),
                                                            "k": CERT_K, "samples": CERT_SAMPLES, "alpha": 0.05}
            a_int[atk] = row
        if spoofed:  # an input is spoofed when any attack on the undefended map (ADV², by queries, vs a detector) did
            a_int["spoofability"] = rate(sum(map(any, zip(*spoofed.values()))), len(next(iter(spoofed.values()))))
            if len(spoofed) > 1:
                a_int["spoofability_by"] = {atk: rate(sum(c), len(c)) for atk, c in spoofed.items()}
        for atk in UNDEFENDED:
            if "pgd" in a_int and atk in a_int and a_int["pgd"]["l1"]["mean"] and a_int[atk]["l1"]["mean"] is not None:
                a_int["l1_ratio" if atk == "adv2" else f"l1_ratio_{atk}"] = a_int[atk]["l1"]["mean"] / a_int["pgd"]["l1"]["mean"]
        if defenses and "spoofability" in a_int:
            a_int["comparison"] = compare(a_int, list(defenses), fpr)
        agg[name] = a_int
    transfer = {a: {b: sum(v) / len(v) for b, v in row.items()} for a, row in records.get("transfer", {}).items()}
    return {"interpreters": agg, "transfer": transfer}


UNDEFENDED = ("adv2", "blackbox")  # the plain attacks on the undefended map (adaptive-* ones count too)


def spoofed_inputs(per: dict, tau: float) -> dict[str, list[bool]]:
    """Per attack on the undefended map — ADV², ADV² by queries, and every adaptive ADV² against a detector (a
    detector leaves the map as it is) — which audited inputs it spoofed: c_t reached, map within ``tau``.
    An input is spoofed when any of them did (detection does not matter here: it is the undefended system)."""
    return {atk: [bool(s) and d <= tau for s, d in zip(rec["success"], rec["l1"])]
            for atk, rec in per.items() if atk in UNDEFENDED or atk.startswith("adaptive-")}


def _detector_stats(info: dict, rec: dict, d: str, succ: list[int]) -> dict:
    """A detector's held-out false-positive rate (with its exact interval) and the ROC AUC of held-out benign
    scores against the scores of an attack's successful inputs ``succ`` in record ``rec``."""
    f, n_held = info.get("fpr_heldout"), info.get("n_heldout", 0)
    return {"fpr_heldout": f,
            "fpr_heldout_rate": rate(round(f * n_held), n_held) if f is not None and n_held else None,
            "auc": roc_auc(info.get("heldout_scores", []), [rec["detector_scores"][d][i] for i in succ])}


def query_stats(rec: dict, spoofed: list[bool], tau: float) -> dict:
    """Queries spent per image, and per spoofed input the queries until the attack first held a spoof (the
    first trace point whose best L1 is within τ; a transfer result: all its queries): median and 90th pct."""
    import numpy as np

    per_success = []
    for i, s in enumerate(spoofed):
        if s:
            trace = rec.get("trace", [[]] * len(spoofed))[i]
            per_success.append(next((q for q, d in trace if d is not None and d <= tau), rec["queries"][i]))
    return {"spent_median": float(np.median(rec["queries"])), "spent_max": int(max(rec["queries"])),
            "per_success": {"n": len(per_success),
                            "median": float(np.median(per_success)) if per_success else None,
                            "p90": float(np.percentile(per_success, 90)) if per_success else None}}


def target_status(summary: dict, min_pgd_asr: float) -> dict:
    """Conclusive unless plain PGD failed (fewer than ``min_pgd_asr`` of the inputs reach c_t: the attacks did
    not work on this deployment) or a noise level τ could not be measured."""
    reasons = []
    ints = summary["interpreters"]
    pgd = next((a["pgd"]["asr"] for a in ints.values() if "pgd" in a), None)
    if pgd is None or pgd["mean"] is None:
        reasons.append("plain PGD did not run, so nothing shows that attacks work on this deployment")
    elif pgd["mean"] < min_pgd_asr:
        reasons.append(f"plain PGD reached the target class on only {pgd['k']}/{pgd['n']} inputs (below min_pgd_asr "
                       f"{min_pgd_asr:.0%}): the attacks did not work here (masked gradients, an ε too small for "
                       f"this model, a robust model?) and a low spoofability would mean nothing; raise --eps or "
                       f"check the deployment")
    for name, a in ints.items():
        if math.isnan(a["tau"]):
            reasons.append(f"no noise level τ was measured for {name}")
    return {"conclusive": not reasons, "reasons": reasons, "min_pgd_asr": min_pgd_asr}


def headline(targets: dict) -> dict:
    """The worst undefended spoofability over targets and interpreters, with its exact interval, and whether
    the run can be trusted as a gate: ``status`` is "inconclusive" when any target is, or when no ADV² ran.
    ``lower_bound`` lists the interpreters measured only by transfer or query attacks: their spoofability can
    prove a deployment spoofable, never safe (the CLI's gate passes no run with one below --fail-above)."""
    cands = [(a["spoofability"], f"{key} / {name}") for key, tg in targets.items()
             for name, a in tg["summary"]["interpreters"].items() if "spoofability" in a]
    reasons = [f"{key}: {r}" for key, tg in targets.items() for r in tg["status"]["reasons"]]
    if not cands:
        reasons.append("no ADV² attack ran: spoofability was not measured")
        return {"spoofability": None, "ci95": None, "where": None, "status": "inconclusive", "inconclusive": reasons}
    worst, where = max(cands, key=lambda c: c[0]["mean"])
    lower = [f"{key} / {name}: {a['lower_bound']}" for key, tg in targets.items()
             for name, a in tg["summary"]["interpreters"].items() if a.get("lower_bound")]
    # listed interpreters no attack measured: not even a lower bound; a gate cannot pass over them
    unmeasured = [f"{key} / {name}: {a['not_attacked']}" for key, tg in targets.items()
                  for name, a in tg["summary"]["interpreters"].items() if a.get("not_attacked")]
    # an undefended row whose attack ensemble still gained at its costliest members: a lower bound as well
    lower += [f"{key} / {name}: NOT CONVERGED under the attack ensemble ({a['convergence']['reason']})"
              for key, tg in targets.items() for name, a in tg["summary"]["interpreters"].items()
              if "spoofability" in a and (a.get("convergence") or {}).get("status") == "not converged"]
    return {"spoofability": worst["mean"], "ci95": worst["ci95"], "k": worst["k"], "n": worst["n"], "where": where,
            "interval": worst["interval"], "status": "inconclusive" if reasons else "measured",
            "inconclusive": reasons, "lower_bound": lower, "not_attacked": unmeasured,
            # random weights, asked for: a look at a network, no deployment's figure; it passes no gate
            "untrained": ", ".join(key for key, tg in targets.items()
                                   if (tg.get("target") or {}).get("weights") == "random") or None}


def detector_info(calibration: dict, decision: str, cost: dict) -> dict:
    """What :func:`aggregate` needs of a detector: its decision's held-out FPR, held-out scores and cost."""
    return {"fpr_heldout": calibration.get("fpr_heldout", {}).get(decision),
            "n_heldout": calibration.get("n_heldout", 0),
            "heldout_scores": calibration.get("heldout_scores", []), "cost": cost}


def reaggregate(report: dict) -> dict:
    """A saved report with its summaries, statuses and headline recomputed from its per-sample records by this
    version's :func:`aggregate` (e.g. after a definition changed); the attacks are not re-run. Lower-bound notes
    (transfer / query-only interpreters) carry over."""
    if report.get("schema_version") != SCHEMA_VERSION:
        raise AuditError(f"report of schema version {report.get('schema_version')}: its records cannot be "
                         f"re-aggregated by this version (schema {SCHEMA_VERSION}); re-run the audit")
    cfg = report["config"]
    for tg in report["targets"].values():
        t, dets = tg["target"], tg["detectors"]
        summary = aggregate(tg["records"], {d: v["decision"] for d, v in dets.items()}, cfg["bootstrap"],
                            cfg["seed"], {d: detector_info(v["calibration"], v["decision"], v.get("cost"))
                                          for d, v in dets.items()},
                            t.get("defenses") or [], cfg["fpr"], t)
        for name, a in summary["interpreters"].items():
            if lb := tg["summary"]["interpreters"].get(name, {}).get("lower_bound"):
                a["lower_bound"] = lb
        tg["summary"], tg["status"] = summary, target_status(summary, cfg["min_pgd_asr"])
    report["headline"] = headline(report["targets"])
    report.setdefault("definitions", {})["spoofability"] = SPOOF_DEFINITION
    return report
