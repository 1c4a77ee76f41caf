"""The defenses beyond squeezing and the plain ensemble: normalised disagreement, map stability, the learned
detector, β-smoothed GRAD, ROC AUC, and the audit's defense comparison."""

from __future__ import annotations

import json

import pytest
import torch

from underfire.attacks.adaptive import adaptive
from underfire.attacks.adv2 import make_adv2
from underfire.attacks.targets import benign_maps, target_classes
from underfire.audit.defenses import compare, cost_text, detector_cost, map_defense_name
from underfire.audit.metrics import rate
from underfire.audit.config import AuditError, Target, validate_target
from underfire.guard.calibration import DetectorError, roc_auc
from underfire.guard.ensemble import DisagreementDetector, NormalisedDisagreementDetector
from underfire.guard.registry import build_interpreter
from underfire.guard.interpreters.base import InterpreterError
from underfire.guard.interpreters.grad import GradSaliency
from underfire.guard.learned import LearnedDetector
from underfire.guard.smoothing import Smoothed
from underfire.guard.squeeze import SqueezeDetector
from underfire.guard.stability import StabilityDetector, Transform, shift
from tests.conftest import tiny_classifier


def test_roc_auc_known_answers():
    assert roc_auc([0.1, 0.2, 0.3], [0.4, 0.5]) == 1.0
    assert roc_auc([0.4, 0.5], [0.1, 0.2]) == 0.0
    assert roc_auc([1.0, 1.0], [1.0, 1.0]) == 0.5
    assert roc_auc([], [1.0]) is None and roc_auc([1.0], []) is None
    assert roc_auc([0.0, 0.1], [float("nan")]) == 1.0  # an attacked input that could not be scored is flagged


def test_shift_moves_pixels_and_back():
    x = torch.arange(25.0).view(1, 1, 5, 5)
    s = shift(x, 1, -1)
    assert s[0, 0, 2, 2] == x[0, 0, 1, 3]  # content moves down one row and left one column
    assert torch.equal(shift(s, -1, 1)[..., 1:-1, 1:-1], x[..., 1:-1, 1:-1])  # interior restored
    assert torch.equal(shift(x, 0, 0), x)
    with pytest.raises(DetectorError, match="positive size"):
        Transform("noise-0")
    with pytest.raises(DetectorError, match="unknown squeezer"):
        Transform("blur-3")


def test_stability_of_a_map_that_ignores_the_input_is_zero_and_levels_are_saved(tmp_path):
    """A map independent of x never moves (score 0 for noise and the median filter); a shift moves it only by
    the alignment's border, and the fitted levels travel with the thresholds."""
    from tests.test_smoothing import FixedMap

    model = tiny_classifier()
    fixed = FixedMap(model)
    det = StabilityDetector([fixed], transforms=("noise-8", "median-2"))
    x = torch.rand(6, 1, 28, 28, dtype=torch.float64)
    raw = det.raw(x)
    assert set(raw) == {"fixed/noise-8", "fixed/median-2"}
    assert all(float(v.abs().max()) == 0 for v in raw.values())
    with pytest.raises(DetectorError, match="not fitted"):
        det.scores(x)
    det.calibrate(torch.rand(20, 1, 28, 28, dtype=torch.float64), 0.1)
    assert det.fitted["levels"] == {"fixed/noise-8": 1e-6, "fixed/median-2": 1e-6}  # the floor of a zero level
    det.save(tmp_path / "s.pt")
    again = StabilityDetector.load(tmp_path / "s.pt", [fixed])
    assert again.fitted == det.fitted and again.thresholds == det.thresholds
    with pytest.raises(DetectorError, match="calibrated for model"):
        StabilityDetector.load(tmp_path / "s.pt", [FixedMap(tiny_classifier(seed=1))])


