"""Randomized smoothing of any interpreter, and a per-pixel certificate of its top-k map.

A wrapper in the way captum's NoiseTunnel wraps a method: ``Smoothed(base)`` is itself an Interpreter whose
map is the base map averaged over N Gaussian copies of the input (Levine, Singla & Feizi 2019, *Certifiably
robust interpretation*; SmoothGrad when the base is GRAD)::

    sm = Smoothed(build_interpreter("cam", model), sigma=0.1, samples=8)   # or build_interpreter("smooth:cam", model)
    e = sm(x)                                   # map = minmax(mean_i cam(clip(x + δ_i) | c)), δ_i ~ N(0, σ²I)
    # SmoothGrad (build_interpreter("smoothgrad", model)) is Smoothed(grad, σ = 0.15, 16, clip=False): captum's
    # NoiseTunnel convention, the noisy copies not clipped
    cert = sm.certify(x, samples=100, k=0.2)    # per pixel: in / out of the top-20%, or abstain, and a radius

Every noisy copy explains the class the model predicts on the clean input (or ``target``), so the average
is over maps of one class. The map keeps the base map's graph to x (the attacker differentiates through the
noise: an expectation-over-transformation attack simply calls it, each call drawing new noise).

Certificate (in the style of Anani et al., ICML 2025, *Pixel-level certified explanations via randomized
smoothing*, and Fischer et al.'s certified segmentation): over n noisy copies each pixel votes on whether it
is among the copy's top-k% pixels; the majority side's count c gives a one-sided Clopper–Pearson lower bound
p_lower of its probability at level 1 − α/P (Bonferroni over the P pixels of a map); the pixel is decided
when p_lower > 1/2 and then certified at ℓ2 radius σ·Φ⁻¹(p_lower) (Cohen et al. 2019), and abstains
otherwise. An ℓ∞ budget ε reaches ℓ2 distance ε·√(C·H·W), reported beside the radii.
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from typing import Sequence

import torch

from underfire.guard.interpreters.base import (REGISTRY, Explanation, Interpreter, InterpreterError, minmax, pick_target,
                                              register, trusted_inputs)
from underfire.guard.interpreters.grad import GradSaliency

RADII = (0.05, 0.1, 0.25)


def lower_bound(count: torch.Tensor, n: int, alpha: float) -> torch.Tensor:
    """One-sided Clopper–Pearson lower confidence bound at level 1 − alpha of a binomial proportion with
    ``count`` successes out of ``n`` (elementwise; 0 where count = 0): the alpha-quantile of Beta(c, n − c + 1)."""
    from scipy.stats import beta

    c = count.detach().cpu().double().numpy()
    lo = beta.ppf(alpha, c, n - c + 1)
    return torch.from_numpy(lo).nan_to_num(0.0).to(count.device)


def radius(p_lower: torch.Tensor, sigma: float) -> torch.Tensor:
    """σ·Φ⁻¹(p_lower) where p_lower > 1/2, else 0 (no certificate)."""
    from scipy.stats import norm

    r = sigma * torch.from_numpy(norm.ppf(p_lower.detach().cpu().double().numpy())).to(p_lower.device)
    return torch.where(p_lower > 0.5, r, torch.zeros_like(r))


def topk_mask(maps: torch.Tensor, k: float) -> torch.Tensor:
    """(…, P) bool: each map's top-``k`` fraction of pixels (ties broken by index)."""
    n = max(1, round(maps.shape[-1] * k))
    idx = maps.topk(n, dim=-1).indices
    return torch.zeros_like(maps, dtype=torch.bool).scatter_(-1, idx, True)


