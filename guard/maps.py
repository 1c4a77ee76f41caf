"""Distances between attribution maps, shared by the detectors (guard) and the audit metrics.

Maps are (B, 1, h, w) in [0, 1]; two batches at different resolutions are compared at the larger one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def common_size(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring two map batches (B, 1, h, w) to the larger of their resolutions (bilinear)."""
    size = max(a.shape[-2:], b.shape[-2:], key=lambda s: s[0] * s[1])
    a = a if a.shape[-2:] == size else F.interpolate(a, size=size, mode="bilinear", align_corners=False)
    b = b if b.shape[-2:] == size else F.interpolate(b, size=size, mode="bilinear", align_corners=False)
    return a, b


def l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean absolute per-pixel difference (B,); differentiable."""
    a, b = common_size(a, b)
    return (a - b).abs().flatten(1).mean(1)


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample Pearson correlation of two maps (B,) in [−1, 1]; 0 where a map is constant; differentiable."""
    a, b = common_size(a, b)
    a, b = a.flatten(1), b.flatten(1)
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-8)


def iou_at_k(a: torch.Tensor, b: torch.Tensor, k: float) -> torch.Tensor:
    """IoU of the sets of top-k% pixels (ties broken by index), (B,). k in (0, 100)."""
    a, b = common_size(a, b)
    fa, fb = a.flatten(1), b.flatten(1)
    n = max(1, round(fa.shape[1] * k / 100))
    ta = torch.zeros_like(fa, dtype=torch.bool).scatter_(1, fa.topk(n, 1).indices, True)
    tb = torch.zeros_like(fb, dtype=torch.bool).scatter_(1, fb.topk(n, 1).indices, True)
    return (ta & tb).sum(1).float() / (ta | tb).sum(1).float()
