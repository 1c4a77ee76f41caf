"""Which attacks a target's rows run and how they are built: PGD, ADV² per interpreter, transfer and query
ADV², and above quick strength the attack ensemble (attacks/strength.py) with the map noise it needs."""

from __future__ import annotations

import types

import torch
from underfire.attacks.adaptive import adaptive
from underfire.attacks.adv2 import PGD, make_adv2
from underfire.attacks.blackbox import Counted, QueryAdv2, transfer_start
from underfire.attacks.strength import Member, members, run_ensemble
from underfire.attacks.targets import benign_maps, other_class_maps, random_shapes
from underfire.audit.aggregate import noise_level
from underfire.audit.config import AuditError, Progress, Target, adaptive_names, adv2_names, strong_rows
from underfire.audit.defenses import parts
from underfire.audit.deployment import Deployment
from underfire.audit.metrics import confidence, iou_curve, l1
from underfire.guard.adapters import Transfer
from underfire.guard.registry import traits_of


def detect(dets: dict, x_adv: torch.Tensor) -> dict:
    """Every detector's per-score flags, and its decision score, for a batch of adversarial images (they do not
    depend on the reader): {"flags": {d: {score: [bool]}}, "scores": {d: [float]}}."""
    from underfire.guard.interpreters.base import check_input

    out = {"flags": {}, "scores": {}}
    if dets:
        check_input(x_adv, next(iter(dets.values())).model)  # every detector watches the deployment's model
    for d, det in dets.items():
        with torch.no_grad():
            s = det.scores(x_adv)
        out["flags"][d] = {k: v.tolist() for k, v in det.flag_scores(s).items()}
        out["scores"][d] = s[det.decision].tolist()
    return out


def record(it, x_adv: torch.Tensor, y_t: torch.Tensor, bm: torch.Tensor, dets: dict, keep: int,
            detected: dict | None = None) -> dict:
    """Per-sample metrics of one attack read by one interpreter; pictures of the first ``keep`` samples.

    ``detected``: the flags from :func:`detect` when the same images are read by several interpreters."""

    with torch.no_grad():
        e = it(x_adv)
    rec = {"success": (e.logits.argmax(1) == y_t).tolist(), "confidence": confidence(e.logits).tolist(),
           "l1": l1(e.saliency, bm).tolist(), "iou_curve": iou_curve(e.saliency, bm).tolist(),
           "predicted": e.logits.argmax(1).tolist()}
    det = detected if detected is not None else detect(dets, x_adv)
    rec["detected"], rec["detector_scores"] = det["flags"], det["scores"]
    rec.update(pictures(it, x_adv[:keep], e.saliency[:keep]))
    return rec


def measure_noise(t: Target, dep: Deployment, index: list[list[int]], seed: int) -> None:
    """Above quick strength: every input's map-noise draws (per batch slice, as the batches would draw them)
    for each interpreter and each map defense, and τ from all of them, before any attack — the ensemble needs
    τ while it runs to know which inputs are spoofed. The batch records carry these same draws, so the
    aggregate's τ is this one."""
    if not strong_rows(t):
        return
    noise: dict = {}
    map_rows = [(d, n, it) for d in t.defenses if parts(d)[0] and "adaptive" in t.attacks
                for n, it in dep.defended.get(parts(d)[0], {}).items() if n in adaptive_names(t)]
    for ix in index:
        sl = slice(ix[0], ix[-1] + 1)
        with torch.random.fork_rng(devices=[dep.x.device] if dep.x.device.type == "cuda" else []):
            torch.manual_seed(seed + sl.start + 104729)
            x = dep.x[sl]
            bms = {n: benign_maps(it, x) for n, it in dep.interpreters.items()}
            for n, v in noise_l1(t, dep, sl, seed, bms).items():
                noise.setdefault(n, []).extend(v)
            for d, n, it in map_rows:
                v = noise_l1(t, dep, sl, seed, {it.name: benign_maps(it, x)}, {it.name: it})[it.name]
                noise.setdefault(f"{d}/{n}", []).extend(v)
    dep.noise = noise
    dep.tau = {k: noise_level(v, 0, 0)["tau"] for k, v in noise.items()}


