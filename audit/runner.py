"""The audit: how far can a deployment (classifier + interpreters + defenses) be spoofed?

    report = run_audit(AuditConfig(targets=[Target("fmnist_resnet")]), run_dir=Path("runs/x"))

For each target (a deployment and its data) the runner
1. builds the model, its interpreters and data, and runs the pre-flight checks of EVERY target before any
   attack: finite (B, K) outputs; logits, not probabilities (unless declared, ``outputs = "probs"``: the log is
   taken); a model better than chance on its own audit data (one-sided binomial test on labelled data;
   on unlabelled data not near-uniform and not one class for everything), unless random weights were asked
   for; a gradient of the logits and of every attacked map w.r.t. the input. A failed check raises
   :class:`AuditRefused` (exit status 4): the audit never reports a deployment it cannot measure as safe;
2. takes the first ``n`` correctly classified inputs, draws target classes c_t = (y + randint(1, K)) mod K,
   calibrates the detectors on disjoint benign data at the configured FPR;
3. per batch: PGD (always: it checks that attacks work here), ADV² per interpreter, optionally stAdv-ADV²
   (CAM), adaptive ADV² against each defense, the transfer of each ADV² to the other interpreters, and the
   map noise behind τ (``noise_draws`` uniform-noise draws per input, the benign class fixed) — every metric
   per sample, journaled per batch with the fingerprints of weights, data and settings, so ``resume`` never
   redoes a batch and never mixes in one of another run;
4. aggregates once (rates with exact Clopper–Pearson intervals; means with a bootstrap) and scores
   spoofability; a target whose plain PGD reaches fewer than ``min_pgd_asr`` of its inputs is INCONCLUSIVE,
   and so is the headline.

Spoofability of an interpreter (the headline; higher = worse for the deployment): the fraction of audited
inputs on which ADV² reaches its target class on the 8-bit image while the interpreter's map stays within
the benign noise level τ — L1(adversarial map, benign map) ≤ τ, with τ the 95th percentile of
L1(map of x, map of x + uniform noise in [−a, a]), both for the benign class, pooled over inputs × draws,
a = ε/2 by default. Under a defense, the adaptive attack must also go undetected. The report carries these
definitions.

Under ``torchrun`` the batches are sharded by rank (batch i on rank i mod world); rank 0 merges the
journals into one report, identical to a single-process run with the same seed.

This module only orchestrates; each job has its module: ``config`` (settings, validation, errors),
``checks`` (pre-flight), ``deployment`` (model, interpreters, data, batch size), ``detectors``,
``plan`` (which attacks each row runs, the attack ensemble), ``batch`` (one batch, per sample),
``aggregate`` (rates, intervals, spoofability, headline) and ``journal`` (resume and fingerprints).
"""


from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
from underfire.attacks.adaptive import adaptive
from underfire.attacks.adv2 import PGD
from underfire.attacks.strength import LEVELS
from underfire.audit.aggregate import aggregate, detector_info, headline, merge_batches, target_status
from underfire.audit.batch import attack_batch, example_pictures
from underfire.audit.config import (
    ADAPTIVE_LAM,
    SPOOF_DEFINITION,
    AuditConfig,
    AuditError,
    Progress,
    Target,
    adaptive_names,
    adv2_names,
    resolve_device,
    strong_rows,
)
from underfire.audit.defenses import detector_cost
from underfire.audit.deployment import Deployment, Supplied, build_deployment, resolve_batch_size
from underfire.audit.detectors import build_detectors
from underfire.audit.journal import Journal, fingerprint, key_paths
from underfire.audit.plan import adv2_attack, measure_noise, pgd_attack
from underfire.audit.report import SCHEMA_VERSION
from underfire.guard.smoothing import linf_as_l2
from underfire.training.loop import distributed_setup

log = logging.getLogger(__name__)