def test_stability_and_normalised_disagreement_have_gradients():
    model = tiny_classifier()
    members = [build_interpreter("grad", model), build_interpreter("cam", model)]
    xb = torch.rand(12, 1, 28, 28, dtype=torch.float64)
    for det in (StabilityDetector(members), NormalisedDisagreementDetector(members)):
        det.calibrate(xb, 0.1)
        x = torch.rand(3, 1, 28, 28, dtype=torch.float64, requires_grad=True)
        h = det.hinge(margin=0.0)(x)
        (g,) = torch.autograd.grad(h.sum(), x)
        assert h.shape == (3,) and torch.isfinite(g).all() and float(g.abs().sum()) > 0, det.kind


def test_normalised_disagreement_of_two_members_ranks_like_correlation(fmnist_resnet, fmnist_test):
    """With one pair the normalisation is a positive scale: the same ranking, the same flags at the same FPR."""
    xs = fmnist_test.tensors[0]
    members = [build_interpreter("grad", fmnist_resnet), build_interpreter("cam", fmnist_resnet)]
    plain, norm = DisagreementDetector(members), NormalisedDisagreementDetector(members)
    plain.calibrate(xs[5000:5100], 0.1)
    norm.calibrate(xs[5000:5100], 0.1)
    (level,) = norm.fitted["pair_levels"]
    a, b = plain.score_all(xs[:40])["corr"], norm.score_all(xs[:40])["rel"]
    assert torch.allclose(a / level, b, atol=1e-5)
    assert torch.equal(plain.flag_all(xs[:40])["corr"], norm.flag_all(xs[:40])["rel"])


def test_adaptive_attack_lowers_stability_detection_on_a_real_model(fmnist_resnet, fmnist_test):
    """ADV²-CAM moves the CAM map under small input changes (the detector sees it); the adaptive ADV² that
    carries the detector's hinge (EOT over its random noise and shift) is detected less."""
    xs, ys = fmnist_test.tensors
    cam = build_interpreter("cam", fmnist_resnet)
    det = StabilityDetector([cam])
    det.calibrate(xs[5000:5200], 0.05)
    x, y = xs[:8], ys[:8]
    y_t = target_classes(y, 10, torch.Generator().manual_seed(0))
    bm = benign_maps(cam, x)
    torch.manual_seed(0)
    plain = make_adv2("cam", 24 / 255, "short", shorten=8)(cam, x, y_t, bm)
    adapt = adaptive(make_adv2("cam", 24 / 255, "short", shorten=8, lam_scale=3.0), det)(cam, x, y_t, bm)
    ok_p, ok_a = plain.success, adapt.success
    assert ok_a.float().mean() >= 0.75
    det_p = float(det.detected(plain.x_adv)[ok_p].float().mean())
    det_a = float(det.detected(adapt.x_adv)[ok_a].float().mean())
    assert det_p >= 0.3 and det_a < det_p, (det_p, det_a)


def test_learned_detector_trains_saves_and_stays_differentiable(tmp_path):
    model = tiny_classifier()
    members = [build_interpreter("grad", model), build_interpreter("cam", model)]
    parts = [SqueezeDetector(model, ["bits-2"]), StabilityDetector(members, ("noise-8",))]
    det = LearnedDetector(parts)
    benign = torch.rand(16, 1, 28, 28, dtype=torch.float64)
    attacked = (benign[:8] + 0.3 * torch.randn_like(benign[:8]).sign()).clamp(0, 1)  # visibly changed inputs
    with pytest.raises(DetectorError, match="train"):
        det.calibrate(benign, 0.1)
    with pytest.raises(DetectorError, match="at least 2"):
        det.train(benign, attacked[:1])
    info = det.train(benign, attacked)
    assert info["benign"] == 16 and info["attacked"] == 8 and 0 <= info["auc"] <= 1
    assert det.fitted["features"] == ["squeeze:bits-2", "stability:grad/noise-8", "stability:cam/noise-8"]
    det.calibrate(torch.rand(16, 1, 28, 28, dtype=torch.float64), 0.1)
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(det.scores(x, differentiable=True)["learned"].sum(), x)
    assert torch.isfinite(g).all() and float(g.abs().sum()) > 0
    det.save(tmp_path / "l.pt")
    fresh = LearnedDetector([SqueezeDetector(model, ["bits-2"]), StabilityDetector(members, ("noise-8",))])
    loaded = LearnedDetector.read(tmp_path / "l.pt")
    fresh.load_state(loaded, "l.pt")
    torch.manual_seed(3)
    s1 = det.scores(x.detach())["learned"]
    torch.manual_seed(3)
    assert torch.allclose(s1, fresh.scores(x.detach())["learned"])
    other = LearnedDetector([SqueezeDetector(model, ["bits-3"]), StabilityDetector(members, ("noise-8",))])
    with pytest.raises(DetectorError, match="trained on features"):
        other.load_state(loaded, "l.pt")


