"""Adapters to the libraries teams explain with, behind the Interpreter contract, and the transfer wrapper
that lets a gradient attack reach an interpreter that has no gradient.

    build_interpreter("captum:IntegratedGradients", model)   # any attribution class of captum.attr
    build_interpreter("gradcam:GradCAMPlusPlus", model)      # any CAM class of pytorch-grad-cam
    build_interpreter("opaque:mask@cam", model)              # a native map served as a black box

``captum:<Method>`` calls ``Method(model).attribute(x, target=t, **kw)`` and post-processes like GRAD
(|a|, max over channels, avg-pool 4, min–max); Occlusion gets a window of 1/7 of the side, stride half
of it. ``gradcam:<Method>`` runs the CAM class on the layer the native ``gradcam`` picks and brings its map
(numpy, resized to the input) back to that layer's resolution (area average), then min–max. Both compute
without a graph to the input: their maps carry no gradient (captum's gradients are taken without
``create_graph``; pytorch-grad-cam works in numpy). ``opaque:<name>`` serves a native map the same way,
to measure what the missing gradient costs; ``@<surrogate>`` names the interpreter to transfer from.

Each adapter names its native twin (``twin``): the native interpreter computing the same map with a
gradient (``gradcam`` for GradCAM, ``ig`` for IntegratedGradients, ``occlusion`` for Occlusion, ...).
:class:`Transfer` pairs them: a differentiable call (the attacker's view) returns the twin's map, any other
call (benign maps, judging iterates, the report) the adapter's real map — so ADV² through the one loop
optimises the twin and every iterate is judged by the deployed map: a transfer result, and the audit says so.
"""

from __future__ import annotations

import importlib
from typing import Callable

import torch
import torch.nn.functional as F

from underfire.guard.interpreters.base import Explanation, Interpreter, InterpreterError, minmax, pick_target
from underfire.guard.interpreters.occlusion import default_window

CAPTUM_TWINS = {"Saliency": "grad:logit", "IntegratedGradients": "ig", "InputXGradient": "inputxgrad",
                "Occlusion": "occlusion"}
GRADCAM_TWINS = {"GradCAMPlusPlus": "gradcampp"}  # the other CAM classes: gradcam
EXTRAS = {"captum": "captum", "gradcam": "pytorch_grad_cam"}


def _import(prefix: str):
    try:
        return importlib.import_module(EXTRAS[prefix] + ("" if prefix == "gradcam" else ".attr"))
    except ImportError:
        raise InterpreterError(f"{prefix}:<Method> needs the {prefix} extra: pip install 'underfire[{prefix}]'") from None


def _method(prefix: str, method: str):
    lib = _import(prefix)
    cls = getattr(lib, method, None)
    if not isinstance(cls, type):
        known = sorted(n for n in dir(lib) if n[0].isupper() and (prefix != "gradcam" or "CAM" in n))
        raise InterpreterError(f"{prefix} has no method {method!r}; e.g. {', '.join(known[:12])}")
    return cls


class Adapter(Interpreter):
    compile_parts = ()
    twin: str | None = None

    def __init__(self, model, prefix: str, method: str, **kw) -> None:
        super().__init__(model)
        self.cls = _method(prefix, method)
        self.name, self.method, self.kw = f"{prefix}:{method}", method, kw


