"""Occlusion (Zeiler & Fergus 2014) computed natively: batched, and differentiable in the input.

A square window of ``window`` pixels slides over the image with ``stride`` (default: 1/7 of the side and
half of that, the adapter's choice for captum's Occlusion); for every window position p the image is copied
with the window set to the baseline 0 (all channels), and

    a(pixel) = mean over the windows p covering the pixel of  [ z_t(x) − z_t(x with window p occluded) ]
    map      = minmax( avgpool_pool( |a| ) )

— captum's ``Occlusion.attribute(x, target, sliding_window_shapes=(C, s, s), strides=(C, s/2, s/2))`` followed
by the post-processing of ``captum:<Method>`` (|a|, max over channels, average pool 4, min–max). Window
positions are captum's: every ``stride`` pixels until the window reaches the far side, the last one cut at
the border. Every occluded copy of every image of the batch goes through the model in chunks of ``chunk``
images (default: 2^18 input values per chunk on CPU — 334 images of 28×28, 1 of 224×224×3, the fastest of
64 / 256 / 1024 / 2704 measured on 28×28 — and 2^24 on a GPU).

The map is a difference of the model's own logits, so when ``x.requires_grad`` it carries an exact gradient
(one backward through the occluded forwards; no ReLU surrogate is involved): this is the native twin through
which a gray-box attacker — who has the classifier — attacks captum's Occlusion.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from underfire.guard.interpreters.base import Explanation, Interpreter, InterpreterError, minmax, pick_target, register


def default_window(side: int) -> tuple[int, int]:
    """(window, stride) for a side of ``side`` pixels: 1/7 of the side, stride half of it."""
    s = max(1, side // 7)
    return s, max(1, s // 2)


@register("occlusion", preset="grad", label="Occlusion")
class Occlusion(Interpreter):
    """Occlusion's map with a gradient (see the module docstring)."""

    def __init__(self, model, window: int | None = None, stride: int | None = None, pool: int = 4,
                 chunk: int | None = None) -> None:
        super().__init__(model)
        if any(v is not None and v < 1 for v in (window, stride, pool, chunk)):
            raise InterpreterError(f"occlusion needs window, stride, pool and chunk ≥ 1, got {window}, {stride}, "
                                   f"{pool}, {chunk}")
        self.window, self.stride, self.pool, self.chunk = window, stride, pool, chunk
        self._masks: dict = {}

    def native_size(self, hw):
        return (hw[0] // self.pool, hw[1] // self.pool)

    def masks(self, hw: tuple[int, int], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The window indicators (P, H, W) and how many windows cover each pixel (H, W), cached per size."""
        key = (tuple(hw), like.device, like.dtype)
        if key not in self._masks:
            h, w = hw
            s, st = default_window(min(h, w))
            s, st = self.window or s, self.stride or st
            if s > min(h, w):
                raise InterpreterError(f"occlusion window {s} is larger than the {h}×{w} input")
            # captum's positions: ceil((side − s) / stride) + 1 per side, the last window cut at the border
            rows, cols = ([i * st for i in range(math.ceil((n - s) / st) + 1)] for n in (h, w))
            m = torch.zeros(len(rows) * len(cols), h, w, dtype=like.dtype, device=like.device)
            for i, (r, c) in enumerate((r, c) for r in rows for c in cols):
                m[i, r:r + s, c:c + s] = 1
            self._masks[key] = (m, m.sum(0))
        return self._masks[key]

    def explain(self, x, target):
        graph = x.requires_grad and torch.is_grad_enabled()
        with torch.set_grad_enabled(graph):
            logits = self.model(x)
            t = pick_target(logits, target).detach()
            m, count = self.masks(tuple(x.shape[-2:]), x)
            p = m.shape[0]
            occluded = (x[:, None] * (1 - m[None, :, None])).flatten(0, 1)  # (B·P, C, H, W), baseline 0
            tp = t.repeat_interleave(p)
            k = self.chunk or max(1, (2 ** 24 if x.is_cuda else 2 ** 18) // x[0].numel())
            z = torch.cat([self.model(occluded[i:i + k]).gather(1, tp[i:i + k, None])[:, 0]
                           for i in range(0, len(occluded), k)]).view(-1, p)
            delta = logits.gather(1, t[:, None]) - z  # (B, P)
            a = torch.einsum("bp,phw->bhw", delta, m) / count.clamp(min=1)
            sal = a.abs()[:, None]
            if self.pool > 1:
                sal = F.avg_pool2d(sal, self.pool)
            sal = minmax(sal)
        if not graph:
            logits, sal = logits.detach(), sal.detach()
        return Explanation(logits, sal)
