"""The interpreters teams deploy: Grad-CAM, Grad-CAM++, Input×Gradient, Integrated Gradients — checked
against the reference libraries (captum, pytorch-grad-cam) on real models, and their second-order gradient."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from underfire.attacks.adv2 import PGD, make_adv2
from underfire.attacks.targets import benign_maps, target_classes
from underfire.audit.metrics import l1
from underfire.guard.registry import twin_of
from underfire.guard.registry import build_interpreter
from underfire.guard.interpreters.base import InterpreterError
from underfire.guard.interpreters.gradcam import feature_layers
from tests.conftest import tiny_classifier

NEW = ("gradcam", "gradcampp", "inputxgrad", "ig", "occlusion")


def test_ig_and_input_x_gradient_equal_captum(fmnist_resnet, fmnist_small):
    from captum.attr import InputXGradient, IntegratedGradients

    x = fmnist_small[0][:6]
    pred = fmnist_resnet(x).argmax(1)
    for name, ref in (("ig", IntegratedGradients(fmnist_resnet).attribute(x, target=pred, n_steps=16,
                                                                          method="riemann_middle")),
                      ("inputxgrad", InputXGradient(fmnist_resnet).attribute(x.clone().requires_grad_(True),
                                                                             target=pred))):
        it = build_interpreter(name, fmnist_resnet)
        with torch.enable_grad():
            _, ours = it.attribution(x.clone().requires_grad_(True), None, False)
        assert torch.allclose(ours, ref.detach(), atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("model_name", ["fmnist_resnet", "mobilenet"])
def test_gradcam_family_equals_pytorch_grad_cam(model_name, request, fmnist_small, photo_batch):
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = request.getfixturevalue(model_name)
    x = fmnist_small[0][:4] if model_name == "fmnist_resnet" else photo_batch[0][:2]
    pred = model(x).argmax(1)
    for ours, theirs in (("gradcam", GradCAM), ("gradcampp", GradCAMPlusPlus)):
        it = build_interpreter(ours, model)
        with theirs(model=model, target_layers=[dict(model.named_modules())[it.layer_name]]) as cam:
            ref = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in pred])  # (B, H, W), resized
        mine = it.upsample(it(x).saliency, x.shape[-2:])[:, 0].numpy()
        for a, b in zip(mine, ref):
            assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.995, (model_name, ours)


def test_default_layer_is_the_last_conv_block(mobilenet, fmnist_resnet):
    assert build_interpreter("gradcam", mobilenet).layer_name.endswith("features")
    assert build_interpreter("gradcam", mobilenet).native_size((224, 224)) == (7, 7)
    names = [n for n, _ in feature_layers(fmnist_resnet)]
    assert build_interpreter("gradcam", fmnist_resnet).layer_name == names[-1]
    mid = names[len(names) // 2]
    assert build_interpreter("gradcam", fmnist_resnet, layer=mid).layer_name == mid
    with pytest.raises(InterpreterError, match="no layer named"):
        build_interpreter("gradcam", fmnist_resnet, layer="nope")


@pytest.mark.parametrize("name", NEW)
def test_new_interpreters_keep_the_contract_and_have_a_second_order_gradient(name):
    model = tiny_classifier()
    it = build_interpreter(name, model)
    x = torch.rand(3, 1, 28, 28, dtype=torch.float64)
    e = it(x)
    assert e.saliency.shape == (3, 1, *it.native_size((28, 28))) and e.logits.shape == (3, 10)
    assert float(e.saliency.min()) >= 0 and float(e.saliency.max()) <= 1 and not e.saliency.requires_grad
    assert torch.equal(e.logits.argmax(1), model(x).argmax(1))
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(it(xg).saliency.pow(2).sum(), xg)
    assert torch.isfinite(g).all() and float(g.abs().sum()) > 0
    assert not model.training and all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("model_name", ["fmnist_resnet", "mobilenet"])
def test_occlusion_equals_captum_and_its_gradient_is_exact(model_name, request, fmnist_small, photo_batch):
    """Native occlusion = captum's Occlusion (window 1/7 of the side, stride half of it, baseline 0) after the
    same post-processing, to float precision; with other windows too. Its gradient (a difference of the
    model's logits: no surrogate) matches central differences of the map along random directions."""
    model = request.getfixturevalue(model_name)
    x = fmnist_small[0][:4] if model_name == "fmnist_resnet" else photo_batch[0][:1]
    s, st = (5, 2) if model_name == "fmnist_resnet" else (64, 28)  # windows whose last position is cut at the
    other = {"sliding_window_shapes": (x.shape[1], s, s), "strides": (x.shape[1], st, st)}  # border, as captum's
    for kw in ({}, other) if model_name == "fmnist_resnet" else (other,):  # MobileNetV2: 49 windows, CI time
        adapter = build_interpreter("captum:Occlusion", model, **kw)
        twin = twin_of(adapter, model)
        assert twin.name == "occlusion" and (twin.window, twin.stride) == ((s, st) if kw else (None, None))
        ref, mine = adapter(x).saliency, twin(x).saliency
        assert torch.allclose(mine, ref, atol=1e-4), float((mine - ref).abs().max())
    if model_name != "fmnist_resnet":
        return
    model = tiny_classifier()
    it = build_interpreter("occlusion", model)
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 0.8 + 0.1
    w = torch.rand(2, 1, 7, 7, dtype=torch.float64)
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad((it(xg).saliency * w).sum(), xg)
    for seed in range(3):
        v = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(seed))
        h = 1e-7  # the tiny net's ReLU kinks make the map piecewise smooth: a small step, a 0.1% tolerance
        fd = ((it(x + h * v).saliency - it(x - h * v).saliency) * w).sum() / (2 * h)
        assert abs(float(fd) - float((g * v).sum())) <= 1e-3 * max(1.0, abs(float(fd))), (float(fd), float((g * v).sum()))
    with pytest.raises(InterpreterError, match="larger than"):
        build_interpreter("occlusion", model, window=40)(x)


