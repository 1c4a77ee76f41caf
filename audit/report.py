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
import html  # noqa: E402
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


def write_report(report: dict, run_dir: str | os.PathLike) -> tuple[Path, Path]:
    """report.json, then report.html rendered from the JSON just written (both atomic)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=1)
    page = render_html(json.loads(text))  # render from the JSON, as a reader of the file would
    _atomic_write(run_dir / "report.json", text)
    _atomic_write(run_dir / "report.html", page)
    return run_dir / "report.json", run_dir / "report.html"


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


# -- HTML ----------------------------------------------------------------------------------------------------
CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{margin-bottom:0}table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 7px;
text-align:right;font-size:13px}th{background:#f3f3f3}td.l{text-align:left}.bad{color:#b00;font-weight:bold}
.good{color:#070}.warnc{color:#b60;font-weight:bold}.warn{background:#fff3cd;padding:.5em;border:1px solid #e0c060}img.px{image-rendering:pixelated}
.grid td{text-align:center;font-size:11px}small{color:#666}.ov{position:relative;display:inline-block}
.ov img.m{position:absolute;left:0;top:0;opacity:.6}.plain{font-size:1.1em;background:#f4f7fb;padding:.7em;
border-left:4px solid #4a78b5}"""


def _bars(tg: dict) -> str:
    ints = tg["summary"]["interpreters"]
    atks = [a for a in ATTACK_LABELS if any(a in v for v in ints.values())]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    w = 0.8 / max(len(atks), 1)
    for j, atk in enumerate(atks):
        xs = np.arange(len(ints)) + j * w
        for ax, metric in zip(axes, ("l1", "iou")):
            vals = [(v.get(atk, {}).get(metric, {}) or {}).get("mean") for v in ints.values()]
            ax.bar(xs, [0 if v is None else v for v in vals], w, label=ATTACK_LABELS[atk])
    for ax, title in zip(axes, ("L1 to the benign map (lower = looks benign)", "mean IoU@k with the benign map (higher)")):
        ax.set_xticks(np.arange(len(ints)) + 0.4 - w / 2, [n.upper() for n in ints])
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=8)
    return _fig_b64(fig)


def _curves(tg: dict) -> str:
    ints = tg["summary"]["interpreters"]
    fig, axes = plt.subplots(1, len(ints), figsize=(3.2 * len(ints), 2.8), squeeze=False)
    ks = list(range(5, 100, 5))
    for ax, (name, v) in zip(axes[0], ints.items()):
        for atk, label in ATTACK_LABELS.items():
            if atk in v:
                ax.plot(ks, v[atk]["iou_curve"], label=label)
        ax.set_title(name.upper(), fontsize=10)
        ax.set_xlabel("k (% top pixels)")
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("IoU with benign map")
    axes[0][0].legend(fontsize=7)
    return _fig_b64(fig)


def _heatmap(tg: dict) -> str | None:
    tr = tg["summary"]["transfer"]
    if len(tr) < 2:
        return None
    names = list(tr)
    cols = list(next(iter(tr.values())))
    m = np.array([[tr[a][b] for b in cols] for a in names])
    fig, ax = plt.subplots(figsize=(1.2 * len(cols) + 1.5, 1.0 * len(names) + 1))
    ax.imshow(m, cmap="viridis_r")
    for i in range(len(names)):
        for j in range(len(cols)):
            ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", color="w" if m[i, j] > m.mean() else "k")
    ax.set_xticks(range(len(cols)), [c.upper() for c in cols])
    ax.set_yticks(range(len(names)), [f"ADV² vs {n.upper()}" for n in names])
    ax.set_xlabel("map read by")
    ax.set_title("transfer: L1 to the benign map", fontsize=10)
    return _fig_b64(fig)


def _img_tag(b64: str, size: int = 96) -> str:
    return f'<img class="px" width="{size}" height="{size}" src="data:image/png;base64,{b64}">'


