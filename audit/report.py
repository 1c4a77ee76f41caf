"""Views: PNG figures from tensors already computed, and the audit report (JSON record, HTML and terminal views
rendered from the JSON). No model calls here."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from underfire.guard.errors import UnderfireError  # noqa: E402


def _img(x: torch.Tensor):
    x = x.detach().cpu().clamp(0, 1)
    return x[0].numpy() if x.shape[0] == 1 else x.permute(1, 2, 0).numpy()


def overlay_grid(
    images: torch.Tensor,
    maps: dict[str, torch.Tensor],
    path: str | os.PathLike,
    titles: Sequence[str] | None = None,
    cell: float = 2.0,
) -> Path:
    """One row per image: the image, then each interpreter's map (upsampled) over it.

    Args:
        images: (N, C, H, W) in [0, 1].
        maps: interpreter name -> saliency (N, 1, h, w) in [0, 1].
        path: PNG to write (written to a temporary name first, then moved into place).
        titles: a label per row (e.g. "chelsea: Egyptian cat 79%").
    """
    n = images.shape[0]
    names = list(maps)
    fig, axes = plt.subplots(n, 1 + len(names), figsize=(cell * (1 + len(names)), cell * n), squeeze=False)
    gray = images.shape[1] == 1
    for i in range(n):
        base = _img(images[i])
        axes[i, 0].imshow(base, cmap="gray" if gray else None, vmin=0, vmax=1)
        axes[i, 0].set_title(titles[i] if titles else "input", fontsize=7)
        for j, name in enumerate(names, 1):
            m = F.interpolate(maps[name][i:i + 1].detach().cpu().float(), size=images.shape[-2:],
                              mode="bilinear", align_corners=False)[0, 0].clamp(0, 1).numpy()
            axes[i, j].imshow(base, cmap="gray" if gray else None, vmin=0, vmax=1)
            axes[i, j].imshow(m, cmap=CMAP, alpha=0.5, vmin=0, vmax=1)
            if i == 0:
                axes[i, j].set_title(name.upper(), fontsize=9)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------------------------------
# The audit report: JSON is the record; the HTML and the terminal summary are rendered from the JSON only.
# ------------------------------------------------------------------------------------------------------------
import base64  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import textwrap  # noqa: E402

import numpy as np  # noqa: E402

from underfire.audit.defenses import row_label, row_order  # noqa: E402

CMAP = "inferno"  # perceptually uniform: brightness grows with saliency, readable in grey and by colour-blind eyes
SCHEMA_VERSION = 2  # 2: exact rate intervals, τ over several draws per input, status, journal fingerprints
# every row a record can hold and its label, in the report's order: derived from the defense table
ATTACK_LABELS = {row: row_label(row) for row in row_order()}


class ReportError(UnderfireError):
    """A report file that is not an underfire audit report of a schema this version reads."""


def png_b64(t: torch.Tensor, cmap: bool = False) -> str:
    """(C, H, W) in [0, 1] → base64 PNG; ``cmap`` renders a 1-channel map with the perceptually uniform CMAP."""
    from PIL import Image

    a = t.detach().float().cpu().clamp(0, 1)
    if cmap:
        rgb = plt.get_cmap(CMAP)(a[0].numpy())[..., :3]
        arr = (rgb * 255).round().astype(np.uint8)
    elif a.shape[0] == 1:
        arr = (a[0].numpy() * 255).round().astype(np.uint8)
    else:
        arr = (a.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _fig_b64(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_report(path: str | os.PathLike) -> dict:
    try:
        rep = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ReportError(f"cannot read report {path}: {exc}") from exc
    if not isinstance(rep, dict) or rep.get("schema_version") != SCHEMA_VERSION:
        raise ReportError(f"{path} is not an underfire report of schema version {SCHEMA_VERSION} "
                          f"(found {rep.get('schema_version') if isinstance(rep, dict) else type(rep).__name__})")
    return rep


def _fmt(v, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.0%}" if pct else f"{v:.3f}"


def summary_rows(report: dict) -> list[dict]:
    """One row per (target, interpreter, attack): the numbers the terminal, --json and HTML tables show."""
    rows = []
    for key, tg in report["targets"].items():
        for name, a in tg["summary"]["interpreters"].items():
            for atk, r in a.items():
                if not isinstance(r, dict) or "asr" not in r:
                    continue
                det = {f"{d}:{k}": v["mean"] for d, flags in r["detection"].items() for k, v in flags.items()}
                rows.append({"target": key, "interpreter": name, "attack": atk, "asr": r["asr"]["mean"],
                             "asr_ci95": r["asr"]["ci95"], "mc": r["mc"]["mean"], "l1": r["l1"]["mean"],
                             "l1_ci95": r["l1"]["ci95"], "iou": r["iou"]["mean"], "detection": det})
    return rows


def _rate(r: dict | None) -> str:
    """'75% [41–93%]': a rate with its exact 95% interval."""
    if not r or r.get("mean") is None:
        return "–"
    lo, hi = r["ci95"]
    return f"{r['mean']:.0%} [{lo:.0%}–{hi:.0%}]"


def queries_text(name: str, a: dict, tg: dict) -> str | None:
    """How the attacks on an interpreter without a gradient read its map: queries spent and queries per spoof."""
    parts = []
    for atk, label in (("adv2", "transfer"), ("blackbox", f"query ADV² ({tg['target'].get('threat_model', 'graybox')})")):
        q = a.get(atk, {}).get("queries") if isinstance(a.get(atk), dict) else None
        if q:
            ps = q["per_success"]
            per = (f"; per spoofed input median {ps['median']:.0f}, 90th pct {ps['p90']:.0f} (n = {ps['n']})"
                   if ps["n"] else "; no input spoofed")
            parts.append(f"{label}: {q['spent_median']:.0f} queries per image (max {q['spent_max']}){per}")
    return f"queries of {name}: " + " · ".join(parts) if parts else None


def _cert_text(c: dict, tg: dict) -> str:
    fr = ", ".join(f"{v:.0%} at r = {r:g}" for r, v in zip(c["radii"], c["mean"]))
    return (f"certified top-{c['k']:.0%} pixels of {c['samples']} noisy copies: {fr} (ℓ2; the ℓ∞ budget reaches "
            f"ℓ2 {tg.get('linf_as_l2', float('nan')):.2f})")


def _compared(a: dict) -> bool:
    """Whether an interpreter's summary has a defense comparison with at least one defense run on it."""
    return "comparison" in a and any(r["applies"] for r in a["comparison"]["rows"][1:])


