"""CAM: class activation mapping (Zhou et al., CVPR 2016).

For a classifier ending in global average pooling + one linear layer W, with last-conv features A:

    map_t = minmax( Σ_k W[t, k] · A_k )          (B, 1, h, w): 7×7 for a 224 ResNet/MobileNetV2, no ReLU

Logits come from the same forward pass: W · mean_hw(A) + b. The map is differentiable in x to any order.
A model without such a head raises an error that says what CAM needs.
"""

from __future__ import annotations

import torch

from underfire.guard.interpreters.base import Explanation, Interpreter, InterpreterError, minmax, pick_target, register
from underfire.guard.errors import CamUnsupportedError


@register("cam", preset="cam", label="CAM")
class CAM(Interpreter):
    """Class activation map at the resolution of the last conv features."""

    def __init__(self, model) -> None:
        super().__init__(model)
        if not hasattr(model, "cam_parts"):
            raise InterpreterError("CAM needs an underfire ImageClassifier (guard.models.load_model)")
        try:
            self.features, self.head = model.cam_parts()
        except CamUnsupportedError as exc:
            raise InterpreterError(str(exc)) from exc
        self._native: dict[tuple[int, int], tuple[int, int]] = {}

    def native_size(self, hw):
        hw = tuple(hw)
        if hw not in self._native:
            c = self.model.input_size[0]
            p = next(self.model.parameters())
            with torch.no_grad():
                self._native[hw] = tuple(self.features(torch.zeros(1, c, *hw, device=p.device, dtype=p.dtype)).shape[-2:])
        return self._native[hw]

    def explain(self, x, target):
        with torch.set_grad_enabled(torch.is_grad_enabled() and x.requires_grad):
            a = self.features(x)  # (B, K', h, w)
            logits = self.head(a.mean((2, 3)))  # (B, K)
            t = pick_target(logits, target)
            w = self.head.weight[t]  # (B, K')
            cam = torch.einsum("bk,bkhw->bhw", w, a).unsqueeze(1)  # (B, 1, h, w)
            return Explanation(logits, minmax(cam))