def test_hinge_aims_below_a_negative_threshold():
    """The learned score is a logit: its threshold can be negative, and the hinge must still aim below it."""
    model = tiny_classifier()
    det = SqueezeDetector(model, ["bits-2"])
    det.thresholds = {"bits-2": -2.0, "joint": -2.0}
    det.scores = lambda x, differentiable=False: {"bits-2": x.flatten(1).mean(1), "joint": x.flatten(1).mean(1)}
    h = det.hinge(margin=0.75, weight=1.0)
    assert float(h(torch.full((1, 1, 2, 2), -2.4))) == pytest.approx(0.1)  # aim −2.5: a quarter below −2
    assert float(h(torch.full((1, 1, 2, 2), -2.6))) == 0.0


def test_beta_grad_is_grad_through_softplus_beta():
    model = tiny_classifier()
    b = build_interpreter("beta:grad", model, beta=2.0)
    assert isinstance(b, GradSaliency) and b.name == "beta:grad" and b.surrogate == "softplus" and b.beta == 2.0
    x = torch.rand(3, 1, 28, 28, dtype=torch.float64)
    plain, smooth = build_interpreter("grad", model)(x).saliency, b(x).saliency
    far = float((plain - smooth).abs().mean())
    assert far > 1e-3  # the deployed map changes ...
    sharp = build_interpreter("beta:grad", model, beta=1e4)(x).saliency
    assert float((plain - sharp).abs().mean()) < far / 10  # ... and tends to GRAD's as β grows
    with pytest.raises(InterpreterError, match="beta:grad"):
        build_interpreter("beta:cam", model)
    assert make_adv2("beta:grad", 8 / 255, "short").describe()["interpreter"] == "grad"


def test_eot_with_one_noiseless_sample_is_the_plain_attack():
    """ADV² against Smoothed(base, σ = 0, one copy) is ADV² against the base: the same objective gradient at
    every point (to rounding), hence the same outcome (sign steps may flip a few near-zero components)."""
    model = tiny_classifier()
    cam = build_interpreter("cam", model)
    eot = Smoothed(cam, sigma=0.0, samples=1)
    x = torch.rand(4, 1, 28, 28, dtype=torch.float64)
    y_t = (model(x).argmax(1) + 1) % 10
    bm = benign_maps(cam, x)
    grads, far = [], torch.rand_like(bm)  # a target map away from this point (|·| has no gradient at 0)
    for it in (cam, eot):
        xg = x.clone().requires_grad_(True)
        e = it(xg)
        loss = torch.nn.functional.cross_entropy(e.logits, y_t) + (e.saliency - far).abs().mean()
        grads.append(torch.autograd.grad(loss, xg)[0])
    assert torch.allclose(grads[0], grads[1], rtol=1e-6, atol=1e-12)
    a = make_adv2("cam", 24 / 255, steps=(3, 5))(cam, x, y_t, bm)
    b = make_adv2("smooth:cam", 24 / 255, steps=(3, 5))(eot, x, y_t, bm)
    assert torch.equal(a.success, b.success)
    assert float((cam(a.x_adv).saliency - cam(b.x_adv).saliency).abs().mean()) < 0.02