def _not_compared(tg: dict) -> str | None:
    """One line naming the interpreters of a target whose defenses were not attacked (no table for them)."""
    ints = tg["summary"]["interpreters"]
    names = [n for n, a in ints.items() if "comparison" in a and not _compared(a)]
    if not names:
        return None
    return (f"no defense was run on {', '.join(names)}: the target's adaptive_interpreters name the interpreters "
            f"whose defenses are attacked, and a defense that does not apply to an interpreter is skipped")


def comparison_rows(cmp: dict) -> list[list[str]]:
    """The defense comparison of one interpreter as text cells (terminal and HTML share them)."""
    from underfire.audit.defenses import cost_text

    out = []
    for r in cmp["rows"]:
        if not r["applies"]:
            out.append([r["defense"], "not applicable / not run"] + [""] * 6)
            continue
        auc = "–" if r.get("auc") is None else f"{r['auc']:.2f}"
        if r.get("auc_plain") is not None:
            auc += f" / {r['auc_plain']:.2f}"
        fid = r.get("fidelity_l1")
        out.append([r["defense"], _rate(r["spoofability"]) + ("" if r.get("own_map", True) else " †"), _rate(r["asr"]),
                    _fmt(r["fpr_heldout"], True), auc, _fmt(fid["mean"]) if fid else "–",
                    cost_text(r["cost"]) if r.get("cost") else "–", convergence_cell(r.get("convergence"))])
    return out


def convergence_cell(c: dict | None) -> str:
    """A row's convergence under its attack ensemble: CONVERGED / NOT CONVERGED / unchecked, and the member
    that spoofed the most inputs first."""
    if not c or c.get("status") == "unchecked":
        return "unchecked (quick)"
    status = "converged" if c["status"] == "converged" else "NOT CONVERGED"
    return status + (f" (worst: {c['worst_member']})" if c.get("worst_member") else "")


COMPARISON_HEAD = ["defense", "spoofability [95% CI]", "ASR of its attack", "FPR held-out", "AUC adaptive / plain",
                   "map L1 cost", "extra per input", "attack ensemble"]