def _eot_view(t: Target, it, factor: int):
    """The attacker's view of a random map from ``factor`` × its copies (Transfer: judged by the real map), or
    None where the map is not random or the factor is 1."""
    base = t.attack_samples or getattr(it, "samples", None)
    if factor <= 1 or not isinstance(base, int) or not hasattr(it, "sampled"):
        return None
    view = it.sampled(base * factor)
    return None if view is None else Transfer(view, it)


def _member_attack(t: Target, dep: Deployment, it, m: Member, det, lam_scale: float):
    """The row's attack with member ``m``'s settings: ADV² overrides, longer schedule, random restart, and the
    detector's hinge (its weight / margin / first stage as ``m`` says)."""
    kw = dict(m.adv2)
    base = lam_scale if lam_scale != 1.0 else (t.adv2_options or {}).get("lam_scale", 1.0)
    ls = base * kw.pop("lam_scale", 1.0)
    atk = adv2_attack(t, dep, it, lam_scale=ls, **kw)
    if m.schedule > 1:
        atk = adv2_attack(t, dep, it, lam_scale=ls, steps=tuple(s.steps * m.schedule for s in atk.stages), **kw)
    if m.restart:
        atk.threat.random_start, atk.seed = True, m.restart
    if det is not None:
        atk = adaptive(atk, det, **m.hinge)
    return atk


def strongest_attack(t: Target, dep: Deployment, label: str, name: str, it, x: torch.Tensor, y_t: torch.Tensor,
            bm: torch.Tensor, tau: float, judged: dict, det: str | None, keep: int, progress: Progress,
            lam_scale: float = 1.0) -> types.SimpleNamespace:
    """One row at the target's attack strength: the members cheapest first, each on the inputs no earlier one
    spoofed (c_t on the 8-bit image, the map within ``tau``, and undetected by ``det`` where the row has one).
    Returns x_adv (per input the spoofing member's image, else the best one) and the merged record with its
    "ensemble" part (which member each input's record came from, which first spoofed it)."""
    view0 = dep.views.get(name, it)
    random_map = _eot_view(t, it, 2) is not None
    tunable = traits_of(it).preset != "mask"
    ms = [m for m in members(t.attack_strength, det is not None, random_map) if tunable or not m.adv2]

    def attack_with(m: Member, idx: torch.Tensor) -> torch.Tensor:
        progress(f"{label} [{m.name}: {len(idx)} inputs left]")
        view = (_eot_view(t, it, m.eot) or view0) if m.eot > 1 else view0
        atk = _member_attack(t, dep, it, m, judged[det] if det else None, lam_scale)
        return atk(view, x[idx], y_t[idx], bm[idx], progress=step_bar(progress)).x_adv

    def judge(xa: torch.Tensor, idx: torch.Tensor):
        rec = record(it, xa, y_t[idx], bm[idx], judged, 0)
        rec.pop("images"), rec.pop("maps")
        ok, dist = rec["success"], rec["l1"]
        flag = rec["detected"][det][judged[det].decision] if det else [False] * len(ok)
        spoofed = [bool(s) and v <= tau and not f for s, v, f in zip(ok, dist, flag)]
        keys = [(sp, bool(s) and not f, bool(s), -v) for sp, s, f, v in zip(spoofed, ok, flag, dist)]
        return rec, spoofed, keys

    out = run_ensemble(ms, attack_with, judge, len(x))
    rec = out["record"]
    rec.update(pictures(it, out["x_adv"][:keep]))
    rec["ensemble"] = {"member": out["member"], "spoofed_by": out["spoofed_by"],
                       # per batch (merged batches concatenate them): the members, their cost, time and inputs
                       "count": [len(ms)], "names": [m.name for m in ms], "costs": [m.cost(random_map) for m in ms],
                       "seconds": out["seconds"], "ran": out["ran"]}
    return types.SimpleNamespace(x_adv=out["x_adv"], record=rec)