def environment(device: torch.device) -> dict:
    import platform
    import subprocess

    try:
        from importlib.metadata import version
        pkg = version("underfire")
    except Exception:  # noqa: BLE001 — not installed as a distribution (running from a checkout)
        pkg = "unknown"
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except Exception:  # noqa: BLE001
        rev = None
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})"
    return {"underfire": pkg, "torch": str(torch.__version__), "python": platform.python_version(), "device": dev,
            "threads": torch.get_num_threads(), "git": rev, "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def _run_batches(cfg: AuditConfig, t: Target, dep: Deployment, dets: dict, journal: Journal, mine: list[int],
                 index: list[list[int]], n_batches: int, resume: bool, progress: Progress) -> None:
    """This rank's batches of one target, each journaled when done (skipped when already there on resume)."""
    key, t0, done_here = t.key(), time.time(), 0
    for j, i in enumerate(mine):
        if resume and journal.load(i, index[i]) is not None:
            progress(f"{key}: batch {i + 1}/{n_batches} already in the journal, skipped")
            continue
        sl = slice(index[i][0], index[i][-1] + 1)

        def step(msg, i=i, j=j):
            el = time.time() - t0
            eta = f", eta {el / done_here * (len(mine) - j):.0f}s" if done_here else ""
            progress(f"{key}: batch {i + 1}/{n_batches}: {msg} [{el:.0f}s{eta}]")
        step.steps = getattr(progress, "steps", None)  # the attacks' step bars (on a terminal)
        # the global RNG (the smoothing noise of smooth:<name>) seeded per batch: the same records in one
        # process, under torchrun and after --resume; forked, so nothing outside the batch sees it
        with torch.random.fork_rng(devices=[dep.x.device] if dep.x.device.type == "cuda" else []):
            torch.manual_seed(cfg.seed + sl.start)
            rec = attack_batch(t, dep, dets, sl, cfg.seed, cfg.examples, step)
        journal.save(i, rec)
        done_here += 1
        if hasattr(progress, "advance"):
            progress.advance()