COMPARISON_NOTE = ("Each defense is scored under an attack that knows it: detectors under ADV² with the detector's "
                   "hinge (ASR = reaching c_t; spoofability also needs undetected and within τ), map defenses under "
                   "ADV² against the defended map (smoothing: fresh noise each step, EOT) with their own τ, a map "
                   "defense + detector (smooth+squeeze) under both at once (within the defended map's τ and "
                   "undetected). AUC: "
                   "held-out benign vs that attack's successful inputs (and vs plain ADV²). Map L1 cost: L1 between "
                   "the defended and the plain benign map. No defense changes the classifier (clean accuracy cost 0). † the joint "
                   "ensemble attack optimises the ensemble's mean map, not this interpreter's: not counted in the verdict. "
                   "Attack ensemble: above attack strength quick every row is the worst case per input over several "
                   "attack settings run cheapest first (attacks/strength.py); a row whose costliest members still "
                   "raise it beyond the 95% interval of the cheaper ones is NOT CONVERGED, and only converged rows are "
                   "credited by the verdict (at quick every row is unchecked and none is).")


def headline_text(report: dict) -> str:
    h = report["headline"]
    if h["spoofability"] is None:
        return "headline spoofability not measured (INCONCLUSIVE)"
    text = f"headline spoofability {_rate({'mean': h['spoofability'], 'ci95': h['ci95']})} ({h['where']})"
    return text + (" — INCONCLUSIVE" if h["status"] == "inconclusive" else "")


def summary_text(report: dict) -> str:
    lines = [f"underfire audit {report['name']!r}: {headline_text(report)} "
             f"({report['seconds']:.0f}s, {report['environment']['device']})"]
    for key, tg in report["targets"].items():
        lines.append(f"\n{key} (n = {tg['n']}, ε = {tg['eps_255']:g}/255)")
        for w in tg["warnings"]:
            lines.append(f"  ! {w}")
        for r in tg["status"]["reasons"]:
            lines.append(f"  INCONCLUSIVE: {r}")
        lines.append("  " + textwrap.fill(plain_words(key, tg), 108, subsequent_indent="  "))
        w = max(12, *(len(n) + 2 for n in tg["summary"]["interpreters"]))
        rows = summary_rows({"targets": {key: tg}})
        wa = max(24, *(len(ATTACK_LABELS.get(r["attack"], r["attack"])) + 1 for r in rows)) if rows else 24
        lines.append(f"  {'interpreter':<{w}}{'attack':<{wa}}{'ASR [95% CI]':>16}{'L1':>8}{'IoU':>7}  detected (decision)")
        for r in rows:
            dets = ", ".join(f"{d} {_fmt(r['detection'].get(d + ':' + v['decision']), True)}"
                             for d, v in tg["detectors"].items())
            asr = _rate({"mean": r["asr"], "ci95": r["asr_ci95"]})
            lines.append(f"  {r['interpreter']:<{w}}{ATTACK_LABELS.get(r['attack'], r['attack']):<{wa}}"
                         f"{asr:>16}{_fmt(r['l1']):>8}{_fmt(r['iou']):>7}  {dets}")
        for name, a in tg["summary"]["interpreters"].items():
            extra = "" if "comparison" in a else "".join(f", under {k.split('_', 1)[1]} {_rate(v)}"
                                                         for k, v in a.items() if k.startswith("spoofability_")
                                                         and k != "spoofability_by")
            if "spoofability" in a:
                te = a["tau_estimate"]
                ref = f", PGD within τ {_rate(a['pgd_within_tau'])}" if "pgd_within_tau" in a else ""
                lb = f" — a LOWER BOUND ({a['lower_bound']})" if a.get("lower_bound") else ""
                by = "".join(f", {ATTACK_LABELS.get(k, k)} {_rate(v)}" for k, v in a.get("spoofability_by", {}).items())
                lines.append(f"  spoofability {name}: {_rate(a['spoofability'])}{lb} (τ = {a['tau']:.3f} "
                             f"[{te['ci95'][0]:.3f}–{te['ci95'][1]:.3f}]{ref}{by}){extra}")
            elif a.get("not_attacked"):
                lines.append(f"  spoofability {name}: NOT MEASURED — {a['not_attacked']}; it passes no gate")
            if qt := queries_text(name, a, tg):
                lines.append(f"  {qt}")
            if "certified" in a:
                lines.append(f"  {_cert_text(a['certified'], tg)}")
        for name, a in tg["summary"]["interpreters"].items():
            if not _compared(a):
                continue
            widths = (15, 18, 18, 7, 12, 8, 20, 18)
            head = ("defense", "spoofability", "its attack's ASR", "FPR", "AUC a / p", "map L1", "extra per input",
                    "attack ensemble")
            lines.append(f"  defenses of {name} (each under its adaptive attack):")
            lines.append("    " + "".join(f"{h:<{w}}" for h, w in zip(head, widths)).rstrip())
            for cells in comparison_rows(a["comparison"]):
                lines.append("    " + "".join(f"{c:<{w}}" for c, w in zip(cells, widths)).rstrip())
            lines.append(f"    → {a['comparison']['verdict']['text']}")
            for d, info in a.get("defense_info", {}).items():
                if "certified" in info:
                    lines.append(f"    {d}: {_cert_text(info['certified'], tg)}")
        if skipped := _not_compared(tg):
            lines.append(f"  {skipped}")
    lines.append("\n[a–b]: exact (Clopper–Pearson) 95% intervals of rates; τ [a–b]: bootstrap interval over inputs")
    return "\n".join(lines)