def pictures(it, x_adv: torch.Tensor, maps: torch.Tensor | None = None) -> dict:
    """PNGs of adversarial images and their maps (``it``'s, unless given), for the report."""
    from underfire.audit.report import png_b64

    if maps is None and len(x_adv):
        with torch.no_grad():
            maps = it(x_adv).saliency
    return {"images": [png_b64(im) for im in x_adv],
            "maps": [png_b64(it.upsample(m[None], x_adv.shape[-2:])[0], cmap=True) for m in maps] if len(x_adv) else []}


def noise_l1(t: Target, dep: Deployment, sl: slice, seed: int, bms: dict,
              interpreters: dict | None = None) -> dict[str, list[list[float]]]:
    """Per interpreter and input, ``noise_draws`` values of L1(g(x + u | y), g(x | y)): map noise only, the
    benign class y fixed (a draw that flips the prediction does not swap in another class's map)."""
    x, y = dep.x[sl], dep.y[sl]
    interpreters = dep.interpreters if interpreters is None else interpreters
    gen = torch.Generator().manual_seed(seed + sl.start)
    amplitude = dep.eps / 2 if t.noise is None else t.noise / 255
    per = {name: [] for name in interpreters}
    for _ in range(t.noise_draws):
        u = (torch.rand(x.shape, generator=gen, dtype=x.dtype).to(x.device) * 2 - 1) * amplitude
        x_noise = torch.round((x + u).clamp(0, 1) * 255) / 255
        for name, it in interpreters.items():
            per[name].append(l1(benign_maps(it, x_noise, y), bms[name]))  # (B,)
    return {name: torch.stack(d, 1).tolist() for name, d in per.items()}  # (B, draws)


def make_target_maps(kind: str, it, dep: Deployment, x: torch.Tensor, y_t: torch.Tensor, seed: int) -> torch.Tensor:
    """Random shapes, or the benign map of another (not audited) image of class c_t (Tables 6 and 8)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "shapes":
        return random_shapes(len(x), it.native_size(tuple(x.shape[-2:])), gen).to(x)
    if dep.pool is None:
        raise AuditError("'other' target maps need labelled images beyond the audited ones")
    return other_class_maps(it, y_t, dep.pool[0], dep.pool[1], gen).to(x)


def pgd_attack(t: Target, dep: Deployment) -> PGD:
    return PGD(dep.eps, steps=1000 // (t.shorten if t.schedule == "short" else 1), **dep.attack_kw)


def adv2_attack(t: Target, dep: Deployment, interpreter, **kw):
    """The ADV² of the paper for ``interpreter`` (a name of this deployment, a registry name or an Interpreter:
    its traits name the preset; an adapter's Transfer view takes its twin's) with this target's schedule, the
    run's precision and compile setting."""
    if isinstance(interpreter, str):
        interpreter = dep.interpreters.get(interpreter, interpreter)
    return make_adv2(interpreter, dep.eps, t.schedule, shorten=t.shorten,
                     **{**(t.adv2_options or {}), **dep.attack_kw, **kw})


def step_bar(progress):
    """The attack loop's step callback carried by the runner's message function, if any (bars on a terminal)."""
    return getattr(progress, "steps", None)


def transfer_attack(t: Target, dep: Deployment, name: str, it: Transfer, x, y_t, map_t):
    """ADV² against an adapter's native twin, judged by the adapter's map; (result, queries per image)."""
    counted = Counted(it)
    return transfer_start(adv2_attack(t, dep, name), Transfer(it.twin, counted), x, y_t, map_t, counted)


def blackbox_attack(t: Target, dep: Deployment, seed: int) -> QueryAdv2:
    return QueryAdv2(dep.eps, t.queries, t.threat_model, seed=seed)


def blackbox_names(t: Target, dep: Deployment) -> list[str]:
    """Interpreters black-box ADV² attacks: those without a gradient whenever ADV² runs, every ADV² target with
    ``blackbox`` among the attacks."""
    names = adv2_names(t)
    return [n for n in names if ("adv2" in t.attacks and n in dep.opaque) or "blackbox" in t.attacks]