def test_smoothgrad_is_smoothed_grad_with_its_papers_noise():
    from underfire.guard.smoothing import Smoothed

    sg = build_interpreter("smoothgrad", tiny_classifier())
    assert isinstance(sg, Smoothed) and sg.name == "smoothgrad" and sg.base.name == "grad"
    assert (sg.sigma, sg.samples) == (0.15, 16)
    assert make_adv2("smoothgrad", 8 / 255, "short").min_confidence == 0.8  # GRAD's preset


def test_smoothgrad_agrees_with_captum_noise_tunnel(fmnist_resnet, fmnist_small):
    """SmoothGrad as captum's NoiseTunnel(Saliency) computes it (unclipped Gaussian copies, σ = 0.15): with
    enough copies both estimate the same expectation; same post-processing (max over channels, 4×4 average
    pool, min–max), Pearson r ≥ 0.99 per image on the logit gradient. Clipping the copies to [0, 1] (the
    smoothing defense's convention) gives r ≈ 0.3–0.8 on this data, so the check tells the two apart."""
    import torch.nn.functional as F
    from captum.attr import NoiseTunnel, Saliency

    from underfire.guard.interpreters.base import minmax
    from underfire.guard.smoothing import Smoothed

    x = fmnist_small[0][:6]
    pred = fmnist_resnet(x).argmax(1)
    torch.manual_seed(0)
    ref = NoiseTunnel(Saliency(fmnist_resnet)).attribute(x, nt_type="smoothgrad", nt_samples=256, stdevs=0.15,
                                                         target=pred, abs=True)
    ref = minmax(F.avg_pool2d(ref.amax(1, keepdim=True), 4)).flatten(1)
    sg = build_interpreter("smoothgrad", fmnist_resnet, samples=256)
    ours = Smoothed(build_interpreter("grad", fmnist_resnet, loss="logit"), sg.sigma, 256, clip=sg.clip)(x, pred)
    r = [float(torch.corrcoef(torch.stack([a, b]))[0, 1]) for a, b in zip(ours.saliency.flatten(1), ref)]
    assert min(r) >= 0.99, r


def test_ig_settings():
    model = tiny_classifier()
    with pytest.raises(InterpreterError, match="path step"):
        build_interpreter("ig", model, steps=0)
    with pytest.raises(InterpreterError, match="baseline"):
        build_interpreter("ig", model, baseline="white")
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64)
    black, blurred = build_interpreter("ig", model)(x).saliency, build_interpreter("ig", model, baseline="blur")(x).saliency
    assert not torch.allclose(black, blurred)


@pytest.mark.parametrize("name", ["gradcam", "ig"])
def test_adv2_moves_the_new_maps_towards_the_benign_one(name, fmnist_resnet, fmnist_test):
    """Through the one loop with the preset it takes (CAM's for Grad-CAM, GRAD's for IG): ADV² reaches the
    target class with a map closer to the benign one than PGD's."""
    it = build_interpreter(name, fmnist_resnet, **({"steps": 4} if name == "ig" else {}))  # 4 path steps: CI time
    x, y = fmnist_test.tensors[0][:8], fmnist_test.tensors[1][:8]
    y_t = target_classes(y, 10, torch.Generator().manual_seed(0))
    bm = benign_maps(it, x)
    p = PGD(24 / 255, steps=125)(it, x, y_t)
    a = make_adv2(name, 24 / 255, "short", shorten=8)(it, x, y_t, bm)
    assert a.success.float().mean() >= 0.75
    ok = a.success & p.success
    l1_p = float(l1(it(p.x_adv).saliency, bm)[ok].mean())
    l1_a = float(l1(it(a.x_adv).saliency, bm)[ok].mean())
    assert l1_a < 0.8 * l1_p, (l1_a, l1_p)


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
