"""The Interpreter contract, table-driven over the registry, plus each interpreter's own claims."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from underfire.attacks.adv2 import PAPER, Adv2
from underfire.attacks.threats import AttackError
from underfire.guard.adapters import Transfer
from underfire.guard.ensemble import InterpreterEnsemble
from underfire.guard.interpreters import CAM, REGISTRY, RTS, RTSA, GradSaliency, InterpreterError, Mask, register
from underfire.guard.interpreters.base import FunctionInterpreter
from underfire.guard.registry import build_interpreter, traits_of
from underfire.guard.models import ImageClassifier, load_model
from tests.conftest import tiny_classifier

def _team_map(x, t):
    """A team's own map as a callable (x, target) -> (B, h, w): differentiable, and it depends on the class."""
    return (x * (t.view(-1, 1, 1, 1).to(x.dtype) + 1)).sin().mean(1)


# The contract table: cheap settings per interpreter, for mechanics on tiny models — every registered entry and
# every wrapper and adapter (smoothing, ensembles, adapters, black-box views, a team's callable). A new
# interpreter adds one row here. Random maps run with σ = 0 here (their noise is tested in test_smoothing.py).
CHEAP = {
    "grad": lambda m: GradSaliency(m),
    "cam": lambda m: CAM(m),
    "mask": lambda m: Mask(m, steps=8, unroll=2, l1=0.0, tv=0.0),  # random nets: let p(t) drive the mask
    "rts": lambda m: RTS.untrained(m, width=8),
    "rtsa": lambda m: RTSA.untrained(m, width=8),
    "gradcam": lambda m: build_interpreter("gradcam", m),
    "gradcampp": lambda m: build_interpreter("gradcampp", m),
    "inputxgrad": lambda m: build_interpreter("inputxgrad", m),
    "ig": lambda m: build_interpreter("ig", m, steps=4),
    "occlusion": lambda m: build_interpreter("occlusion", m, window=7, stride=7),  # 16 windows
    "smoothgrad": lambda m: build_interpreter("smoothgrad", m, sigma=0.0, samples=2),
    "beta:grad": lambda m: build_interpreter("beta:grad", m),
    # wrappers and adapters
    "smooth:cam": lambda m: build_interpreter("smooth:cam", m, sigma=0.0, samples=2),
    "ensemble": lambda m: InterpreterEnsemble([GradSaliency(m), CAM(m)]),
    "captum:Saliency": lambda m: build_interpreter("captum:Saliency", m),
    "gradcam:GradCAM": lambda m: build_interpreter("gradcam:GradCAM", m),
    "opaque:cam": lambda m: build_interpreter("opaque:cam", m),
    "transfer": lambda m: Transfer(GradSaliency(m, loss="logit"), build_interpreter("captum:Saliency", m)),
    "function": lambda m: FunctionInterpreter(m, _team_map, "team"),
}


def test_every_registered_interpreter_is_in_the_table():
    assert set(REGISTRY) <= set(CHEAP)


def test_every_name_declares_traits_the_attacks_know():
    """A registered interpreter names its ADV² preset (no silent fallback); prefixed names derive theirs."""
    for name in [*REGISTRY, "smooth:cam", "captum:Saliency", "gradcam:GradCAM", "opaque:mask@cam", "opaque:mask"]:
        tr = traits_of(name)
        assert tr.preset in PAPER or tr.preset == "mask", (name, tr)
        assert tr.label
    assert traits_of("mask").iterative and not traits_of("cam").iterative
    assert traits_of("smooth:cam").random and traits_of("smooth:cam").preset == "cam"
    assert traits_of("captum:IntegratedGradients").preset == "grad"
    assert traits_of("opaque:mask@cam").preset == "cam"  # attacked through its surrogate
    with pytest.raises(InterpreterError, match="smoothing wraps a one-pass"):
        traits_of("smooth:mask")
    with pytest.raises(AttackError, match="no ADV² preset"):
        Adv2("ensemble")


def test_a_name_registered_twice_is_refused():
    with pytest.raises(InterpreterError, match="registered twice"):
        register("cam", preset="cam")(type("OtherCAM", (CAM,), {}))
    assert REGISTRY["cam"].factory is CAM