def plain_words(key: str, tg: dict) -> str:
    """One paragraph for a reader who does not know the metrics: how spoofable, which interpreter is weakest,
    which defense helps most, how sure the numbers are at this n — or why the run could not say."""
    n, eps, ints = tg["n"], tg["eps_255"], tg["summary"]["interpreters"]
    if tg["status"]["reasons"]:
        return (f"This run could not measure {key}: {tg['status']['reasons'][0]} Its numbers show no safety; fix "
                f"the cause and audit again.")
    sp = {name: a["spoofability"] for name, a in ints.items() if a.get("spoofability", {}).get("mean") is not None}
    if not sp:
        return f"No ADV² attack ran on {key}, so this run says nothing about how far its maps can be spoofed."
    worst = max(sp, key=lambda k: sp[k]["mean"])
    s = sp[worst]
    lo, hi = s["ci95"]
    out = [f"On {n} audited inputs, an attacker allowed to change each pixel by at most {eps:g}/255 made the model "
           f"predict a class of their choosing while the {worst} map stayed within its benign noise on {s['k']} of "
           f"{s['n']} inputs ({s['mean']:.0%}; 95% interval {lo:.0%}–{hi:.0%})."]
    if len(sp) > 1:
        best = min(sp, key=lambda k: sp[k]["mean"])
        if sp[best]["mean"] == s["mean"]:
            out.append(f"All {len(sp)} interpreters audited were spoofed equally often.")
        else:
            out.append(f"{worst} is the weakest of the {len(sp)} interpreters audited; {best} held best "
                       f"({sp[best]['mean']:.0%}).")
    lower = [name for name, a in ints.items() if a.get("lower_bound")]
    unmeasured = [name for name, a in ints.items() if a.get("not_attacked")]
    if unmeasured:
        out.append(f"{', '.join(unmeasured)} {'was' if len(unmeasured) == 1 else 'were'} listed but not attacked in "
                   f"this run: nothing here says how far {'its map' if len(unmeasured) == 1 else 'their maps'} can "
                   f"be spoofed.")
    if lower:
        out.append(f"For {', '.join(lower)} these are lower bounds: the attack could not follow the map's gradient, "
                   f"so a stronger attacker may do better.")
    c = ints[worst].get("comparison")
    if c and not any(r["applies"] for r in c["rows"][1:]):
        c = None
    if c:
        v = c["verdict"]
        out.append(f"Of the defenses tried on {worst}, each under an attack that knows it: {v['text']}.")
    elif tg["target"]["defenses"]:
        out.append("No defense was scored under its own adaptive attack in this run (add 'adaptive' to the attacks).")
    out.append("The interval is wide at this n: audit more inputs (--n) before deciding." if hi - lo > 0.3 else
               "The interval is narrow enough to act on.")
    if c and c["verdict"]["helps"]:
        out.append(f"Of the defenses measured, {c['verdict']['best']} is the one to deploy for {worst}; it lowers the "
                   f"risk but does not remove it.")
    elif s["mean"] >= 0.05:
        out.append(f"Until a defense helps, do not treat the {worst} map as evidence that a prediction is sound "
                   f"when inputs may be adversarial.")
    return " ".join(out)
