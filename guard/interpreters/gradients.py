"""Input×Gradient and Integrated Gradients: GRAD's contract and post-processing with another attribution.

Both explain the target logit z_t (captum's convention; GRAD explains NLL as in the paper) and share GRAD's
post-processing and ReLU surrogate for attacks:

    map = minmax( avgpool_pool( max_c | attribution | ) )

- ``inputxgrad`` (Shrikumar et al. 2016): attribution = x ⊙ ∂z_t/∂x.
- ``ig`` (Sundararajan et al. 2017): attribution = (x − x₀) ⊙ mean_k ∂z_t/∂x (x₀ + α_k (x − x₀)), α_k the
  midpoints (k + ½)/m of m path steps (captum's ``riemann_middle``), all m·B path points in one batch.
  ``jitter=True`` draws each α_k uniformly inside its stratum [k/m, (k + 1)/m) afresh at every call (a stratified
  Monte-Carlo estimate of the path integral; ``sampled(k)``: the attacker's cheap view of an m-point IG).
  Baseline x₀: ``black`` (zeros, captum's default) or ``blur`` (a Gaussian blur of x, σ = H/28·5 pixels).
  The class is the one predicted on x itself (or ``target``).
"""

from __future__ import annotations

import copy

import torch

from underfire.guard.interpreters.base import InterpreterError, pick_target, register
from underfire.guard.interpreters.grad import GradSaliency

BASELINES = ("black", "blur")


@register("inputxgrad", preset="grad", label="Input×Gradient")
class InputXGradient(GradSaliency):
    """|x ⊙ ∂z_t/∂x|, max over channels, pooled (see the module docstring)."""

    def __init__(self, model, loss: str = "logit", **kw) -> None:
        super().__init__(model, loss=loss, **kw)

    def attribution(self, xg, target, second_order):
        logits, g = super().attribution(xg, target, second_order)
        return logits, xg * g


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur per channel (reflect padding), differentiable in x."""
    r = max(1, int(3 * sigma))
    k = torch.exp(-(torch.arange(-r, r + 1, dtype=x.dtype, device=x.device) ** 2) / (2 * sigma ** 2))
    k = (k / k.sum()).view(1, 1, 1, -1)
    c = x.shape[1]
    y = torch.nn.functional.pad(x, (r, r, 0, 0), mode="reflect")
    y = torch.nn.functional.conv2d(y, k.expand(c, 1, 1, -1), groups=c)
    y = torch.nn.functional.pad(y, (0, 0, r, r), mode="reflect")
    return torch.nn.functional.conv2d(y, k.transpose(-1, -2).expand(c, 1, -1, 1), groups=c)


@register("ig", preset="grad", label="IG")
class IntegratedGradients(GradSaliency):
    """Integrated Gradients with ``steps`` path points batched (see the module docstring)."""

    def __init__(self, model, steps: int = 16, baseline: str = "black", loss: str = "logit", jitter: bool = False,
                 **kw) -> None:
        super().__init__(model, loss=loss, **kw)
        if steps < 1:
            raise InterpreterError(f"integrated gradients needs at least one path step, got {steps}")
        if baseline not in BASELINES:
            raise InterpreterError(f"unknown IG baseline {baseline!r}; use one of {', '.join(BASELINES)}")
        self.steps, self.baseline, self.jitter = int(steps), baseline, bool(jitter)

    def sampled(self, samples: int) -> "IntegratedGradients | None":
        if samples >= self.steps:
            return None
        view = copy.copy(self)  # the same model, baseline and post-processing
        view.steps, view.jitter = int(samples), True
        return view

    def base_point(self, x: torch.Tensor) -> torch.Tensor:
        if self.baseline == "black":
            return torch.zeros_like(x)
        return blur(x, 5.0 * x.shape[-1] / 28)

    def attribution(self, xg, target, second_order):
        net = self.classifier(second_order)
        logits = net(xg)
        t = pick_target(logits, target).detach()
        x0 = self.base_point(xg)
        offset = torch.rand(self.steps, device=xg.device).to(xg.dtype) if self.jitter else 0.5
        alphas = (torch.arange(self.steps, dtype=xg.dtype, device=xg.device) + offset) / self.steps
        path = x0 + alphas.view(-1, 1, 1, 1, 1) * (xg - x0)  # (m, B, C, H, W)
        flat = path.reshape(-1, *xg.shape[1:])
        (g,) = torch.autograd.grad(self.objective(net(flat), t.repeat(self.steps)), flat,
                                   create_graph=second_order)
        return logits, (xg - x0) * g.view(self.steps, *xg.shape).mean(0)