def _x(b=3, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 1, 28, 28, generator=g, dtype=dtype)


@pytest.mark.parametrize("name", sorted(CHEAP))
def test_shapes_range_and_native_size(name, tiny):
    interp = CHEAP[name](tiny)
    x = _x()
    e = interp(x)
    assert e.logits.shape == (3, 10)
    assert e.saliency.shape == (3, 1, *interp.native_size((28, 28)))
    assert float(e.saliency.min()) >= 0 and float(e.saliency.max()) <= 1
    torch.testing.assert_close(e.logits, tiny(x), rtol=1e-9, atol=1e-9)
    up = interp.upsample(e.saliency, (28, 28))
    assert up.shape == (3, 1, 28, 28)


@pytest.mark.parametrize("name", sorted(CHEAP))
def test_target_none_means_argmax(name, tiny):
    interp = CHEAP[name](tiny)
    x = _x()
    e0 = interp(x)
    e1 = interp(x, e0.logits.argmax(1))
    torch.testing.assert_close(e0.saliency, e1.saliency, rtol=0, atol=1e-10)
    other = (e0.logits.argmax(1) + 1) % 10
    assert not torch.allclose(interp(x, other).saliency, e0.saliency)


@pytest.mark.parametrize("name", sorted(CHEAP))
def test_one_image_does_not_depend_on_the_others(name, tiny):
    interp = CHEAP[name](tiny)
    x = _x(4)
    alone = interp(x[1:2]).saliency
    together = interp(x).saliency[1:2]
    x2 = x.clone()
    x2[0] = torch.rand_like(x2[0])
    changed_neighbour = interp(x2).saliency[1:2]
    torch.testing.assert_close(together, alone, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(changed_neighbour, alone, rtol=1e-6, atol=1e-8)


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


@pytest.mark.parametrize("name", sorted(CHEAP))
def test_state_untouched_and_no_hooks_even_after_exception(name):
    model = tiny_classifier()
    interp = CHEAP[name](model)
    model.net.fc.weight.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    hooks = _hooks(model)
    interp(_x(2))
    assert not model.training and [p.requires_grad for p in model.parameters()] == flags
    assert _hooks(model) == hooks

    model.train()  # a caller's training mode must survive the call too
    interp(_x(2))
    assert model.training
    model.eval()

    calls = {"n": 0}

    def boom(*_):
        calls["n"] += 1
        raise RuntimeError("boom")

    h = model.net.fc.register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        interp(_x(2))
    h.remove()
    assert calls["n"] == 1
    assert not model.training and [p.requires_grad for p in model.parameters()] == flags
    assert _hooks(model) == hooks


class _SmoothNet(nn.Module):
    """A tiny net with smooth activations and a GAP + linear head: for second-order gradchecks."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(1, 3, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(4, 5)

    def cam_features(self, x):
        return torch.tanh(self.conv2(F.softplus(self.conv1(x))))

    def forward(self, x):
        return self.fc(self.cam_features(x).mean((2, 3)))


GRADCHECK = {
    "grad": lambda m: GradSaliency(m, pool=2, surrogate=None),
    "cam": lambda m: CAM(m),
    "mask": lambda m: Mask(m, steps=0, unroll=2, deterministic=True, mask_size=4, lr=0.05),
}


@pytest.mark.parametrize("name", sorted(GRADCHECK))
def test_gradcheck_tiny_float64(name):
    net = _SmoothNet().double()
    model = ImageClassifier(net, (0.5,), (0.5,), name="smooth", input_size=(1, 8, 8),
                            categories=list("abcde")).double()
    interp = GRADCHECK[name](model)
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64).clamp(0.05, 0.95).requires_grad_(True)
    t = torch.tensor([1, 3])
    assert torch.autograd.gradcheck(lambda v: interp(v, t).saliency, (x,), eps=1e-6, atol=1e-5, rtol=1e-3)


def test_gradcheck_rts_tiny_float64(tiny):
    interp = RTS.untrained(tiny, width=4)
    x = _x(1).requires_grad_(True)
    t = torch.tensor([2])
    fn = lambda v: interp(v.clamp(0, 1), t).saliency[..., 2:5, 2:5]  # noqa: E731 (a 3×3 window keeps it fast)
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-5, rtol=1e-3)


# ------------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CHEAP))
@pytest.mark.parametrize(
    "bad, msg",
    [
        (torch.rand(1, 28, 28, dtype=torch.float64), "shape"),
        (torch.rand(2, 3, 28, 28, dtype=torch.float64), "channels"),
        (torch.rand(2, 1, 28, 28, dtype=torch.float64) * 255, r"\[0, 1\]"),
        (torch.full((2, 1, 28, 28), float("nan"), dtype=torch.float64), "NaN"),
        (torch.zeros(0, 1, 28, 28, dtype=torch.float64), "empty"),
    ],
)
def test_bad_input_gets_a_clear_error(name, bad, msg, tiny):
    with pytest.raises(InterpreterError, match=msg):
        CHEAP[name](tiny)(bad)


def test_bad_target(tiny):
    with pytest.raises(InterpreterError, match="out of range"):
        CAM(tiny)(_x(2), torch.tensor([0, 10]))
    with pytest.raises(InterpreterError, match="shape"):
        CAM(tiny)(_x(2), torch.tensor([0]))


def test_unknown_interpreter_name(tiny):
    with pytest.raises(InterpreterError, match="unknown interpreter 'lime'"):
        build_interpreter("lime", tiny)


# ------------------------------------------------------------------------------------------------------
# real models
# ------------------------------------------------------------------------------------------------------
def _real(name, model):
    if name == "mask":
        return build_interpreter("mask", model, steps=10, unroll=1)
    return build_interpreter(name, model)


@pytest.mark.parametrize("name", ["grad", "cam", "mask", "rts"])
def test_nonzero_input_gradient_fmnist(name, fmnist_resnet, fmnist_small):
    x = fmnist_small[0][:2].clone().requires_grad_(True)
    e = _real(name, fmnist_resnet)(x)
    (g,) = torch.autograd.grad((e.saliency ** 2).sum(), x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


@pytest.mark.parametrize("name", ["grad", "cam", "mask"])
def test_nonzero_input_gradient_mobilenet(name, mobilenet, photo_batch):
    x = photo_batch[0][:2].clone().requires_grad_(True)
    e = _real(name, mobilenet)(x)
    assert e.saliency.shape[-2:] == {"grad": (56, 56), "cam": (7, 7), "mask": (28, 28)}[name]
    (g,) = torch.autograd.grad((e.saliency ** 2).sum(), x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_grad_surrogate_second_order_on_real_mobilenet(mobilenet, photo_batch):
    """Without a surrogate, the logit-gradient map of a ReLU6 net has zero second derivative; with it, not."""
    x = photo_batch[0][:2].clone().requires_grad_(True)
    plain = GradSaliency(mobilenet, loss="logit", surrogate=None)(x)
    (g0,) = torch.autograd.grad(plain.saliency.sum(), x, allow_unused=True)
    assert g0 is None or float(g0.abs().max()) == 0.0
    for kind in ("smooth", "literal", "softplus"):
        e = GradSaliency(mobilenet, loss="logit", surrogate=kind)(x)
        torch.testing.assert_close(e.logits, plain.logits, rtol=0, atol=0)  # predictions unchanged
        (g,) = torch.autograd.grad(e.saliency.sum(), x)
        assert g.abs().sum() > 0, kind


def test_grad_map_without_graph_is_the_true_relu_map(mobilenet, photo_batch):
    x = photo_batch[0][:2]
    exact = GradSaliency(mobilenet, surrogate=None)(x).saliency
    default = GradSaliency(mobilenet)(x).saliency  # x has no grad: surrogate not used
    torch.testing.assert_close(default, exact, rtol=0, atol=0)


def test_cam_needs_gap_linear_head():
    model = load_model("torchvision:mobilenet_v3_small")  # random weights; head has two linear layers
    with pytest.raises(InterpreterError, match="global average pooling"):
        CAM(model)


@pytest.mark.parametrize("spec", ["torchvision:resnet18", "torchvision:densenet121", "efficientnet_lite0"])
def test_cam_logits_match_the_model(spec):
    model = load_model(spec)
    x = torch.rand(1, 3, 224, 224)
    e = CAM(model)(x)
    assert e.saliency.shape == (1, 1, 7, 7)
    torch.testing.assert_close(e.logits, model(x), rtol=1e-4, atol=1e-4)


def test_cam_covers_the_cat(mobilenet, photo_batch):
    """On chelsea the CAM for 'Egyptian cat' is brighter on the cat (left/centre) than on the right edge."""
    x, names = photo_batch
    i = names.index("chelsea")
    e = CAM(mobilenet)(x[i:i + 1])
    m = e.saliency[0, 0]
    assert int(e.logits.argmax()) in (281, 282, 285)  # tabby, tiger cat, Egyptian cat
    assert float(m[2:6, 1:5].mean()) > float(m[:, 6].mean())


def test_mask_seed_and_deterministic_mode(fmnist_resnet, fmnist_small):
    x = fmnist_small[0][:3]
    a = Mask(fmnist_resnet, steps=20, seed=3)(x).saliency
    b = Mask(fmnist_resnet, steps=20, seed=3)(x).saliency
    c = Mask(fmnist_resnet, steps=20, seed=4)(x).saliency
    d1 = Mask(fmnist_resnet, steps=20, deterministic=True, seed=None)(x).saliency
    d2 = Mask(fmnist_resnet, steps=20, deterministic=True, seed=None)(x).saliency
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    torch.testing.assert_close(d1, d2, rtol=0, atol=0)


def test_mask_lowers_the_class_probability(fmnist_resnet, fmnist_small):
    """The deletion game works: blurring where the map is high hurts the class more than the mean map."""
    x, y = fmnist_small
    interp = Mask(fmnist_resnet, steps=150)
    e = interp(x, y)
    from underfire.guard.interpreters.mask import default_blur_sigma, gaussian_blur

    m = 1 - e.saliency  # keep-mask
    xb = gaussian_blur(x, default_blur_sigma(28))
    up = interp.upsample(m, (28, 28))
    deleted = x * up + xb * (1 - up)
    with torch.no_grad():
        p_del = fmnist_resnet(deleted).softmax(1).gather(1, y[:, None])
        p_clean = fmnist_resnet(x).softmax(1).gather(1, y[:, None])
    assert float(p_del.mean()) < 0.5 * float(p_clean.mean())
    assert float(e.saliency.mean()) < 0.6


def test_rts_checkpoint_must_match_model(tmp_path, fmnist_densenet):
    from underfire.guard.models import CHECKPOINT_DIR

    with pytest.raises(InterpreterError, match="trained for model 'fmnist_resnet'"):
        RTS.for_model(fmnist_densenet, CHECKPOINT_DIR / "rts_fmnist_resnet.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(InterpreterError, match="corrupt"):
        RTS.for_model(fmnist_densenet, bad)
    with pytest.raises(InterpreterError, match="no trained RTS"):
        RTS.for_model(load_model("torchvision:resnet18"))


# --- the attack's view: fused surrogate backward, frozen convolutions, batch norm folded ----------------------

@pytest.mark.parametrize("kind", ["smooth", "literal", "softplus"])
@pytest.mark.parametrize("hi", [None, 6.0])
def test_fused_surrogate_backward_equals_its_autograd_composition(kind, hi):
    """_SurrogateGrad computes g · (h(z − lo) − h(z − hi)) and its derivatives by hand; autograd through
    surrogate_step is the reference, for value and for both first derivatives (the attack's second order)."""
    from underfire.guard.interpreters.grad import _SurrogateGrad, surrogate_step

    gen = torch.Generator().manual_seed(0)
    z = (torch.rand(4, 3, 5, 5, generator=gen, dtype=torch.float64) * 8 - 1).requires_grad_(True)  # around 0 and 6
    g = torch.randn(4, 3, 5, 5, generator=gen, dtype=torch.float64).requires_grad_(True)
    w = torch.randn(4, 3, 5, 5, generator=gen, dtype=torch.float64)
    ref = g * (surrogate_step(z, kind, 1e-2, 3.0) - (surrogate_step(z - hi, kind, 1e-2, 3.0) if hi else 0))
    out = _SurrogateGrad.apply(g, z, 0.0, hi, kind, 1e-2, 3.0)
    torch.testing.assert_close(out, ref)
    ref_grads = torch.autograd.grad((w * ref).sum(), (g, z))
    grads = torch.autograd.grad((w * out).sum(), (g, z))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)
    # the clamp's own backward when it is not differentiated again (the attack's outer backward): g · d(z)
    from underfire.guard.interpreters.grad import _ClampSurrogate

    (gz,) = torch.autograd.grad((w * _ClampSurrogate.apply(z, 0.0, hi, kind, 1e-2, 3.0)).sum(), z)
    d = surrogate_step(z, kind, 1e-2, 3.0) - (surrogate_step(z - hi, kind, 1e-2, 3.0) if hi else 0)
    torch.testing.assert_close(gz, (w * d).detach())


def _map_and_attack_gradient(model, x, target):
    xg = x.clone().requires_grad_(True)
    e = GradSaliency(model)(xg)
    (g,) = torch.autograd.grad((e.saliency - target).abs().sum() + e.logits[:, 0].sum(), xg)
    return e.saliency.detach(), g


def test_attack_view_gives_the_reference_map_and_gradient_on_real_mobilenet(mobilenet, photo_batch, monkeypatch):
    """The attack's fast path (batch norm folded, frozen convolutions, fused surrogate) against the plain
    autograd path on the live model: the same map and the same gradient of an ADV²-style loss."""
    import underfire.guard.interpreters.grad as grad_mod

    x = photo_batch[0][:2]
    target = torch.rand(2, 1, 56, 56, generator=torch.Generator().manual_seed(3))
    fast_map, fast_grad = _map_and_attack_gradient(mobilenet, x, target)
    assert fast_grad.abs().sum() > 0
    monkeypatch.setattr(grad_mod, "frozen_view", lambda m: m)
    monkeypatch.setattr(grad_mod, "_frozen_conv", lambda args, kwargs: None)
    monkeypatch.setattr(grad_mod._SurrogateGrad, "apply", lambda g, z, lo, hi, kind, tau, beta: g * (
        grad_mod.surrogate_step(z - lo, kind, tau, beta) - (grad_mod.surrogate_step(z - hi, kind, tau, beta)
                                                           if hi is not None else 0)))
    ref_map, ref_grad = _map_and_attack_gradient(mobilenet, x, target)
    torch.testing.assert_close(fast_map, ref_map, rtol=0, atol=1e-4)
    cos = F.cosine_similarity(fast_grad.flatten(), ref_grad.flatten(), dim=0)
    assert float(cos) > 0.999
    torch.testing.assert_close(fast_grad, ref_grad, rtol=0, atol=1e-3 * float(ref_grad.abs().max()))


def test_frozen_view_follows_the_live_model(fmnist_resnet):
    import copy

    from underfire.guard.models import frozen_view

    model = copy.deepcopy(fmnist_resnet)
    flags = [p.requires_grad for p in model.parameters()]
    view = frozen_view(model)
    assert view is not model and frozen_view(model) is view  # cached
    assert not any(isinstance(m, nn.BatchNorm2d) for m in view.modules())  # folded
    assert not any(p.requires_grad for p in view.parameters())
    assert [p.requires_grad for p in model.parameters()] == flags  # the live model untouched
    x = _x(4, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(view(x), model(x), rtol=0, atol=1e-4)
        next(model.parameters()).mul_(0.5)  # the live model changes in place: a stale view would differ
        new = frozen_view(model)
        assert new is not view
        torch.testing.assert_close(new(x), model(x), rtol=0, atol=1e-4)
    model.train()
    assert frozen_view(model) is model  # batch statistics: no copy is the same function


@pytest.mark.parametrize("spec", ["efficientnet_lite0", "torchvision:resnet18"])
def test_batch_norm_folds_through_convolution_subclasses(spec):
    """EfficientNet-Lite0's 'same'-padding convolutions are Conv2d subclasses: their batch norms fold too."""
    from underfire.guard.models import frozen_view

    model = load_model(spec, "random" if spec.startswith("torchvision") else None)
    view = frozen_view(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in view.modules())
    x = torch.rand(2, *model.input_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(view(x), model(x), rtol=0, atol=1e-4)