def test_map_defense_names_and_costs():
    assert map_defense_name("smooth", "cam") == "smooth:cam" and map_defense_name("beta", "grad") == "beta:grad"
    assert map_defense_name("beta", "cam") is None and map_defense_name("smooth", "mask") is None
    assert map_defense_name("rtsa", "rts") == "rtsa" and map_defense_name("rtsa", "cam") is None
    model = tiny_classifier()
    assert detector_cost(SqueezeDetector(model)) == {"forwards": 7, "maps": 0}
    members = [build_interpreter("grad", model), build_interpreter("cam", model)]
    assert detector_cost(StabilityDetector(members)) == {"forwards": 0, "maps": 8}
    assert cost_text({"forwards": 7, "maps": 1}) == "7 forwards + 1 map" and cost_text({"forwards": 0, "maps": 0}) == "none"


def _summary(base: tuple[int, int], **defs) -> dict:
    """A summary whose rows all converged under their attack ensemble (tests/test_strength.py: the others)."""
    done = {"status": "converged", "reason": "test"}
    a = {"spoofability": rate(*base), "adv2": {"asr": rate(base[1], base[1])}, "defense_info": {}, "convergence": done}
    for d, (k, n, fpr) in defs.items():
        a[f"spoofability_{d}"] = rate(k, n)
        a["defense_info"][d] = {"asr": rate(n, n), "fpr_heldout": fpr, "convergence": done,
                                "fpr_heldout_rate": None if fpr is None else rate(round(fpr * 200), 200)}
    return a


def test_comparison_verdicts():
    # a clear improvement: intervals do not overlap
    v = compare(_summary((90, 100), squeeze=(80, 100, 0.05), smooth=(20, 100, None)), ["squeeze", "smooth"], 0.05)
    assert v["verdict"]["best"] == "smooth" and v["verdict"]["helps"] and "do not overlap" in v["verdict"]["text"]
    assert [r["defense"] for r in v["rows"]] == ["none", "squeeze", "smooth"]
    # lowest, but the intervals overlap at small n
    v = compare(_summary((6, 8), squeeze=(4, 8, 0.05)), ["squeeze"], 0.05)
    assert v["verdict"]["best"] == "squeeze" and not v["verdict"]["helps"] and "overlap" in v["verdict"]["text"]
    # nothing lower
    v = compare(_summary((2, 8), squeeze=(3, 8, 0.05)), ["squeeze"], 0.05)
    assert v["verdict"]["best"] is None and "no defense lowers" in v["verdict"]["text"]
    # a detector that flags 20% of benign inputs is left out, however low its spoofability
    v = compare(_summary((90, 100), learned=(0, 100, 0.20), squeeze=(85, 100, 0.05)), ["learned", "squeeze"], 0.05)
    assert v["verdict"]["best"] == "squeeze" and "left out" in v["verdict"]["text"] and "learned" in v["verdict"]["text"]
    # the joint ensemble attack optimises the ensemble's map, not this interpreter's: shown, never the verdict
    v = compare(_summary((20, 48), ensemble=(0, 48, 0.05), squeeze=(15, 48, 0.04)), ["ensemble", "squeeze"], 0.05)
    assert v["verdict"]["best"] == "squeeze" and "not counted: ensemble" in v["verdict"]["text"]
    # a defense that did not run is a row that says so, not a zero
    v = compare(_summary((5, 8)), ["beta"], 0.05)
    assert v["rows"][1]["applies"] is False and v["verdict"]["best"] is None


def test_defense_names_all_and_errors():
    t = Target(interpreters=["grad", "cam"], defenses=["all"])
    validate_target(t)
    assert t.defenses == ["squeeze", "ensemble", "ensemble-norm", "stability", "learned", "smooth", "beta", "rtsa"]
    one = Target(interpreters=["cam"], defenses=["all"])
    validate_target(one)
    assert "ensemble" not in one.defenses and "ensemble-norm" not in one.defenses and "stability" in one.defenses
    with pytest.raises(AuditError, match="unknown defenses"):
        validate_target(Target(defenses=["moat"]))
    with pytest.raises(AuditError, match="ensemble-norm defense needs at least two"):
        validate_target(Target(interpreters=["cam"], defenses=["ensemble-norm"]))
    with pytest.raises(AuditError, match="smooth_sigma"):
        validate_target(Target(defenses=["smooth"], smooth_sigma=0.0))


