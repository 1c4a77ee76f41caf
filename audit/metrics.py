"""Per-sample, stateless scores. Each returns a (B,) tensor and states whether higher is better;
aggregation (mean, std, bootstrap CI) happens once, in the runner.

    asr        1 if argmax f(x*) = c_t                                   higher is better (for the attacker)
    confidence max softmax of f(x*) (MC is its mean over successes)       higher is better (for the attacker)
    l1         mean |m − m'| per pixel, maps at a common resolution       lower = maps closer
    iou_at_k   IoU of the top-k% pixels of the two maps                  higher = maps closer
    iou_curve  IoU over k ∈ {5, 10, …, 95}%; iou_mean its mean

Rates (ASR, detection, spoofability) are counts out of n and carry exact binomial intervals
(:func:`rate`, Clopper–Pearson); means of continuous scores carry a bootstrap interval (in the runner).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from underfire.guard.maps import iou_at_k, l1  # noqa: F401  (the map distances live with the detectors)

K_GRID = tuple(range(5, 100, 5))


@dataclass(frozen=True)
class Score:
    name: str
    fn: Callable[..., torch.Tensor]
    higher_is_better: bool
    doc: str


def rate(k: int, n: int, level: float = 0.95) -> dict:
    """A rate k/n with its exact (Clopper–Pearson) interval, from scipy.stats.binomtest.

    ``{"mean": k/n, "k": k, "n": n, "ci95": [lo, hi], "interval": "clopper-pearson"}``; 8/8 gives
    [0.631, 1.0]. n = 0 gives mean None and no interval (nothing was measured).
    """
    from scipy.stats import binomtest

    k, n = int(k), int(n)
    if n == 0:
        return {"mean": None, "k": 0, "n": 0, "ci95": None, "interval": "clopper-pearson"}
    ci = binomtest(k, n).proportion_ci(confidence_level=level, method="exact")
    return {"mean": k / n, "k": k, "n": n, "ci95": [float(ci.low), float(ci.high)], "interval": "clopper-pearson"}


def attack_success(logits: torch.Tensor, y_target: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(1) == y_target).float()


def confidence(logits: torch.Tensor) -> torch.Tensor:
    return logits.softmax(1).amax(1)


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
