"""The deployed interpreters behind wrappers: the reference libraries' adapters against their native twins,
black-box (opaque) views, a team's own entry point, and the sampled views an attacker optimises."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from underfire.guard.registry import twin_of
from underfire.guard.registry import build_interpreter
from underfire.guard.interpreters.base import InterpreterError
from tests.conftest import tiny_classifier



ADAPTERS = ("gradcam:GradCAM", "gradcam:GradCAMPlusPlus", "captum:IntegratedGradients", "captum:Saliency",
            "captum:InputXGradient", "captum:Occlusion")


def test_adapters_match_their_native_twins_and_carry_no_gradient(fmnist_resnet, fmnist_small):
    from underfire.guard.adapters import Transfer

    x = fmnist_small[0][:4]
    for name in ADAPTERS:
        a = build_interpreter(name, fmnist_resnet)
        twin = twin_of(a, fmnist_resnet)
        mine, ref = a(x).saliency, twin(x).saliency
        assert mine.shape == ref.shape, name
        for u, v in zip(mine, ref):
            assert np.corrcoef(u.ravel(), v.ravel())[0, 1] > 0.98, name
        xg = x.clone().requires_grad_(True)
        assert not a(xg).saliency.requires_grad, name  # the library computes without a graph to x
        tr = Transfer(twin, a)
        assert tr.name == name and tr(xg).saliency.requires_grad  # the attacker's view: the twin
        assert torch.equal(tr(x).saliency, mine)  # everything else: the real map
    with pytest.raises(InterpreterError, match="no method"):
        build_interpreter("captum:NoSuchMethod", fmnist_resnet)
    with pytest.raises(InterpreterError, match="name a method"):
        build_interpreter("gradcam:", fmnist_resnet)
    assert build_interpreter("captum:FeatureAblation", fmnist_resnet).twin is None


def test_opaque_serves_a_native_map_as_a_black_box(fmnist_resnet, fmnist_small):
    """opaque:<name> answers with <name>'s own map and no gradient; @<surrogate> names the twin a transfer
    attack optimises, whose map the attacker's view brings to the real map's resolution (CAM 7² → MASK 14²)."""
    from underfire.guard.adapters import Transfer

    x = fmnist_small[0][:2]
    op = build_interpreter("opaque:mask@cam", fmnist_resnet)
    assert (op.name, op.twin) == ("opaque:mask@cam", "cam")
    assert torch.equal(op(x).saliency, build_interpreter("mask", fmnist_resnet)(x).saliency)
    xg = x.clone().requires_grad_(True)
    assert not op(xg).saliency.requires_grad
    view = Transfer(twin_of(op, fmnist_resnet), op)
    s = view(xg).saliency
    assert s.requires_grad and tuple(s.shape[-2:]) == op.native_size((28, 28)) == (14, 14)
    assert build_interpreter("opaque:grad", fmnist_resnet).twin is None
    assert twin_of(build_interpreter("opaque:cam@occlusion", fmnist_resnet), fmnist_resnet).name == "occlusion"
    for bad in ("opaque:captum:Saliency", "opaque:grad@opaque:cam", "opaque:"):
        with pytest.raises(InterpreterError):
            build_interpreter(bad, fmnist_resnet)


def test_audit_of_an_adapter_is_a_transfer_result_judged_by_the_real_map(tmp_path):
    """pytorch-grad-cam's GradCAM has no gradient: the audit attacks its native twin, judges with its own
    map, says so, counts the real map's reads as queries, and reports a lower bound (not refused, not
    reported safe for lack of a gradient). An adapter without a twin (captum's FeatureAblation) is attacked by
    queries only, and left out of the detectors an adaptive attack must optimise through."""
    from underfire.audit.config import AuditConfig, AuditRefused, Target
    from underfire.audit.deployment import build_deployment
    from underfire.audit.runner import run_audit

    cfg = AuditConfig(name="t", batch_size=4, bootstrap=20, examples=0, targets=[
        Target("fmnist_resnet", interpreters=["gradcam:GradCAM"], n=4, attacks=["pgd", "adv2"], defenses=[],
               shorten=50)])
    rep = run_audit(cfg, tmp_path)
    tg = next(iter(rep["targets"].values()))
    assert tg["transfer"] == {"gradcam:GradCAM": "gradcam"}
    assert any(w.startswith("TRANSFER") for w in tg["warnings"])
    a = tg["summary"]["interpreters"]["gradcam:GradCAM"]
    assert a["spoofability"]["n"] == 4 and a["adv2"]["asr"]["mean"] >= 0.5
    assert tg["attacks"]["adv2-gradcam:GradCAM"]["interpreter"] == "gradcam"
    assert "transfer from the native twin gradcam" in a["lower_bound"] and rep["headline"]["lower_bound"]
    assert a["adv2"]["queries"]["spent_max"] > 0  # the transfer's judgements read the real map
    t = Target("fmnist_resnet", interpreters=["captum:FeatureAblation", "grad", "cam"], n=2,
               attacks=["pgd", "adv2"], defenses=["squeeze", "ensemble"])
    dep = build_deployment(t, 0, torch.device("cpu"))
    assert dep.opaque == {"captum:FeatureAblation"} and t.ensemble_members == ["grad", "cam"]
    assert any(w.startswith("BLACK BOX: the captum:FeatureAblation map") for w in dep.warnings)
    t = Target("fmnist_resnet", interpreters=["captum:FeatureAblation", "grad"], n=2, defenses=["ensemble"],
               ensemble_members=["captum:FeatureAblation", "grad"])
    with pytest.raises(AuditRefused, match="have no gradient"):
        build_deployment(t, 0, torch.device("cpu"))


TEAM_MODULE = '''
import torch
from underfire.guard.models import load_model
from underfire.guard.registry import build_interpreter


def build():
    model = load_model("fmnist_resnet")

    def edges(x, target):  # the team's own map: |x * d z_t / dx|, with a graph when x has one
        xg = x if x.requires_grad else x.detach().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(model(xg).gather(1, target[:, None]).sum(), xg, create_graph=x.requires_grad)
        return torch.nn.functional.avg_pool2d((xg * g).abs(), 4)

    return model, {"edges": edges, "mycam": build_interpreter("cam", model)}


def bad_map():
    return load_model("fmnist_resnet"), {"flat": lambda x, t: x.flatten(1)}


def bad_value():
    return load_model("fmnist_resnet"), {"num": 3}
'''


def test_an_entry_point_hands_over_its_own_interpreters(tmp_path, monkeypatch):
    from underfire.audit.config import Target, validate_target
    from underfire.audit.deployment import build_deployment
    from underfire.guard.interpreters.base import FunctionInterpreter
    from underfire.guard.errors import ModelError
    from underfire.guard.models import load_model

    (tmp_path / "teammodels.py").write_text(TEAM_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    model = load_model("teammodels:build")
    assert set(model.provided_interpreters) == {"edges", "mycam"}
    t = Target("teammodels:build", interpreters=["edges", "mycam", "grad"], n=2, attacks=["pgd", "adv2"],
               defenses=[])
    validate_target(t)
    dep = build_deployment(t, 0, torch.device("cpu"))  # the pre-flight finds a gradient through `edges`
    edges = dep.interpreters["edges"]
    assert isinstance(edges, FunctionInterpreter) and edges.native_size((28, 28)) == (7, 7)
    assert dep.interpreters["mycam"] is dep.model.provided_interpreters["mycam"]
    xg = dep.x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(edges(xg).saliency.sum(), xg)
    assert float(g.abs().sum()) > 0
    # end to end: the audit attacks the team's map through the one loop and reports it by its name
    from underfire.audit.config import AuditConfig
    from underfire.audit.runner import run_audit

    rep = run_audit(AuditConfig(name="ep", batch_size=2, bootstrap=10, examples=0, targets=[
        Target("teammodels:build", interpreters=["edges"], n=2, attacks=["pgd", "adv2"], defenses=[], shorten=50)]),
        tmp_path / "runs")
    a = next(iter(rep["targets"].values()))["summary"]["interpreters"]["edges"]
    assert a["adv2"]["asr"]["n"] == 2 and a["spoofability"]["n"] == 2
    with pytest.raises(InterpreterError, match="shape"):
        load_model("teammodels:bad_map").provided_interpreters["flat"](dep.x)
    with pytest.raises(ModelError, match="expected an Interpreter or a callable"):
        load_model("teammodels:bad_value")


def test_sampled_views_estimate_the_whole_map():
    """An attacker may optimise IG / SmoothGrad from a few of their samples per step (attack_samples): IG's
    jittered path points are a stratified Monte-Carlo estimate of the path integral (their mean over many
    calls is the many-point Riemann sum), fresh at each call; a smoothed map's view only draws fewer copies."""
    model = tiny_classifier()
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64)
    ig = build_interpreter("ig", model, steps=16)
    assert ig.sampled(16) is None and ig.sampled(32) is None  # no cheaper view with as many points
    view = ig.sampled(2)
    assert (view.steps, view.jitter, view.model, ig.steps, ig.jitter) == (2, True, model, 16, False)
    t = model(x).argmax(1)

    def att(it):
        return it.attribution(x.clone().requires_grad_(True), t, False)[1].detach()
    first, second = att(view), att(view)
    assert not torch.allclose(first, second)  # fresh path points at every call
    torch.manual_seed(0)
    mean = sum(att(view) for _ in range(400)) / 400
    fine = att(build_interpreter("ig", model, steps=256))
    coarse = att(build_interpreter("ig", model, steps=2))  # the midpoints: biased
    err = float((mean - fine).norm() / fine.norm())
    assert err < 0.05 and err < 0.5 * float((coarse - fine).norm() / fine.norm()), err
    sg = build_interpreter("smoothgrad", model)
    v = sg.sampled(2)
    assert (v.samples, v.sigma, v.clip, v.base, sg.samples) == (2, sg.sigma, sg.clip, sg.base, 16)
    assert sg.sampled(16) is None and build_interpreter("grad", model).sampled(2) is None
    assert sg.sampled(48).samples == 48 and sg.samples == 16  # a random map also has a finer view