def run_audit(cfg: AuditConfig, run_dir: Path, resume: bool = False, progress: Progress | None = None,
              supplied: dict[str, Supplied] | None = None) -> dict | None:
    """Run the audit; returns the report dict on rank 0 (None on other ranks). Writes nothing but journals.

    ``supplied``: per target key, the objects its ``python:`` names stand for (:func:`underfire.audit.audit`).
    The caller (``run_in_folder``) writes report.json/html from the returned dict, atomically. ``cfg`` is not
    changed: the run works on a resolved copy (defaults filled in, exclusions applied), which the report's
    ``config`` records.
    """
    cfg = copy.deepcopy(cfg)
    cfg.validate()
    progress = progress or (lambda msg: log.info(msg))
    rank, world = distributed_setup()
    device = resolve_device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    t_start = time.time()
    report = {"schema_version": SCHEMA_VERSION, "name": cfg.name, "config": cfg.to_dict(),
              "environment": {**environment(device), "world_size": world}, "definitions": {
                  "spoofability": SPOOF_DEFINITION,
                  "success": "argmax f(x_adv) = c_t on the 8-bit-quantised x_adv (basic GRAD-ADV² also p(c_t) ≥ 0.8 "
                             "during selection; adaptive attacks argmax only); L1/IoU/MC/detection rates are over "
                             "successful inputs",
                  "detection": "a detector score flags an input when it exceeds its threshold, calibrated at the "
                               "FPR on benign data disjoint from the audited inputs"},
              "targets": {}}
    deps = {}
    for t in cfg.targets:  # every pre-flight check (AuditRefused) before any attack starts
        progress(f"{t.key()}: loading model, interpreters and data")
        deps[t.key()] = build_deployment(t, cfg.seed, device, cfg.precision, cfg.channels_last, cfg.compile,
                                         (supplied or {}).get(t.key()))
    report["config"] = cfg.to_dict()  # as resolved by validation and the pre-flight exclusions
    for t in cfg.targets:
        key = t.key()
        dep = deps.pop(key)
        for w in dep.warnings:
            progress(f"{key}: {w}")
        journal = Journal(run_dir, key, fingerprint(cfg, t, dep))
        n = len(dep.x)
        bs = resolve_batch_size(cfg, t, dep, journal, resume, rank, world)
        if cfg.batch_size == "auto":
            progress(f"{key}: batch size {bs} (auto, {dep.x.device.type})")
        n_batches = math.ceil(n / bs)
        index = [list(range(i * bs, min(n, (i + 1) * bs))) for i in range(n_batches)]
        if resume:  # refuse another run's batches before any work
            for i in range(n_batches):
                journal.load(i, index[i])
        dets = build_detectors(t, dep, cfg.fpr, progress)
        if strong_rows(t):
            progress(f"{key}: measuring the map noise of all {n} inputs (τ, needed by the {t.attack_strength} "
                     f"attack ensemble)")
            measure_noise(t, dep, index, cfg.seed)
        mine = [i for i in range(n_batches) if i % world == rank]
        bar = progress.target(key, len(mine)) if hasattr(progress, "target") else contextlib.nullcontext()
        with bar:
            _run_batches(cfg, t, dep, dets, journal, mine, index, n_batches, resume, progress)
        if world > 1:
            torch.distributed.barrier()
        if rank != 0:
            continue
        batches = [journal.load(i, index[i]) for i in range(n_batches)]
        if any(b is None for b in batches):
            raise AuditError(f"journal of {key} is missing batches after the run; run again with --resume")
        shape = key_paths(batches[0])
        for i, b in enumerate(batches[1:], 1):
            if key_paths(b) != shape:
                odd = sorted(key_paths(b) ^ shape)[0]
                raise AuditError(f"journal batch {journal.path(i)} does not fit batch 0 (key {odd} is in one only): "
                                 f"the journal was edited or written by another version; start the run again "
                                 f"with --overwrite")
        records = merge_batches(batches)
        decisions = {d: det.decision for d, det in dets.items()}
        det_info = {d: detector_info(det.calibration, det.decision, detector_cost(det)) for d, det in dets.items()}
        try:
            summary = aggregate(records, decisions, cfg.bootstrap, cfg.seed, det_info, t.defenses, cfg.fpr,
                                asdict(t))
        except (IndexError, KeyError, TypeError) as exc:  # per-sample lists that do not line up
            raise AuditError(f"the journal of {key} cannot be aggregated ({type(exc).__name__}: {exc}): a batch was "
                             f"edited or written by another version; start the run again with --overwrite") from exc
        for name in t.interpreters:  # listed, but no attack measured its spoofability: it passes no gate
            a = summary["interpreters"].setdefault(name, {"tau": float("nan")})
            if "spoofability" not in a:
                a["not_attacked"] = (
                    "not among adv2_interpreters: no attack on its map ran" if name not in adv2_names(t) else
                    "no ADV² on its map ran (add 'adv2' to the attacks)" if "adv2" not in t.attacks else
                    "no attack on its map could be measured")
        for name, a in summary["interpreters"].items():  # no white-box attack read this map's gradient
            how = ("query ADV² only (the map has no gradient)" if name in dep.opaque else
                   f"transfer from the {'surrogate' if name.startswith('opaque:') else 'native twin'} "
                   f"{dep.transfer[name]}" if name in dep.transfer else None)
            how = how or dep.unfaithful.get(name)
            if how and "spoofability" in a:
                a["lower_bound"] = how + (" and query ADV²" if "blackbox" in a and name in dep.transfer else "")
        if journal.redone:
            dep.warnings.append(f"journal batches {', '.join(str(i + 1) for i in journal.redone)} no longer matched "
                                f"their digests (edited or damaged since they were written) and were redone")
        report["targets"][key] = {
            "target": asdict(t), "model": dep.model.name, "eps_255": round(dep.eps * 255, 3), "n": n,
            "batch_size": bs, "linf_as_l2": linf_as_l2(dep.eps, dep.x.shape[1:]), "fingerprint": {k: v for k, v in journal.fingerprint.items() if k != "config"},
            "warnings": dep.warnings, "status": target_status(summary, cfg.min_pgd_asr),
            "attacks": {"pgd": pgd_attack(t, dep).describe(),
                        **{f"adv2-{nm}": adv2_attack(t, dep, nm).describe()
                           for nm in adv2_names(t)},
                        "adaptive": {"interpreters": adaptive_names(t), "lam_scale": ADAPTIVE_LAM,
                                     **adaptive(PGD(dep.eps, 1), next(iter(dets.values()))).adaptive_to[0]}
                        if dets and "adaptive" in t.attacks else None,
                        # the attack ensemble every row ran (attacks/strength.py); costs × the preset attack
                        "strength": {"level": t.attack_strength,
                                     "members": [m.describe(True) for m in LEVELS[t.attack_strength]]}},
            "map_defenses": {d: {n: it.name for n, it in m.items()} for d, m in dep.defended.items()},
            "transfer": dep.transfer,
            "detectors": {d: {"kind": det.kind, "decision": det.decision, "thresholds": det.thresholds,
                              "fitted": det.fitted, "cost": detector_cost(det),
                              "config": det.config(), "calibration": det.calibration} for d, det in dets.items()},
            "records": records,
            "summary": summary,
            "examples": example_pictures(t, dep, min(cfg.examples, n)),
        }
    if rank != 0:
        return None
    report["headline"] = headline(report["targets"])
    report["seconds"] = round(time.time() - t_start, 1)
    return report
