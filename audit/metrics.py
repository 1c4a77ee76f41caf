"""Per-sample, stateless scores. Each returns a (B,) tensor and states whether higher is better;
aggregation (mean, std, bootstrap CI) happens once, in the runner.

    asr        1 if argmax f(x*) = c_t                                   higher is better (for the attacker)
    confidence max softmax of f(x*) (MC is its mean over successes)       higher is better (for the attacker)
    l1         mean |m − m'| per pixel, maps at a common resolution       lower = maps closer
    iou_at_k   IoU of the top-k% pixels of the two maps                  higher = maps closer
    iou_curve  IoU over k ∈ {5, 10, …, 95}%; iou_mean its mean
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

K_GRID = tuple(range(5, 100, 5))


@dataclass(frozen=True)
class Score:
    name: str
    fn: Callable[..., torch.Tensor]
    higher_is_better: bool
    doc: str


def _common(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring two map batches (B, 1, h, w) to the larger of their resolutions (bilinear)."""
    size = max(a.shape[-2:], b.shape[-2:], key=lambda s: s[0] * s[1])
    a = a if a.shape[-2:] == size else F.interpolate(a, size=size, mode="bilinear", align_corners=False)
    b = b if b.shape[-2:] == size else F.interpolate(b, size=size, mode="bilinear", align_corners=False)
    return a, b


def attack_success(logits: torch.Tensor, y_target: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(1) == y_target).float()


def confidence(logits: torch.Tensor) -> torch.Tensor:
    return logits.softmax(1).amax(1)


def l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = _common(a, b)
    return (a - b).abs().flatten(1).mean(1)


def iou_at_k(a: torch.Tensor, b: torch.Tensor, k: float) -> torch.Tensor:
    """IoU of the sets of top-k% pixels (ties broken by index). k in (0, 100)."""
    a, b = _common(a, b)
    fa, fb = a.flatten(1), b.flatten(1)
    n = max(1, round(fa.shape[1] * k / 100))
    ta = torch.zeros_like(fa, dtype=torch.bool).scatter_(1, fa.topk(n, 1).indices, True)
    tb = torch.zeros_like(fb, dtype=torch.bool).scatter_(1, fb.topk(n, 1).indices, True)
    return (ta & tb).sum(1).float() / (ta | tb).sum(1).float()


def iou_curve(a: torch.Tensor, b: torch.Tensor, ks=K_GRID) -> torch.Tensor:
    """(B, len(ks)) IoU at each k."""
    return torch.stack([iou_at_k(a, b, k) for k in ks], 1)


def iou_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return iou_curve(a, b).mean(1)


SCORES = {
    "asr": Score("asr", attack_success, True, "argmax f(x*) = c_t on the 8-bit image"),
    "confidence": Score("confidence", confidence, True, "max softmax probability of f(x*)"),
    "l1": Score("l1", l1, False, "mean absolute per-pixel difference between two maps in [0,1]"),
    "iou": Score("iou", iou_mean, True, "mean over k=5..95% of IoU of the top-k% pixels"),
}


def transfer_matrix(results: dict[str, torch.Tensor], readers: dict[str, Callable[[torch.Tensor], torch.Tensor]],
                    benign: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """L1 per sample of maps read by interpreter B (columns) on x* made against interpreter A (rows).

    Args:
        results: source interpreter -> x_adv (B, C, H, W).
        readers: target interpreter -> function x -> map.
        benign: target interpreter -> benign map of x0 (B, 1, h, w).
    """
    return {a: {b: l1(readers[b](xa), benign[b]) for b in readers} for a, xa in results.items()}
