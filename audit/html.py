"""The HTML report: one self-contained page rendered from the JSON record only (pictures inline), and
:func:`write_report`, which writes the record and its page together."""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from underfire.guard.registry import label_of  # noqa: E402

from underfire.audit.report import (ATTACK_LABELS, CMAP, COMPARISON_HEAD, COMPARISON_NOTE, _atomic_write,  # noqa: E402
                                    _cert_text, _compared, _fig_b64, _fmt, _not_compared, _rate, comparison_rows,
                                    plain_words, queries_text, summary_rows)


def write_report(report: dict, run_dir: str | os.PathLike) -> tuple[Path, Path]:
    """report.json, then report.html rendered from the JSON just written (both atomic)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=1)
    page = render_html(json.loads(text))  # render from the JSON, as a reader of the file would
    _atomic_write(run_dir / "report.json", text)
    _atomic_write(run_dir / "report.html", page)
    return run_dir / "report.json", run_dir / "report.html"



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
        ax.set_xticks(np.arange(len(ints)) + 0.4 - w / 2, [label_of(n) for n in ints])
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
        ax.set_title(label_of(name), fontsize=10)
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
    ax.set_xticks(range(len(cols)), [label_of(c) for c in cols])
    ax.set_yticks(range(len(names)), [f"ADV² vs {label_of(n)}" for n in names])
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
    if "images" not in ex:  # a committed record whose pictures were left out (benchmarks/slim.py)
        return f"<p><small>{html.escape(ex.get('left_out', 'no example pictures in this record'))}</small></p>"
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
        f"<th colspan='{1 + sum(a in r for a in EXAMPLE_ATTACKS)}'>{html.escape(label_of(n))}</th>"
        for n, r in recs.items()) + "</tr>"
    return (f"<p><small>Each map is laid over the image it explains (and shown alone beside it); colour map "
            f"{CMAP}: brighter = more salient. ✓: the attack reached the attacker's class; L1 to the benign map."
            f"</small></p><table class='grid'>{head}{''.join(rows)}</table>")


EXAMPLE_ATTACKS = ("pgd", "adv2", "blackbox")




def _table(tg: dict) -> str:
    dets = tg["detectors"]
    head = ("<tr><th>interpreter</th><th>attack</th><th>ASR [exact 95% CI]</th><th>MC</th><th>L1 to benign (95% CI)</th>"
            "<th>IoU</th>" + "".join(f"<th>detected by {d}</th>" for d in dets) + "</tr>")
    body = []
    for r in summary_rows({"targets": {"t": tg}}):
        ci = r["l1_ci95"]
        det = "".join(f"<td>{_fmt(r['detection'].get(d + ':' + v['decision']), True)}</td>" for d, v in dets.items())
        body.append(f"<tr><td class=l>{html.escape(label_of(r['interpreter']))}</td><td class=l>{ATTACK_LABELS.get(r['attack'], r['attack'])}"
                    f"</td><td>{_rate({'mean': r['asr'], 'ci95': r['asr_ci95']})}</td><td>{_fmt(r['mc'])}</td><td>{_fmt(r['l1'])} "
                    f"<small>[{_fmt(ci[0]) if ci else '–'}, {_fmt(ci[1]) if ci else '–'}]</small></td>"
                    f"<td>{_fmt(r['iou'])}</td>{det}</tr>")
    note = ""
    if any("benign_l1_to_target" in r for a in tg["summary"]["interpreters"].values() for r in a.values()
           if isinstance(r, dict)):
        rows = "".join(f"<tr><td class=l>{html.escape(label_of(n))}</td><td class=l>{ATTACK_LABELS[k]}</td>"
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
        sp = "".join(f"<tr><td class=l>{html.escape(label_of(n))}</td><td>{_rate(a.get('spoofability'))}"
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
                parts.append(f"<p>{html.escape(label_of(n))}: {html.escape(_cert_text(a['certified'], tg))}</p>")
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
                parts.append(f"<h4>{html.escape(label_of(n))}</h4><table><tr>{head}</tr>{body}</table>"
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