ALL_CONFIG = """
name = "alldef"
batch_size = 4
bootstrap = 50
examples = 1
[[targets]]
model = "fmnist_resnet"
interpreters = ["cam", "rts"]
n = 4
attacks = ["pgd", "adv2", "adaptive"]
defenses = ["all"]
shorten = 50
calibration_n = 32
learned_n = 4
smooth_samples = 2
adaptive_interpreters = ["cam"]
"""


def test_audit_compares_every_defense_under_its_adaptive_attack(tmp_path):
    """Through the CLI: every defense gets a row for CAM (β-smoothing says it does not apply), scored under its
    own adaptive attack, with held-out FPR and ROC AUC for detectors and a map cost for map defenses; the
    verdict is in the terminal, the JSON and the HTML."""
    import json

    from tests.helpers import cli

    (tmp_path / "all.toml").write_text(ALL_CONFIG)
    r = cli("audit", "--config", "all.toml", "--out", "runs", cwd=tmp_path)
    assert r.returncode in (0, 3), r.stderr[-3000:]
    rep = json.loads((tmp_path / "runs" / "alldef" / "report.json").read_text())
    tg = next(iter(rep["targets"].values()))
    assert set(tg["detectors"]) == {"squeeze", "ensemble", "ensemble-norm", "stability", "learned"}
    assert tg["map_defenses"] == {"smooth": {"cam": "smooth:cam"}, "beta": {}, "rtsa": {}}
    assert tg["detectors"]["learned"]["fitted"]["train"]["attacked"] == 8  # PGD + ADV²-CAM of 4 calibration inputs
    cam = tg["summary"]["interpreters"]["cam"]
    rows = {row["defense"]: row for row in cam["comparison"]["rows"]}
    assert list(rows) == ["none", "squeeze", "ensemble", "ensemble-norm", "stability", "learned", "smooth", "beta",
                          "rtsa"]
    assert not rows["beta"]["applies"] and rows["beta"]["spoofability"] is None and not rows["rtsa"]["applies"]
    for d in ("squeeze", "ensemble", "ensemble-norm", "stability", "learned"):
        assert rows[d]["applies"] and 0 <= rows[d]["fpr_heldout"] <= 1, d
        assert rows[d]["auc_plain"] is None or 0 <= rows[d]["auc_plain"] <= 1
        assert rows[d]["spoofability"]["n"] == 4
    assert rows["smooth"]["fidelity_l1"]["mean"] > 0 and rows["smooth"]["cost"] == {"forwards": 0, "maps": 2}
    assert "certified" in cam["defense_info"]["smooth"]
    assert cam["comparison"]["verdict"]["text"]
    assert "defenses of cam" in r.stdout and cam["comparison"]["verdict"]["text"][:40] in r.stdout
    html_text = (tmp_path / "runs" / "alldef" / "report.html").read_text()
    assert "Defenses compared" in html_text and "ensemble-norm" in html_text


