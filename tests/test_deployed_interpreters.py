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
