"""Losses and λ schedules for the attack loop. Every loss is per sample: (B,) so samples stay independent.

Prediction losses (ℓ_prd, lower = closer to the target class c_t):
    nll            −log p(c_t | x)
    smoothed_nll   cross-entropy against a label-smoothed target (p = 0.95 on c_t; ADV²-GRAD)
    cw_margin      max_{j≠t} z_j − z_t, floored at −κ (ADV²-MASK)
Interpretation losses (ℓ_int, distance of map g(x) to the target map m_t):
    mse            mean over pixels of (g − m_t)²       (CAM, RTS)
    l2sq           sum over pixels of (g − m_t)²        (GRAD)
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

Schedule = Callable[[int], float]


def nll(logits: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, t, reduction="none")


def smoothed_nll(logits: torch.Tensor, t: torch.Tensor, p_target: float = 0.95) -> torch.Tensor:
    k = logits.shape[1]
    soft = torch.full_like(logits, (1 - p_target) / (k - 1))
    soft.scatter_(1, t[:, None], p_target)
    return -(soft * logits.log_softmax(1)).sum(1)


def cw_margin(logits: torch.Tensor, t: torch.Tensor, kappa: float = 0.0) -> torch.Tensor:
    zt = logits.gather(1, t[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(t, logits.shape[1]).bool(), float("-inf")).amax(1)
    return (other - zt).clamp_min(-kappa)


def mse(m: torch.Tensor, m_t: torch.Tensor) -> torch.Tensor:
    return ((m - m_t) ** 2).flatten(1).mean(1)


def l2sq(m: torch.Tensor, m_t: torch.Tensor) -> torch.Tensor:
    return ((m - m_t) ** 2).flatten(1).sum(1)


PRED_LOSSES = {"nll": nll, "smoothed_nll": smoothed_nll, "cw_margin": cw_margin}
INT_LOSSES = {"mse": mse, "l2sq": l2sq}


# --- λ schedules: step index within the stage -> λ ---------------------------------------------------------
def constant(c: float) -> Schedule:
    return lambda i: c


def ramp(start: float, end: float, steps: int) -> Schedule:
    """Linear ramp from ``start`` to ``end`` over ``steps`` (the paper's c → 2c)."""
    return lambda i: start + (end - start) * min(i, max(steps - 1, 1)) / max(steps - 1, 1)


def stepwise(segments: Sequence[tuple[int, float]]) -> Schedule:
    """Piecewise constant: [(n_steps, λ), ...] (the paper's GRAD schedule 1e-3, 4e-3, 1e-2, 5e-2)."""
    bounds, acc = [], 0
    for n, lam in segments:
        acc += n
        bounds.append((acc, lam))

    def f(i: int) -> float:
        for end, lam in bounds:
            if i < end:
                return lam
        return bounds[-1][1]

    return f
