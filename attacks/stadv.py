"""stAdv (Xiao et al., ICLR 2018) and the stAdv-based ADV², on the one loop.

Threat model: a per-pixel flow field f (B, 2, H, W) resamples x0 bilinearly, x = warp(x0, f); no ε-ball.
Objective (Adam, lr 0.01):

    stage 1 (200 steps):  2·NLL(f(x), c_t) + τ·L_flow(f)
    stage 2 (600 steps):  2·NLL(f(x), c_t) + τ·L_flow(f) + λ·ℓ_int(g(x), m_t)     (StAdv2 only)

with L_flow = Σ_p Σ_{q∈N(p)} √(‖f_p − f_q‖² + 1e-8) and τ = 5e-4 (ADV² paper, section on alternative
attack frameworks). Success is judged on the 8-bit warped image.

The paper gives no λ for this variant; λ ramps 20 → 40 (MSE), measured on Fashion-MNIST CAM: 5 → 10
leaves the map too far from benign (L1 ratio to stAdv 0.56), 20 → 40 reaches 0.38 at the same ASR.
"""

from __future__ import annotations

from underfire.attacks.objectives import nll, ramp
from underfire.attacks.pgd import Attack, Stage
from underfire.attacks.threats import FlowField, flow_loss


def _two_nll(z, t):
    return 2 * nll(z, t)


class StAdv(Attack):
    """Targeted stAdv: flow field, 2·NLL + τ·flow smoothness, Adam; the last iterate."""

    name = "stadv"

    def __init__(self, steps: int = 200, lr: float = 0.01, tau: float = 5e-4, **kw) -> None:
        kw.setdefault("select", "last")
        super().__init__(FlowField(), [Stage(steps, 0.0, "adam", lr)], pred_loss=_two_nll,
                         extra=[lambda x, v, idx: tau * flow_loss(v)], **kw)


class StAdv2(Attack):
    """stAdv-based ADV²: stAdv warm start, then the joint objective with the interpretation loss."""

    name = "stadv2"

    def __init__(self, steps: tuple[int, int] = (200, 600), lr: float = 0.01, tau: float = 5e-4,
                 lam: tuple[float, float] = (20.0, 40.0), int_loss: str = "mse", **kw) -> None:
        s1, s2 = steps
        super().__init__(FlowField(), [Stage(s1, 0.0, "adam", lr), Stage(s2, ramp(*lam, s2), "adam", lr)],
                         pred_loss=_two_nll, int_loss=int_loss,
                         extra=[lambda x, v, idx: tau * flow_loss(v)], **kw)
