"""Grad-CAM (Selvaraju et al. 2017) and Grad-CAM++ (Chattopadhay et al. 2018) for any classifier.

For the activations A (B, K', h, w) of one layer and g = ∂z_t/∂A (the target logit's gradient):

    gradcam:    α_k = mean_hw g_k                                     map = minmax( relu( Σ_k α_k A_k ) )
    gradcampp:  α_k = Σ_hw relu(g_k) · g_k² / (2 g_k² + Σ_hw A_k · g_k³)   (pytorch-grad-cam's closed form)

The layer is chosen by module name (``layer="features"``, as in ``model.named_modules()`` of the wrapped
net) or, by default, the last module whose output is a spatial feature map (h, w ≥ 2) in execution order —
the last conv block (ResNet ``layer4``, MobileNetV2 ``features``), the layer pytorch-grad-cam's examples use.
Unlike CAM it needs no GAP + linear head. For an attack (second order) the ReLUs after the layer use GRAD's
surrogate backward, so ∂ map/∂x exists; the forward value is unchanged.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from underfire.guard.interpreters.base import Explanation, Interpreter, InterpreterError, minmax, pick_target, register
from underfire.guard.interpreters.grad import ReluSurrogate


def feature_layers(model: nn.Module, hw: tuple[int, int] | None = None) -> list[tuple[str, tuple[int, ...]]]:
    """(name, output shape) of every module with a 4-D output with h, w ≥ 2, in the order outputs appear."""
    p = next(model.parameters())
    c = model.input_size[0] if hasattr(model, "input_size") else 3
    hw = hw or (tuple(model.input_size[1:]) if hasattr(model, "input_size") else (224, 224))
    seen: list[tuple[str, tuple[int, ...]]] = []
    hooks = []
    for name, mod in model.named_modules():
        if name:
            hooks.append(mod.register_forward_hook(
                lambda m, i, o, name=name: seen.append((name, tuple(o.shape)))
                if isinstance(o, torch.Tensor) and o.ndim == 4 and min(o.shape[-2:]) >= 2 else None))
    try:
        with torch.no_grad():
            model(torch.zeros(1, c, *hw, device=p.device, dtype=p.dtype))
    finally:
        for h in hooks:
            h.remove()
    return seen


class _GradCAMBase(Interpreter):
    compile_parts = ()  # the map is a gradient: its attack needs a double backward

    def __init__(self, model, layer: str | None = None, surrogate: str = "smooth") -> None:
        super().__init__(model)
        modules = dict(model.named_modules())
        if layer is None:
            found = feature_layers(model)
            if not found:
                raise InterpreterError(f"{self.name} needs a layer with a spatial output; model "
                                       f"{getattr(model, 'name', type(model).__name__)} has none")
            layer = found[-1][0]
        if layer not in modules or not layer:
            names = [n for n, _ in feature_layers(model)][-8:]
            raise InterpreterError(f"{self.name}: no layer named {layer!r}; the last spatial layers are {names}")
        self.layer_name, self.layer = layer, modules[layer]
        self.surrogate = surrogate
        self._native: dict[tuple[int, int], tuple[int, int]] = {}

    def native_size(self, hw):
        hw = tuple(hw)
        if hw not in self._native:
            shapes = dict(feature_layers(self.model, hw))
            if self.layer_name not in shapes:
                raise InterpreterError(f"layer {self.layer_name!r} has no spatial output for {hw} inputs")
            self._native[hw] = shapes[self.layer_name][-2:]
        return self._native[hw]

    def weights(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:  # (B, K') per channel
        raise NotImplementedError

    def explain(self, x, target):
        second_order = x.requires_grad and torch.is_grad_enabled()
        store = {}
        hook = self.layer.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
        try:
            with torch.enable_grad(), (ReluSurrogate(self.surrogate) if second_order else contextlib.nullcontext()):
                xg = x if second_order else x.detach().requires_grad_(True)
                logits = self.model(xg)
                a = store["a"]
                t = pick_target(logits, target)
                (g,) = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), a, create_graph=second_order)
                cam = torch.relu((self.weights(a, g)[:, :, None, None] * a).sum(1, keepdim=True))
        finally:
            hook.remove()
        sal = minmax(cam)
        if not second_order:
            logits, sal = logits.detach(), sal.detach()
        return Explanation(logits, sal)


@register("gradcam", preset="cam", label="Grad-CAM")
class GradCAM(_GradCAMBase):
    """Grad-CAM: channel weights = spatial mean of the gradient."""

    def weights(self, a, g):
        return g.mean((2, 3))


@register("gradcampp", preset="cam", label="Grad-CAM++")
class GradCAMPlusPlus(_GradCAMBase):
    """Grad-CAM++: channel weights from the closed-form second/third-order terms."""

    def weights(self, a, g):
        g2, g3 = g * g, g * g * g
        denom = 2 * g2 + a.sum((2, 3), keepdim=True) * g3
        aij = torch.where(g != 0, g2 / torch.where(denom != 0, denom, torch.ones_like(denom)), torch.zeros_like(g))
        return (aij * torch.relu(g)).sum((2, 3))
