"""Threat models: where the adversarial input may live, and how an optimisation variable maps to it.

A threat model turns a variable ``v`` into an image ``x = apply(x0, v)`` and keeps ``v`` admissible with
``project``. Two are implemented:

- :class:`LinfBall`: v is the image itself; ‖x − x0‖∞ ≤ ε and x ∈ [0, 1] (the paper's PGD setting).
- :class:`FlowField`: v is a per-pixel flow (B, 2, H, W) that resamples x0 bilinearly (stAdv, Xiao et al.
  ICLR 2018); no ε-ball, the flow is kept small by a smoothness loss instead.

``quantize`` gives what a deployment receives: the 8-bit image, still admissible.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from underfire.guard.errors import UnderfireError


class AttackError(UnderfireError):
    """Bad arguments to an attack; the message says which and why."""


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Round to the 8-bit grid (what an image file or camera would carry)."""
    return torch.round(x * 255) / 255


class LinfBall:
    """L∞ ball of radius ε around x0, intersected with the [0, 1] box.

    Args:
        eps: radius in [0, 1] pixel units (8/255 for ImageNet-size colour images, 16/255–32/255 for 28×28).
        random_start: start at a uniform point in the ball instead of x0.
    """

    name = "linf"

    def __init__(self, eps: float, random_start: bool = False) -> None:
        if not 0 <= eps <= 1:
            raise AttackError(f"ε must be in [0, 1] (pixel units of images in [0, 1]); got {eps}")
        self.eps, self.random_start = float(eps), random_start

    def init(self, x0: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        if not self.random_start:
            return x0.clone()
        noise = torch.rand(x0.shape, generator=gen, dtype=x0.dtype).to(x0.device) * 2 - 1
        return self.project(x0 + self.eps * noise, x0)

    def apply(self, x0: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return v

    def project(self, v: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        lo, hi = self._bounds(x0)
        return torch.clamp(v, lo, hi)

    def _bounds(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[max(x0 − ε, 0), min(x0 + ε, 1)]: clamping to it equals clamping to the ball, then to [0, 1]. Kept for
        the last x0 seen (an attack projects around the same x0 at every step)."""
        c = getattr(self, "_cache", None)  # (x0 itself — held, so its memory is not reused —, its version, lo, hi)
        if c is None or c[0] is not x0 or c[1] != x0._version:
            c = self._cache = (x0, x0._version, (x0 - self.eps).clamp(0, 1), (x0 + self.eps).clamp(0, 1))
        return c[2], c[3]

    def quantize(self, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """8-bit image inside the ball (exact when x0 is 8-bit and ε a multiple of 1/255)."""
        return self.project(quantize(x), x0)

    def describe(self) -> dict:
        return {"threat": self.name, "eps": self.eps, "eps_255": round(self.eps * 255, 3)}


def flow_grid(flow: torch.Tensor) -> torch.Tensor:
    """Pixel flow (B, 2, H, W) -> sampling grid (B, H, W, 2) in grid_sample's [-1, 1] coordinates."""
    b, _, h, w = flow.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=flow.device, dtype=flow.dtype),
                            torch.arange(w, device=flow.device, dtype=flow.dtype), indexing="ij")
    gx = (xs + flow[:, 0]) * 2 / max(w - 1, 1) - 1
    gy = (ys + flow[:, 1]) * 2 / max(h - 1, 1) - 1
    return torch.stack([gx, gy], -1)


def flow_loss(flow: torch.Tensor) -> torch.Tensor:
    """stAdv flow smoothness, per image: Σ_p Σ_{q ∈ N(p)} √(‖f_p − f_q‖² + 1e-8). (B,)"""
    fp = F.pad(flow, (1, 1, 1, 1), mode="replicate")
    total = 0
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):  # up, down, left, right neighbours
        q = fp[:, :, dy:dy + flow.shape[2], dx:dx + flow.shape[3]]
        total = total + torch.sqrt(((flow - q) ** 2).sum(1) + 1e-8)
    return total.flatten(1).sum(1)


class FlowField:
    """Spatial transformation threat (stAdv): x = bilinear resample of x0 by a per-pixel flow."""

    name = "flow"

    def __init__(self, max_flow: float | None = None) -> None:
        self.max_flow = max_flow

    def init(self, x0: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        return torch.zeros(x0.shape[0], 2, *x0.shape[-2:], device=x0.device, dtype=x0.dtype)

    def apply(self, x0: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.grid_sample(x0, flow_grid(v), mode="bilinear", padding_mode="border", align_corners=True)

    def project(self, v: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        return v if self.max_flow is None else v.clamp(-self.max_flow, self.max_flow)

    def quantize(self, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        return quantize(x).clamp(0, 1)

    def describe(self) -> dict:
        return {"threat": self.name, "max_flow": self.max_flow}
