"""Target classes and the three kinds of target map (ADV² paper, Tables 3, 6 and 8).

1. ``benign_maps``: the interpreter's map of x0 itself (the prediction flips, the map looks unchanged);
2. ``random_shapes``: circles and rotated rectangles, ~1 inside and ~0 outside ("random patch");
3. ``other_class_maps``: the benign map of another image whose class is c_t ("random class").

Target classes are drawn as c_t = (y + randint(1, K)) mod K, so c_t ≠ y.
"""

from __future__ import annotations

import math

import torch

from underfire.attacks.threats import AttackError


def target_classes(y: torch.Tensor, num_classes: int, gen: torch.Generator | None = None) -> torch.Tensor:
    """c_t = (y + randint(1, K)) mod K. y: (B,) -> (B,)."""
    if num_classes < 2:
        raise AttackError("a targeted attack needs at least 2 classes")
    shift = torch.randint(1, num_classes, y.shape, generator=gen)
    return (y.cpu() + shift).remainder(num_classes).to(y.device)


@torch.no_grad()
def benign_maps(interp, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    """The interpreter's own map of x for class ``target`` (None: its predicted class): (B, 1, h, w)."""
    return interp(x, target).saliency.detach()


def random_shapes(n: int, size: tuple[int, int], gen: torch.Generator | None = None,
                  soft: float = 0.05) -> torch.Tensor:
    """Random circles or rotated rectangles covering ~10–35% of the map, ~1 inside and ~0 outside. (n, 1, h, w)."""
    h, w = size
    ys, xs = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    out = torch.empty(n, 1, h, w)
    for i in range(n):  # n small shapes; this runs once per attack batch, not in the loop
        r = torch.rand(6, generator=gen)
        cy, cx = 0.25 + 0.5 * r[0], 0.25 + 0.5 * r[1]
        if r[2] < 0.5:  # circle
            rad = 0.18 + 0.15 * r[3]
            d = torch.sqrt((ys - cy) ** 2 + (xs - cx) ** 2) - rad
        else:  # rotated rectangle
            a, hw_, hh = math.pi * r[3], 0.12 + 0.2 * r[4], 0.1 + 0.15 * r[5]
            u = (xs - cx) * math.cos(a) + (ys - cy) * math.sin(a)
            v = -(xs - cx) * math.sin(a) + (ys - cy) * math.cos(a)
            d = torch.maximum(u.abs() - hw_, v.abs() - hh)
        out[i, 0] = torch.sigmoid(-d / soft)
    return out


@torch.no_grad()
def other_class_maps(interp, y_target: torch.Tensor, pool_x: torch.Tensor, pool_y: torch.Tensor,
                     gen: torch.Generator | None = None) -> torch.Tensor:
    """For each c_t, the benign map of a random pool image of class c_t (B, 1, h, w)."""
    picks = []
    for c in y_target.tolist():
        cand = (pool_y == c).nonzero().squeeze(1)
        if cand.numel() == 0:
            raise AttackError(f"no image of target class {c} in the pool for 'other class' target maps")
        picks.append(int(cand[torch.randint(cand.numel(), (1,), generator=gen)]))
    return interp(pool_x[picks].to(y_target.device)).saliency.detach()