class CaptumAdapter(Adapter):
    """A captum attribution method; the map is GRAD's post-processing of its attribution."""

    def __init__(self, model, method: str, pool: int = 4, **kw) -> None:
        super().__init__(model, "captum", method, **kw)
        self.pool, self.twin = pool, CAPTUM_TWINS.get(method)
        try:
            self.attr = self.cls(model)
        except TypeError as exc:
            raise InterpreterError(f"captum:{method} cannot be built from the model alone ({exc}); layer and "
                                   f"neuron methods are not supported") from None

    def native_size(self, hw):
        return (hw[0] // self.pool, hw[1] // self.pool)

    def explain(self, x, target):
        with torch.no_grad():
            logits = self.model(x)
        t = pick_target(logits, target)
        kw = dict(self.kw)
        if self.method == "Occlusion" and "sliding_window_shapes" not in kw:
            s, st = default_window(min(x.shape[-2:]))
            kw.update(sliding_window_shapes=(x.shape[1], s, s), strides=(x.shape[1], st, st))
        with torch.enable_grad():
            a = self.attr.attribute(x.detach().clone().requires_grad_(True), target=t, **kw)
        sal = a.detach().abs().amax(1, keepdim=True)
        if self.pool > 1:
            sal = F.avg_pool2d(sal, self.pool)
        return Explanation(logits.detach(), minmax(sal))


class GradCamAdapter(Adapter):
    """A pytorch-grad-cam CAM class at the native ``gradcam``'s layer (or ``layer``)."""

    def __init__(self, model, method: str, layer: str | None = None, **kw) -> None:
        from underfire.guard.interpreters.gradcam import GradCAM

        super().__init__(model, "gradcam", method, **kw)
        self.native = GradCAM(model, layer)
        self.twin = GRADCAM_TWINS.get(method, "gradcam")

    def native_size(self, hw):
        return self.native.native_size(hw)

    def explain(self, x, target):
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        with torch.no_grad():
            logits = self.model(x)
        t = pick_target(logits, target)
        with torch.enable_grad(), self.cls(model=self.model, target_layers=[self.native.layer], **self.kw) as cam:
            m = cam(input_tensor=x.detach(), targets=[ClassifierOutputTarget(int(c)) for c in t])  # (B, H, W)
        m = torch.as_tensor(m, dtype=x.dtype, device=x.device)[:, None]
        return Explanation(logits.detach(), minmax(F.adaptive_avg_pool2d(m, self.native_size(tuple(x.shape[-2:])))))


class Opaque(Adapter):
    """A native interpreter served as a black box, as an explanation API serves it: ``opaque:<name>`` answers
    with ``<name>``'s map and never a gradient; ``opaque:<name>@<surrogate>`` also names the differentiable
    surrogate a transfer attack optimises (e.g. ``opaque:mask@cam``; without one, queries only). For audits of
    what the missing gradient costs the attacker, beside the white-box ``<name>``."""

    def __init__(self, model, inner: str, surrogate: str | None, build: Callable[..., Interpreter], **kw) -> None:
        Interpreter.__init__(self, model)
        if not inner or inner.startswith(("opaque:", "captum:", "gradcam:")):
            raise InterpreterError(f"opaque:<name> serves a native interpreter as a black box; got {inner!r}")
        if surrogate is not None and surrogate.startswith(("opaque:", "captum:", "gradcam:")):
            raise InterpreterError(f"the surrogate of opaque:{inner} must be a native interpreter with a gradient, "
                                   f"not {surrogate!r}")
        name = f"opaque:{inner}" + (f"@{surrogate}" if surrogate else "")
        self.inner = build(inner, model, **kw)
        self.name = name
        self.method, self.kw, self.twin = inner, kw, surrogate

    def modules(self):
        return self.inner.modules()

    def native_size(self, hw):
        return self.inner.native_size(hw)

    def explain(self, x, target):
        e = self.inner(x.detach(), target)
        return Explanation(e.logits.detach(), e.saliency.detach())


class Transfer(Interpreter):
    """The attacker's view of an interpreter without a gradient: differentiable calls return ``twin``'s map
    (resized to the real map's resolution), all others ``real``'s (see the module docstring). Its name is the
    real interpreter's."""

    compile_parts = ()

    def __init__(self, twin: Interpreter, real: Interpreter) -> None:
        if twin.model is not real.model:
            raise InterpreterError("a transfer pair must explain the same model object")
        super().__init__(real.model)
        self.twin, self.real, self.name = twin, real, real.name

    @property
    def traits(self):
        """The twin's: the attacker optimises the twin's map (its ADV² preset), the real map judges."""
        return self.twin.traits

    def modules(self):
        return tuple({id(m): m for m in (*self.twin.modules(), *self.real.modules())}.values())

    def native_size(self, hw):
        return self.real.native_size(hw)

    def explain(self, x, target):
        if not (x.requires_grad and torch.is_grad_enabled()):
            return self.real(x, target)
        e = self.twin(x, target)  # at the real map's resolution, so every distance is the deployed map's
        size = tuple(self.real.native_size(tuple(x.shape[-2:])))
        if tuple(e.saliency.shape[-2:]) != size:
            e = Explanation(e.logits, minmax(F.interpolate(e.saliency, size=size, mode="bilinear", align_corners=False)))
        return e


def build_adapter(name: str, model, build: Callable[..., Interpreter], **kw) -> Interpreter:
    """The adapter ``name`` (``captum:``, ``gradcam:`` or ``opaque:``); ``build`` builds native interpreters by
    name (``guard.registry.build_interpreter``, handed in so that this module needs no registry)."""
    prefix, _, method = name.partition(":")
    if prefix == "opaque":
        inner, _, surrogate = method.partition("@")
        return Opaque(model, inner, surrogate or None, build, **kw)
    if not method:
        raise InterpreterError(f"{name!r}: name a method, e.g. captum:IntegratedGradients or gradcam:GradCAM")
    return CaptumAdapter(model, method, **kw) if prefix == "captum" else GradCamAdapter(model, method, **kw)


def build_twin(adapter: Interpreter, model, build: Callable[..., Interpreter]) -> Interpreter | None:
    """The adapter's native twin (``grad:logit`` is GRAD on the logit, captum's Saliency), or None; ``build``
    as in :func:`build_adapter`."""
    twin = getattr(adapter, "twin", None)
    if twin is None:
        return None
    if twin == "grad:logit":
        return build("grad", model, loss="logit")
    kw = {"layer": adapter.native.layer_name} if isinstance(adapter, GradCamAdapter) else {}
    if twin == "occlusion" and isinstance(adapter, CaptumAdapter):  # the adapter's windows (its own if given)
        shape, strides = adapter.kw.get("sliding_window_shapes"), adapter.kw.get("strides")
        kw = {"pool": adapter.pool, "window": shape[-1] if shape else None,
              "stride": (strides[-1] if isinstance(strides, tuple) else strides) if strides else None}
    return build(twin, model, **kw)