class Smoothed(Interpreter):
    """The randomized-smoothing version of any interpreter (itself an Interpreter).

    Args:
        base: the interpreter to smooth (its model is this one's).
        sigma: standard deviation of the Gaussian noise, on images in [0, 1].
        samples: noisy copies per explanation (the map's cost is ``samples`` base maps, batched in one call).
        clip: clip each noisy copy to [0, 1] (True: the copies stay images, as the smoothing defense and its
            certificate take them); False: SmoothGrad's and captum NoiseTunnel's convention, the noise added
            as is. On Fashion-MNIST's black background the two differ a lot (Pearson r ≈ 0.3–0.8 between them).
    """

    name = "smoothed"
    compile_parts = ()

    def __init__(self, base: Interpreter, sigma: float = 0.1, samples: int = 8, clip: bool = True) -> None:
        if sigma < 0 or samples < 1:
            raise InterpreterError(f"smoothing needs sigma ≥ 0 and samples ≥ 1, got {sigma}, {samples}")
        super().__init__(base.model)
        self.base, self.sigma, self.samples, self.clip = base, float(sigma), int(samples), bool(clip)
        self.name = f"smooth:{base.name}"  # its registry key: build_interpreter("smooth:cam", model)
        self.traits = replace(base.traits, label=f"smoothed {base.traits.label}", random=True, variants=())

    def modules(self) -> tuple:
        return tuple({id(m): m for m in (self.model, *self.base.modules())}.values())

    def native_size(self, hw: tuple[int, int]) -> tuple[int, int]:
        return self.base.native_size(hw)

    def sampled(self, samples: int) -> "Smoothed | None":
        """The same smoothing from ``samples`` noisy copies (fresh noise at every call, as always): fewer is a
        cheaper estimate, more a finer one than the deployment's own draw (an attacker may pay for it)."""
        if samples == self.samples:
            return None
        view = copy.copy(self)
        view.samples = int(samples)
        return view

    def noisy_maps(self, x: torch.Tensor, cls: torch.Tensor, samples: int) -> torch.Tensor:
        """(samples, B, 1, h, w): the base map of ``samples`` noisy copies of x, each for class ``cls``."""
        xs = x.repeat(samples, 1, 1, 1)  # (S·B, C, H, W), copy-major
        xs = xs + self.sigma * torch.randn_like(xs)
        if self.clip:
            xs = xs.clamp(0, 1)
        with trusted_inputs():  # x was checked by this interpreter's own call; unclipped copies leave [0, 1]
            e = self.base(xs, cls.repeat(samples))
        return e.saliency.view(samples, x.shape[0], *e.saliency.shape[1:])

    def explain(self, x: torch.Tensor, target: torch.Tensor | None) -> Explanation:
        logits = self.model(x)  # (B, K): the clean prediction picks the class every copy explains
        cls = pick_target(logits, target).detach()
        m = self.noisy_maps(x, cls, self.samples).mean(0)  # (B, 1, h, w)
        return Explanation(logits, minmax(m))

    @torch.no_grad()
    def certify(self, x: torch.Tensor, target: torch.Tensor | None = None, samples: int = 100, k: float = 0.2,
                alpha: float = 0.05, radii: Sequence[float] = RADII, batch: int = 32) -> dict:
        """Per-pixel certificate of the smoothed top-k map (see the module docstring).

        Returns a dict of tensors: ``decision`` (B, h·w) int8 — 1 in the top-k, 0 out, −1 abstain;
        ``radius`` (B, h·w) ℓ2 radius (0 where abstaining); ``p_lower`` (B, h·w); and ``certified`` (B, len(radii)):
        per input, the fraction of its top-k pixels (k·h·w of them) decided "in" with radius ≥ r.
        """
        if not 0 < k < 1:
            raise InterpreterError(f"k is a fraction of the pixels in (0, 1), got {k}")
        cls = pick_target(self.model(x), target)
        counts = None
        for start in range(0, samples, batch):
            s = min(batch, samples - start)
            maps = self.noisy_maps(x, cls, s).flatten(2)  # (s, B, P)
            c = topk_mask(maps, k).sum(0)  # (B, P) votes for "in the top-k"
            counts = c if counts is None else counts + c
        n_pix = counts.shape[1]
        top = torch.maximum(counts, samples - counts)  # the majority side's votes
        p_lower = lower_bound(top, samples, alpha / n_pix)
        r = radius(p_lower, self.sigma)
        decided = p_lower > 0.5
        inside = counts * 2 > samples
        decision = torch.where(decided, inside.to(torch.int8), torch.full_like(inside, -1, dtype=torch.int8))
        n_top = max(1, round(n_pix * k))
        certified = torch.stack([((decision == 1) & (r >= rad)).sum(1).double() / n_top for rad in radii], 1).clamp(max=1)
        return {"decision": decision, "radius": r, "p_lower": p_lower, "certified": certified,
                "radii": list(radii), "samples": samples, "k": k, "alpha": alpha, "sigma": self.sigma}


def linf_as_l2(eps: float, shape: Sequence[int]) -> float:
    """The ℓ2 length of an ℓ∞ perturbation of size ``eps`` on every one of the C·H·W pixels."""
    return eps * math.sqrt(math.prod(shape))


@register("smoothgrad", preset="grad", label="SmoothGrad", random=True)
def smoothgrad(model, sigma: float = 0.15, samples: int = 16, clip: bool = False, **grad_kw) -> Smoothed:
    """SmoothGrad (Smilkov et al. 2017): GRAD averaged over noisy copies, σ = 15% of the range, the copies not
    clipped (captum NoiseTunnel's convention)."""
    sm = Smoothed(GradSaliency(model, **grad_kw), sigma=sigma, samples=samples, clip=clip)
    sm.name, sm.traits = "smoothgrad", REGISTRY["smoothgrad"].traits
    return sm