def test_docs_pages_are_generated_from_the_records():
    """Every generated page of docs/ is what benchmarks/docs.py makes of the records in benchmarks/results/."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "benchmarks/docs.py", "--check"], cwd=root, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_map_defenses_of_a_deployment(fmnist_resnet):
    """rtsa stands in for RTS where an RTS^A checkpoint exists; beta only for GRAD; smoothing wraps each."""
    from underfire.audit.deployment import build_deployment

    t = Target("fmnist_resnet", interpreters=["grad", "rts"], n=2, defenses=["smooth", "beta", "rtsa"],
               calibration_n=8)
    validate_target(t)
    dep = build_deployment(t, 0, torch.device("cpu"))
    assert {d: {n: it.name for n, it in m.items()} for d, m in dep.defended.items()} == {
        "smooth": {"grad": "smooth:grad", "rts": "smooth:rts"}, "beta": {"grad": "beta:grad"}, "rtsa": {"rts": "rtsa"}}


def test_one_interpreter_drops_the_presets_ensemble_with_a_note(capsys):
    """`underfire audit --interpreters cam` on a preset with an ensemble: it cannot apply to one interpreter,
    so it drops out with a note instead of ending in an error; a target without defenses named gets the
    defaults that apply."""
    from underfire.audit.cli import resolve_config

    cfg = resolve_config(None, "table9", {"interpreters": "cam"})
    assert cfg.targets[0].defenses == []
    assert "ensemble dropped" in capsys.readouterr().err
    cfg = resolve_config(None, None, {"interpreters": "grad"})  # the default's defenses need no second interpreter
    t = cfg.targets[0]
    assert t.defenses == ["squeeze", "smooth", "smooth+squeeze"] and t.adaptive_interpreters == ["grad"]
    assert "dropped" not in capsys.readouterr().err
    t = Target(interpreters=["gradcam"])
    validate_target(t)
    assert t.defenses == ["squeeze"]
    t = Target(interpreters=["grad", "cam"])
    validate_target(t)
    assert t.defenses == ["squeeze", "ensemble"]


def test_report_names_interpreters_without_a_defense_instead_of_empty_tables():
    """An interpreter whose defenses were not attacked gets no table of "not run" rows, but one line naming it;
    an interpreter with at least one defense run keeps its table."""
    from underfire.audit.defenses import compare
    from underfire.audit.metrics import rate
    from underfire.audit.report import _compared, _not_compared

    run = {"spoofability": rate(3, 8), "spoofability_squeeze": rate(1, 8), "defense_info": {}}
    skipped = {"spoofability": rate(2, 8), "defense_info": {}}
    ints = {"grad": {**run, "comparison": compare(run, ["squeeze", "smooth"], 0.05)},
            "rts": {**skipped, "comparison": compare(skipped, ["squeeze", "smooth"], 0.05)}}
    assert _compared(ints["grad"]) and not _compared(ints["rts"])
    line = _not_compared({"summary": {"interpreters": ints}})
    assert "rts" in line and "grad" not in line
    assert _not_compared({"summary": {"interpreters": {"grad": ints["grad"]}}}) is None


def test_generated_tables_inside_hand_written_pages_follow_their_records():
    """A generated block of a hand-written page is rewritten from its records (a stale body is replaced, the
    records' machine and date are named); shards pool by image count; an unknown kind is an error."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("docs_gen", root / "benchmarks" / "docs.py")
    d = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(d)
    rec = json.loads((d.RESULTS / "fmnist_resnet_benign.json").read_text())
    page = "intro\n<!-- generated: adv2 | fmnist_resnet_benign.json = ResNet -->\n| stale | 0.999 |\n<!-- end generated -->\nend\n"
    out = d.embedded(page)
    assert "stale" not in out and out.startswith("intro\n") and out.endswith("<!-- end generated -->\nend\n")
    assert f"| ResNet | GRAD | 200 |" in out and f"{rec['rows']['grad']['adv2_benign']['l1']:.3f}" in out
    assert rec["date"] in out and d.embedded(out) == out  # idempotent
    a, b = (json.loads((d.RESULTS / f"fmnist_densenet_mask_resolve4_track5_200_shard{s}.json").read_text())
            for s in (0, 100))
    pooled = d._pooled("fmnist_densenet_mask_resolve4_track5_200_shard0.json+"
                       "fmnist_densenet_mask_resolve4_track5_200_shard100.json")
    ma, mb = a["rows"]["mask"]["adv2_benign"], b["rows"]["mask"]["adv2_benign"]
    assert pooled["n"] == a["n"] + b["n"]
    assert pooled["rows"]["mask"]["adv2_benign"]["l1"] == pytest.approx(
        (ma["l1"] * ma["n"] + mb["l1"] * mb["n"]) / (ma["n"] + mb["n"]))
    with pytest.raises(SystemExit, match="unknown generated table kind"):
        d.embedded("<!-- generated: nonsense | fmnist_resnet_benign.json -->\n<!-- end generated -->")


def test_numbers_quoted_in_prose_follow_their_records():
    """A value marker's number is rewritten from its record (stale text replaced, idempotent); a wrong path or
    record is an error naming it; the suite-time record parses pytest's summary line."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    d = {}
    for name in ("docs", "suite_time"):
        spec = importlib.util.spec_from_file_location(f"{name}_gen", root / "benchmarks" / f"{name}.py")
        d[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(d[name])
    docs = d["docs"]
    rec = json.loads((docs.RESULTS / "default_report.json").read_text())
    page = "took <!-- v default_report.json seconds .1f -->999<!-- /v --> s, top-1 " \
           "<!-- v fmnist_resnet.pt metrics/test_top1 .1% -->1%<!-- /v -->."
    out = docs.quoted(page)
    assert f"-->{rec['seconds']:.1f}<!-- /v --> s" in out and "999" not in out and docs.quoted(out) == out
    assert "-->1%<" not in out
    with pytest.raises(SystemExit, match="no 'nope'"):
        docs.quoted("<!-- v default_report.json targets/nope .0% -->1<!-- /v -->")
    with pytest.raises(SystemExit, match="does not exist"):
        docs.quoted("<!-- v missing.json seconds .0f -->1<!-- /v -->")
    assert docs.formatted(629.4, "minsec") == "10 min 29 s"
    assert any(p.startswith("seconds ") for p in docs.find("default_report.json", f"{rec['seconds']:.1f}"))
    s = d["suite_time"].summary("x\n==== 319 passed, 2 skipped, 1 failed in 629.12s (0:10:29) ====\n")
    assert s == {"passed": 319, "skipped": 2, "failed": 1, "seconds_tests": 629.12}
    assert d["suite_time"].summary("no pytest here") == {}


def test_undefended_spoofability_counts_every_attack_on_the_undefended_map():
    """A detector leaves the map as it is, so an input its adaptive ADV² spoofed (c_t, map within τ) is spoofed
    on the undefended deployment too: the undefended rate is the union over ADV² and every adaptive ADV², never
    below a detector's row; re-aggregating a saved record reproduces everything else of its summary."""
    import copy
    from pathlib import Path

    from underfire.audit.aggregate import reaggregate

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "defenses_fmnist_resnet_report.json"
    saved = json.loads(path.read_text())
    again = reaggregate(copy.deepcopy(saved))
    for name, a in again["targets"]["fmnist_resnet@fashion-mnist"]["summary"]["interpreters"].items():
        per, tau = saved["targets"]["fmnist_resnet@fashion-mnist"]["records"]["interpreters"][name], a["tau"]
        attacks = [k for k in per if k == "adv2" or k.startswith("adaptive-")]
        assert any(k.startswith("adaptive-") for k in attacks)
        union = [any(per[k]["success"][i] and per[k]["l1"][i] <= tau for k in attacks) for i in range(48)]
        assert a["spoofability"]["k"] == sum(union)
        for d in ("squeeze", "ensemble-norm", "stability", "learned"):
            assert a[f"spoofability_{d}"]["k"] <= a["spoofability"]["k"]
        old = saved["targets"]["fmnist_resnet@fashion-mnist"]["summary"]["interpreters"][name]
        assert a["adv2"] == old["adv2"] and a["tau"] == old["tau"]


def test_a_comparison_merged_from_several_records():
    """The `comparison` table merges the defenses of records of the same deployment and images (every defense
    once; undefended = any record's attack on the undefended map spoofed the input), recomputes the verdict
    over all rows, and refuses records of other inputs."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("docs_gen", root / "benchmarks" / "docs.py")
    d = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(d)
    a, b = "defenses_fmnist_resnet_combined_report.json", "defenses_fmnist_resnet_report.json"
    out = d.embedded(f"<!-- generated: comparison | {a} | {b} -->\n<!-- end generated -->")
    grad = out[out.index("**GRAD**"):out.index("**CAM**")]
    rows = [ln.split(" | ")[0].strip("| ") for ln in grad.splitlines() if ln.startswith("| ") and "---" not in ln][1:]
    assert rows[0] == "none" and len(rows) == len(set(rows))
    assert {"squeeze", "smooth", "smooth+squeeze", "ensemble-norm", "stability", "learned", "beta"} <= set(rows)
    # the lowest of the merged rows, from the first record; both records ran one attack per row (quick): not credited
    assert "lowest measured: smooth+squeeze" in grad and "no defense is credited" in grad
    from underfire.audit.aggregate import spoofed_inputs

    cam = [json.loads((d.RESULTS / f).read_text())["targets"]["fmnist_resnet@fashion-mnist"] for f in (a, b)]
    per = [spoofed_inputs(t["records"]["interpreters"]["cam"], t["summary"]["interpreters"]["cam"]["tau"]) for t in cam]
    union = [any(any(s[i] for s in p.values()) for p in per) for i in range(48)]
    k = sum(union)
    assert k >= max(t["summary"]["interpreters"]["cam"]["spoofability"]["k"] for t in cam)
    cam_table = out[out.index("**CAM**"):]
    assert f"| none | {k / 48:.0%} [" in cam_table  # the undefended row is the union over both records
    with pytest.raises(SystemExit, match="same 48 inputs"):
        d.embedded(f"<!-- generated: comparison | {a} | defenses_fmnist_resnet_combined_200_report.json -->\n"
                   "<!-- end generated -->")


def test_a_map_defense_combined_with_a_detector(tmp_path):
    """smooth+squeeze: the smoothed map's EOT attack carries the squeezing hinge, a spoof must be within the
    smoothed map's τ AND undetected (recounted here from the per-sample records), its cost adds both parts, its
    held-out FPR is the detector's; combinations that are not <map>+<detector> are refused by name."""
    from underfire.audit.config import AuditConfig
    from underfire.audit.runner import run_audit

    t = Target("fmnist_resnet", interpreters=["grad"], n=4, attacks=["pgd", "adv2", "adaptive"],
               defenses=["smooth+squeeze"], shorten=50, calibration_n=32, smooth_samples=2)
    rep = run_audit(AuditConfig(name="combo", batch_size=4, bootstrap=10, examples=0, targets=[t]), tmp_path)
    (tg,) = rep["targets"].values()
    assert set(tg["detectors"]) == {"squeeze"} and tg["map_defenses"] == {"smooth": {"grad": "smooth:grad"}}
    rec = tg["records"]["interpreters"]["grad"]["defense-smooth+squeeze"]
    a = tg["summary"]["interpreters"]["grad"]
    info = a["defense_info"]["smooth+squeeze"]
    tau = info["tau"]
    decision = tg["detectors"]["squeeze"]["decision"]
    expect = sum(bool(s) and d <= tau and not f
                 for s, d, f in zip(rec["success"], rec["l1"], rec["detected"]["squeeze"][decision]))
    assert a["spoofability_smooth+squeeze"]["k"] == expect and a["spoofability_smooth+squeeze"]["n"] == 4
    assert info["cost"] == {"forwards": 7, "maps": 2} and info["fpr_heldout"] is not None
    row = next(r for r in a["comparison"]["rows"] if r["defense"] == "smooth+squeeze")
    assert row["applies"] and row["fpr_heldout"] == info["fpr_heldout"]
    for bad in ("squeeze+smooth", "smooth+ensemble", "smooth+nope", "smooth+squeeze+stability"):
        with pytest.raises(AuditError, match="combined defense|unknown defenses"):
            validate_target(Target("fmnist_resnet", interpreters=["grad", "cam"], defenses=[bad]))