def _overlay(image: str, saliency: str, size: int = 96) -> str:
    """The map laid over the image it explains (half transparent), and the bare map beside it."""
    return (f'<span class="ov" style="width:{size}px;height:{size}px">{_img_tag(image, size)}'
            f'<img class="px m" width="{size}" height="{size}" src="data:image/png;base64,{saliency}"></span> '
            f'{_img_tag(saliency, size // 2)}')


def _examples_html(tg: dict) -> str:
    ex = tg["examples"]
    recs = tg["records"]["interpreters"]
    cats = ex["categories"]
    rows = []
    cols = 1 + sum(1 + sum(a in r for a in EXAMPLE_ATTACKS) for r in recs.values())
    size = max(48, min(96, 1040 // cols - 16))  # the grid fits the page's width (1100 px) when it can
    for i, im in enumerate(ex["images"]):
        cells = [f"<td>{_img_tag(im)}<br>{html.escape(cats[ex['classes'][i]])} → "
                 f"{html.escape(cats[ex['targets'][i]])}</td>"]
        for name, r in recs.items():
            parts = [f"{_overlay(im, ex['maps'][name][i], size)}<br>benign"]
            for atk in EXAMPLE_ATTACKS:
                if atk in r and i < len(r[atk]["maps"]):
                    ok = r[atk]["success"][i]
                    parts.append(f"{_overlay(r[atk]['images'][i], r[atk]['maps'][i], size)}<br>{ATTACK_LABELS[atk]} "
                                 f"{'✓' if ok else '✗'} L1 {r[atk]['l1'][i]:.2f}")
            cells.append("<td>" + "</td><td>".join(parts) + "</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    head = "<tr><th>input: class → target</th>" + "".join(
        f"<th colspan='{1 + sum(a in r for a in EXAMPLE_ATTACKS)}'>{html.escape(n.upper())}</th>"
        for n, r in recs.items()) + "</tr>"
    return (f"<p><small>Each map is laid over the image it explains (and shown alone beside it); colour map "
            f"{CMAP}: brighter = more salient. ✓: the attack reached the attacker's class; L1 to the benign map."
            f"</small></p><table class='grid'>{head}{''.join(rows)}</table>")


EXAMPLE_ATTACKS = ("pgd", "adv2", "blackbox")


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


def _table(tg: dict) -> str:
    dets = tg["detectors"]
    head = ("<tr><th>interpreter</th><th>attack</th><th>ASR [exact 95% CI]</th><th>MC</th><th>L1 to benign (95% CI)</th>"
            "<th>IoU</th>" + "".join(f"<th>detected by {d}</th>" for d in dets) + "</tr>")
    body = []
    for r in summary_rows({"targets": {"t": tg}}):
        ci = r["l1_ci95"]
        det = "".join(f"<td>{_fmt(r['detection'].get(d + ':' + v['decision']), True)}</td>" for d, v in dets.items())
        body.append(f"<tr><td class=l>{r['interpreter'].upper()}</td><td class=l>{ATTACK_LABELS.get(r['attack'], r['attack'])}"
                    f"</td><td>{_rate({'mean': r['asr'], 'ci95': r['asr_ci95']})}</td><td>{_fmt(r['mc'])}</td><td>{_fmt(r['l1'])} "
                    f"<small>[{_fmt(ci[0]) if ci else '–'}, {_fmt(ci[1]) if ci else '–'}]</small></td>"
                    f"<td>{_fmt(r['iou'])}</td>{det}</tr>")
    note = ""
    if any("benign_l1_to_target" in r for a in tg["summary"]["interpreters"].values() for r in a.values()
           if isinstance(r, dict)):
        rows = "".join(f"<tr><td class=l>{n.upper()}</td><td class=l>{ATTACK_LABELS[k]}</td>"
                       f"<td>{_fmt(r['l1']['mean'])}</td><td>{_fmt(r['benign_l1_to_target']['mean'])}</td></tr>"
                       for n, a in tg["summary"]["interpreters"].items() for k, r in a.items()
                       if isinstance(r, dict) and "benign_l1_to_target" in r)
        note = ("<p><small>† rows marked † measure L1 and IoU to the attack's own target map, not to the benign "
                "map.</small></p><table><tr><th>interpreter</th><th>target</th><th>L1(adversarial map, target)"
                f"</th><th>L1(benign map, target)</th></tr>{rows}</table>")
    return f"<table>{head}{''.join(body)}</table>{note}"


def _detector_html(tg: dict) -> str:
    out = []
    for d, det in tg["detectors"].items():
        cal = det["calibration"]
        held = cal.get("fpr_heldout", {})
        rows = "".join(f"<tr><td class=l>{html.escape(k)}{' (decision)' if k == det['decision'] else ''}</td>"
                       f"<td>{v:.4f}</td><td>{_fmt(cal['fpr_calibration'].get(k), True)}</td>"
                       f"<td>{_fmt(held.get(k), True)}</td></tr>" for k, v in det["thresholds"].items())
        out.append(f"<h4>{d} ({html.escape(json.dumps(det['config']))}): calibrated on {cal['n']} benign inputs, "
                   f"held-out {cal.get('n_heldout', 0)}</h4><table><tr><th>score</th><th>threshold</th>"
                   f"<th>FPR calibration</th><th>FPR held-out</th></tr>{rows}</table>")
    return "".join(out)


def _severity(score: float) -> str:
    return "bad" if score >= 0.25 else ("warnc" if score >= 0.05 else "good")


def render_html(report: dict) -> str:
    """The HTML view of a report dict (as read from report.json); figures are drawn here from its numbers."""
    env = report["environment"]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>underfire audit {html.escape(report['name'])}"
             f"</title><style>{CSS}</style></head><body>",
             f"<h1>underfire audit: {html.escape(report['name'])}</h1>",
             f"<p><small>{html.escape(env['date'])} · {html.escape(env['device'])} · torch {env['torch']} · "
             f"underfire {env['underfire']} (git {env['git']}) · {report['seconds']:.0f}s · schema "
             f"v{report['schema_version']}</small></p>"]
    h = report["headline"]
    if h["status"] == "inconclusive":
        items = "".join(f"<li>{html.escape(r)}</li>" for r in h["inconclusive"])
        parts.append(f"<p class='warn' style='font-size:1.2em'><b>INCONCLUSIVE</b>: this run did not measure the "
                     f"deployment, so its numbers show no safety and it passes no gate (exit status 4).</p><ul>{items}</ul>")
    if h["spoofability"] is not None:
        sc = h["spoofability"]
        parts.append(f"<p style='font-size:1.3em'>Headline spoofability: <span class='{_severity(sc)}'>"
                     f"{_rate({'mean': sc, 'ci95': h['ci95']})}</span> ({h['k']} of {h['n']} audited inputs, "
                     f"{html.escape(h['where'])}) can be pushed to the attacker's class while the map stays "
                     f"within benign noise.</p>")
    parts.append(f"<p><small>{html.escape(report['definitions']['spoofability'])}</small></p>")
    for key, tg in report["targets"].items():
        t = tg["target"]
        parts.append(f"<h2>{html.escape(key)}</h2><p>model <b>{html.escape(tg['model'])}</b>, interpreters "
                     f"{', '.join(t['interpreters'])}, {tg['n']} inputs, ε = {tg['eps_255']:g}/255, schedule "
                     f"{t['schedule']}{' ÷' + str(t['shorten']) if t['schedule'] == 'short' else ''}, defenses: "
                     f"{', '.join(t['defenses']) or 'none'}</p>")
        parts.append(f"<p class='plain'>{html.escape(plain_words(key, tg))}</p>")
        for w in tg["warnings"]:
            parts.append(f"<p class='warn'>{html.escape(w)}</p>")
        for r in tg["status"]["reasons"]:
            parts.append(f"<p class='warn'><b>INCONCLUSIVE</b>: {html.escape(r)}</p>")
        # with a defense comparison (below) the per-defense spoofability lives there, not in this table
        shown = [] if any("comparison" in a for a in tg["summary"]["interpreters"].values()) else t["defenses"]
        sp = "".join(f"<tr><td class=l>{n.upper()}</td><td>{_rate(a.get('spoofability'))}"
                     + (f" <b class=warnc>lower bound</b><br><small>{html.escape(a['lower_bound'])}</small>"
                        if a.get("lower_bound") else "")
                     + (f" <b class=warnc>not attacked</b><br><small>{html.escape(a['not_attacked'])}</small>"
                        if a.get("not_attacked") else "")
                     + "".join(f"<br><small>{ATTACK_LABELS.get(k, k)} {_rate(v)}</small>"
                               for k, v in a.get("spoofability_by", {}).items())
                     + f"</td><td>{_fmt(a['tau'])} "
                     f"<small>[{_fmt(a['tau_estimate'].get('ci95', [None])[0])}, "
                     f"{_fmt(a['tau_estimate'].get('ci95', [None, None])[1])}]</small></td>"
                     f"<td>{_rate(a.get('pgd_within_tau'))}</td>"
                     + "".join(f"<td>{_rate(a.get('spoofability_' + d))}</td>" for d in shown) + "</tr>"
                     for n, a in tg["summary"]["interpreters"].items())
        parts.append("<h3>Spoofability</h3><table><tr><th>interpreter</th><th>undefended (any attack on its map)</th>"
                     "<th>noise level τ [bootstrap 95% CI]</th><th>PGD within τ (reference)</th>" + "".join(f"<th>under {d} (adaptive ADV²)</th>" for d in shown)
                     + f"</tr>{sp}</table>")
        for n, a in tg["summary"]["interpreters"].items():
            if "certified" in a:
                parts.append(f"<p>{n.upper()}: {html.escape(_cert_text(a['certified'], tg))}</p>")
            if qt := queries_text(n, a, tg):
                parts.append(f"<p>{html.escape(qt)}</p>")
        te = next(iter(tg["summary"]["interpreters"].values()))["tau_estimate"]
        parts.append(f"<p><small>Rates show exact (Clopper–Pearson) 95% intervals. τ is the 95th percentile of "
                     f"the map noise pooled over {te.get('inputs', 0)} inputs × {te.get('draws', 0)} noise draws, the "
                     f"benign class fixed; its interval is a bootstrap over inputs (how stable τ is at this n)."
                     f"</small></p>")
        cmp = [(n, a["comparison"]) for n, a in tg["summary"]["interpreters"].items() if _compared(a)]
        if skipped := _not_compared(tg):
            cmp_note = f"<p><small>{html.escape(skipped)}</small></p>"
        else:
            cmp_note = ""
        if cmp:
            parts.append("<h3>Defenses compared</h3>")
            for n, c in cmp:
                head = "".join(f"<th>{html.escape(h)}</th>" for h in COMPARISON_HEAD)
                body = "".join("<tr>" + "".join(f"<td{' class=l' if i == 0 else ''}>{html.escape(v)}</td>"
                                                 for i, v in enumerate(cells)) + "</tr>"
                               for cells in comparison_rows(c))
                v = c["verdict"]
                parts.append(f"<h4>{n.upper()}</h4><table><tr>{head}</tr>{body}</table>"
                             f"<p class='{'good' if v['helps'] else 'warnc'}'>{html.escape(v['text'])}</p>")
            parts.append(f"<p><small>{html.escape(COMPARISON_NOTE)}</small></p>{cmp_note}")
        parts.append("<h3>Benign vs adversarial maps</h3>" + _examples_html(tg))
        parts.append("<h3>Attacks</h3>" + _table(tg))
        parts.append(f"<img src='data:image/png;base64,{_bars(tg)}'><br><img src='data:image/png;base64,{_curves(tg)}'>")
        hm = _heatmap(tg)
        if hm:
            parts.append(f"<h3>Transfer between interpreters</h3><img src='data:image/png;base64,{hm}'>")
        if tg["detectors"]:
            parts.append("<h3>Detectors</h3>" + _detector_html(tg))
    parts.append("</body></html>")
    return "\n".join(parts)