def test_an_audit_attacks_the_sampled_view_and_judges_the_deployed_map(tmp_path, monkeypatch):
    """attack_samples: ADV²'s differentiable calls go to the sampled view (2 path points), every judgement and
    the record to the deployed 8-point IG; the report says so. An interpreter without samples is untouched."""
    from underfire.audit.config import AuditConfig, AuditError, Target
    from underfire.audit.deployment import build_deployment
    from underfire.audit.runner import run_audit
    from underfire.guard.interpreters.gradients import IntegratedGradients

    seen = []
    orig = IntegratedGradients.attribution

    def spy(self, xg, target, second_order):
        seen.append((self.steps, second_order))
        return orig(self, xg, target, second_order)

    monkeypatch.setattr(IntegratedGradients, "attribution", spy)
    t = Target("fmnist_resnet", interpreters=["ig", "cam"], n=2, attacks=["adv2"], defenses=[], shorten=100,
               attack_samples=2)
    dep = build_deployment(t, 0, torch.device("cpu"))
    assert set(dep.views) == {"ig"} and dep.views["ig"].real is dep.interpreters["ig"]
    assert any(w.startswith("SAMPLED: ADV² against ig optimises a 2-sample") for w in dep.warnings)
    with pytest.raises(AuditError, match="attack_samples"):
        run_audit(AuditConfig(name="bad", targets=[Target("fmnist_resnet", attack_samples=0)]), tmp_path / "bad")
    seen.clear()
    rep = run_audit(AuditConfig(name="s", batch_size=2, bootstrap=10, examples=0, targets=[
        Target("fmnist_resnet", interpreters=["ig"], n=2, attacks=["adv2"], defenses=[], shorten=100,
               attack_samples=2, adv2_options={"check_every": 1})]), tmp_path)
    grads = [s for s, second in seen if second]  # the attacker's gradients: the 2-point view (the pre-flight
    assert grads.count(2) >= 7 and set(grads) <= {2, 16} and grads.count(16) <= 1  # probes the real map once;
    # ≥ 7: one per joint step of GRAD's preset ÷100)
    assert {s for s, second in seen if not second} == {build_interpreter("ig", dep.model).steps}  # judgements
    tg = next(iter(rep["targets"].values()))
    assert rep["config"]["targets"][0]["attack_samples"] == 2 and any("SAMPLED" in w for w in tg["warnings"])
