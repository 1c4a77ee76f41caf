"""GRAD: gradient saliency (Simonyan et al. 2014), as used by ADV² (Zhang et al., USENIX Sec. 2020).

    map = minmax( avgpool_4( max_c | ∂ NLL(f(x), t) / ∂x | ) )         (B, 1, H/4, W/4)

A ReLU network's gradient is piecewise constant in x, so the map has no useful second derivative. For
attacks, the ReLU family (relu, relu6, hardtanh) is swapped, inside this interpreter's call only, for a
function whose forward value is unchanged but whose backward uses a smooth step ``h``:

    literal:  h(z) = z/√(z²+τ) (+1 for z < 0)            (the paper's form; discontinuous at 0)
    smooth:   h(z) = ½ (1 + z/√(z²+τ))                   (default)
    softplus: h(z) = sigmoid(β z)

The swap works by a TorchFunctionMode, so functional calls (DenseNet's F.relu) are covered too, and the
model is never modified. Predictions are unchanged; the map becomes that of the smoothed backward.

An attack's map (second order) is computed on the classifier's frozen view (guard.models.frozen_view: batch
norm folded, parameters frozen) with two hand-written backward functions: the surrogate's derivative and its
own derivative in one pass (_SurrogateGrad), and convolutions whose backward is a transposed convolution
(_FrozenConv), so the double backward skips torch's per-group weight-gradient loop. Same map and gradient as
the plain autograd path (tests/test_interpreters.py); on MobileNetV2 a GRAD-ADV² step costs about 3.3 floors
instead of 7–10 (benchmarks/step_cost.py, docs/step-cost.md).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from underfire.guard.models import frozen_view
from underfire.guard.interpreters.base import REGISTRY, Explanation, Interpreter, minmax, pick_target, register
from underfire.guard.interpreters.base import InterpreterError

SURROGATES = ("literal", "smooth", "softplus")


def surrogate_step(z: torch.Tensor, kind: str, tau: float = 1e-4, beta: float = 10.0) -> torch.Tensor:
    """The surrogate derivative h(z) of relu, differentiable in z."""
    if kind == "smooth":
        return 0.5 * (1 + z / torch.sqrt(z * z + tau))
    if kind == "literal":
        return z / torch.sqrt(z * z + tau) + (z < 0).to(z.dtype)
    if kind == "softplus":
        return torch.sigmoid(beta * z)
    raise InterpreterError(f"unknown ReLU surrogate {kind!r}; choose from {SURROGATES}")


def _derivative(z: torch.Tensor, lo: float, hi: float | None, kind: str, tau: float, beta: float,
                slope: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """d(z) = h(z − lo) − h(z − hi) (hi None: h(z − lo)) and, with ``slope``, d'(z) — the same numbers as
    ``surrogate_step``, in as few elementwise passes as possible: the activations of an ImageNet net are
    large, and every pass over them costs about as much as a small convolution."""
    if kind == "softplus":
        h1 = torch.sigmoid((z - lo) * beta)
        d, s = h1, (1 - h1).mul_(h1).mul_(beta) if slope else None
        if hi is not None:
            h2 = torch.sigmoid((z - hi) * beta)
            d = d - h2
            s = s.sub_((1 - h2).mul_(h2).mul_(beta)) if slope else None
        return d, s
    t1 = z if lo == 0 else z - lo
    r1 = (t1 * t1).add_(tau).rsqrt_()  # 1/√(t²+τ); d/dt t/√(t²+τ) = τ/(t²+τ)^{3/2} = τ·r³
    d = t1 * r1
    if hi is not None:
        t2 = z - hi
        r2 = (t2 * t2).add_(tau).rsqrt_()
        d.addcmul_(t2, r2, value=-1)  # the constant halves of h cancel in h(t1) − h(t2)
    if kind == "smooth":
        d.mul_(0.5)
        if hi is None:
            d.add_(0.5)
    else:  # literal: t/√(t²+τ) + 1[t < 0]
        d.add_((t1 < 0).to(z.dtype))
        if hi is not None:
            d.sub_((t2 < 0).to(z.dtype))
    if not slope:
        return d, None
    s = r1.pow_(3)
    if hi is not None:
        s.sub_(r2.pow_(3))
    return d, s.mul_(0.5 * tau if kind == "smooth" else tau)


class _SurrogateGrad(torch.autograd.Function):
    """g · d(z) with d(z) = h(z − lo) − h(z − hi): the backward of a surrogate ReLU / clamp, as one function.

    Written through autograd, d(z) costs some twenty recorded elementwise ops whose own backward (the
    attack's second derivative) doubles them; here the value and its derivative come from one shared pass
    and the double backward is two multiplications. Not differentiable a third time."""

    @staticmethod
    def forward(ctx, g, z, lo, hi, kind, tau, beta):  # type: ignore[override]
        d, slope = _derivative(z, lo, hi, kind, tau, beta, slope=True)
        ctx.save_for_backward(g, d, slope)
        return g * d

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, out):  # type: ignore[override]
        g, d, slope = ctx.saved_tensors
        dg = out * d if ctx.needs_input_grad[0] else None
        dz = (slope * out).mul_(g) if ctx.needs_input_grad[1] else None
        return dg, dz, None, None, None, None, None


class _ClampSurrogate(torch.autograd.Function):
    """clamp(z, lo, hi) forward; backward g · (h(z − lo) − h(z − hi)), itself differentiable once more."""

    @staticmethod
    def forward(ctx, z, lo, hi, kind, tau, beta):  # type: ignore[override]
        ctx.save_for_backward(z)
        ctx.cfg = (lo, hi, kind, tau, beta)
        return z.clamp(min=lo, max=hi)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        (z,) = ctx.saved_tensors
        lo, hi, kind, tau, beta = ctx.cfg
        if torch.is_grad_enabled():  # the attack's view: a first backward that will be differentiated
            return _SurrogateGrad.apply(g, z, lo, hi, kind, tau, beta), None, None, None, None, None
        d, _ = _derivative(z, lo, hi, kind, tau, beta, slope=False)
        return d.mul_(g), None, None, None, None, None


class _FrozenConv(torch.autograd.Function):
    """conv2d with a frozen weight, whose backward is a transposed convolution that autograd differentiates
    again as a plain convolution. torch's own double backward of a convolution also forms the weight
    gradient's term, one convolution per group for a depthwise layer, whether or not anyone asked for it."""

    @staticmethod
    def forward(ctx, x, w, b, stride, padding, dilation, groups):  # type: ignore[override]
        ctx.save_for_backward(w)
        ctx.cfg = (x.shape[-2:], stride, padding, dilation, groups)
        return F.conv2d(x, w, b, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        (w,) = ctx.saved_tensors
        size, stride, padding, dilation, groups = ctx.cfg
        extra = tuple(n - ((o - 1) * s - 2 * p + d * (k - 1) + 1)  # output_padding that restores x's size
                      for n, o, s, p, d, k in zip(size, g.shape[-2:], stride, padding, dilation, w.shape[-2:]))
        return F.conv_transpose2d(g, w, None, stride, padding, extra, groups, dilation), None, None, None, None, None, None


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _frozen_conv(args, kwargs):
    """_FrozenConv for a conv2d call whose weight and bias need no gradient, else None (the native call)."""
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    a = dict(zip(names, args), **kwargs)
    x, w, b = a["input"], a["weight"], a.get("bias")
    padding = a.get("padding", 0)
    if (not x.requires_grad or w.requires_grad or (b is not None and b.requires_grad) or isinstance(padding, str)
            or x.dim() != 4):
        return None
    return _FrozenConv.apply(x, w, b, _pair(a.get("stride", 1)), _pair(padding), _pair(a.get("dilation", 1)),
                             a.get("groups", 1))


_RELUS = {F.relu, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_}
_HARDTANHS = {F.hardtanh, F.hardtanh_, F.relu6}


class ReluSurrogate(TorchFunctionMode):
    """Inside this mode, relu / relu6 / hardtanh keep their forward value and use h(z) in backward."""

    def __init__(self, kind: str = "smooth", tau: float = 1e-4, beta: float = 10.0) -> None:
        super().__init__()
        surrogate_step(torch.zeros(1), kind)  # validate the name early
        self.cfg = (kind, tau, beta)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _RELUS:
            return _ClampSurrogate.apply(args[0], 0.0, None, *self.cfg)
        if func in _HARDTANHS:
            if func is F.relu6:
                lo, hi = 0.0, 6.0
            else:
                lo = args[1] if len(args) > 1 else kwargs.get("min_val", -1.0)
                hi = args[2] if len(args) > 2 else kwargs.get("max_val", 1.0)
            return _ClampSurrogate.apply(args[0], float(lo), float(hi), *self.cfg)
        if func is F.conv2d:
            out = _frozen_conv(args, kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)


@register("grad", preset="grad", label="GRAD", variants={"beta": "beta:grad"})
class GradSaliency(Interpreter):
    """Gradient saliency.

    Args:
        model: classifier over [0, 1] images.
        loss: "nll" (the paper: ∂ NLL(f(x), t)/∂x) or "logit" (plain ∂ z_t/∂x).
        pool: average-pooling factor (4: 56² maps at 224, 7² at 28).
        surrogate: ReLU surrogate used when x.requires_grad ("smooth", "literal", "softplus", or None
            for the true ReLU, whose second derivative is zero).
        always_surrogate: use the surrogate even when x does not require grad (the attack's view).
    """

    compile_parts = ()  # ADV²-GRAD differentiates the gradient: compiled graphs allow one backward only

    def __init__(self, model, loss: str = "nll", pool: int = 4, surrogate: str | None = "smooth",
                 tau: float = 1e-4, beta: float = 10.0, always_surrogate: bool = False) -> None:
        super().__init__(model)
        if loss not in ("nll", "logit"):
            raise InterpreterError(f"loss must be 'nll' or 'logit', not {loss!r}")
        if surrogate is not None:
            surrogate_step(torch.zeros(1), surrogate)
        self.loss, self.pool, self.surrogate = loss, pool, surrogate
        self.tau, self.beta, self.always_surrogate = tau, beta, always_surrogate

    def native_size(self, hw):
        return (hw[0] // self.pool, hw[1] // self.pool)

    def _mode(self, second_order: bool):
        if self.surrogate is not None and (second_order or self.always_surrogate):
            return ReluSurrogate(self.surrogate, self.tau, self.beta)
        return contextlib.nullcontext()

    def classifier(self, second_order: bool):
        """The model a map is computed with: the live one, or for an attack's map (second order) its frozen
        view (guard.models.frozen_view: the same function with batch norm folded and parameters frozen, so
        that map is differentiable with respect to the input only)."""
        return frozen_view(self.model) if second_order else self.model

    def objective(self, logits: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The scalar whose input gradient is explained: Σ NLL(f(x), t) or Σ z_t."""
        if self.loss == "nll":
            return F.cross_entropy(logits, t, reduction="sum")
        return logits.gather(1, t[:, None]).sum()

    def attribution(self, xg: torch.Tensor, target, second_order: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, per-pixel attribution (B, C, H, W)): here the input gradient. Subclasses (Input×Gradient,
        Integrated Gradients) change only this; the post-processing below is shared."""
        logits = self.classifier(second_order)(xg)  # (B, K)
        (g,) = torch.autograd.grad(self.objective(logits, pick_target(logits, target)), xg,
                                   create_graph=second_order)
        return logits, g

    def explain(self, x, target):
        second_order = x.requires_grad and torch.is_grad_enabled()
        xg = x if second_order else x.detach().requires_grad_(True)
        with torch.enable_grad(), self._mode(second_order):
            logits, g = self.attribution(xg, target, second_order)
        sal = g.abs().amax(1, keepdim=True)  # (B, 1, H, W)
        if self.pool > 1:
            sal = F.avg_pool2d(sal, self.pool)  # (B, 1, H/p, W/p)
        sal = minmax(sal)
        if not second_order:
            logits, sal = logits.detach(), sal.detach()
        return Explanation(logits, sal)


BETA = 3.0  # β of beta:grad: softplus-3 is visibly smoother than ReLU on [0, 1] images yet keeps the map's shape


@register("beta:grad", preset="grad", label="β-smoothed GRAD")
def beta_grad(model, beta: float = BETA, **kw) -> GradSaliency:
    """β-smoothed GRAD (Dombrowski et al. 2019): the deployed gradient map is computed through softplus-β in
    place of every ReLU in the backward pass, always."""
    grad = GradSaliency(model, surrogate="softplus", always_surrogate=True, beta=beta, **kw)
    grad.name, grad.traits = "beta:grad", REGISTRY["beta:grad"].traits
    return grad
