"""The Interpreter contract, shared helpers and the registry.

An interpreter holds its model and maps a batch of images to an :class:`Explanation` from one forward pass::

    interp = build_interpreter("cam", model)
    e = interp(x)                 # x (B, C, H, W) in [0, 1]; target=None means argmax
    e.logits                      # (B, K)
    e.saliency                    # (B, 1, h, w) in [0, 1] at the interpreter's native resolution
    interp.upsample(e.saliency, x.shape[-2:])   # for display and IoU

When ``x.requires_grad`` the map is connected to ``x`` by a graph valid to second order, so an attack can
optimise through it. A call never changes ``model.training`` or parameters' ``requires_grad`` and leaves no
hooks behind, even when it raises.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from underfire.guard.errors import UnderfireError


class InterpreterError(UnderfireError):
    """Bad input to an interpreter, or a model the interpreter cannot explain."""


@dataclass
class Explanation:
    """What an interpreter returns: the classifier's logits and the attribution map."""

    logits: torch.Tensor  # (B, K)
    saliency: torch.Tensor  # (B, 1, h, w) in [0, 1]


def minmax(m: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Min–max normalise each map of a batch to [0, 1]. m: (B, 1, h, w). A constant map becomes 0."""
    flat = m.flatten(1)
    lo = flat.amin(1, keepdim=True)
    hi = flat.amax(1, keepdim=True)
    return ((flat - lo) / (hi - lo + eps)).view_as(m)


_TRUSTED = contextvars.ContextVar("underfire_trusted_inputs", default=False)


@contextlib.contextmanager
def trusted_inputs() -> Iterator[None]:
    """Inside, ``check_input`` is skipped: for an attack loop whose inputs were validated once, since each
    check reads values back to the host (a device sync per step on GPU)."""
    token = _TRUSTED.set(True)
    try:
        yield
    finally:
        _TRUSTED.reset(token)


def check_input(x: torch.Tensor, model: nn.Module, target: torch.Tensor | None = None) -> None:
    """Raise InterpreterError for a wrong shape, channel count, range, NaN, or target."""
    if _TRUSTED.get():
        return
    if not isinstance(x, torch.Tensor):
        raise InterpreterError(f"input must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4:
        raise InterpreterError(f"input must have shape (B, C, H, W), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise InterpreterError("input batch is empty")
    c = getattr(model, "input_size", (x.shape[1],))[0]
    if x.shape[1] != c:
        raise InterpreterError(f"model {getattr(model, 'name', '')} takes {c} channels, input has {x.shape[1]}")
    x = x.detach()
    if not torch.isfinite(x).all():
        raise InterpreterError("input contains NaN or inf")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise InterpreterError(
            f"input must be images in [0, 1] (the model normalises them itself); got range [{lo:.3g}, {hi:.3g}]"
        )
    if target is not None:
        if target.shape != (x.shape[0],) or target.dtype not in (torch.int64, torch.int32):
            raise InterpreterError(f"target must be an integer tensor of shape ({x.shape[0]},), got "
                                   f"{tuple(target.shape)} {target.dtype}")
        k = getattr(model, "num_classes", None)
        if k is not None and (int(target.min()) < 0 or int(target.max()) >= k):
            raise InterpreterError(f"target class out of range [0, {k})")


@contextlib.contextmanager
def preserved_state(*modules: nn.Module) -> Iterator[None]:
    """Restore training flags and parameters' requires_grad on exit, even after an exception."""
    saved = [(m, m.training, [(p, p.requires_grad) for p in m.parameters()]) for m in modules]
    try:
        yield
    finally:
        for m, training, flags in saved:
            if m.training != training:
                m.train(training)
            for p, rg in flags:
                if p.requires_grad != rg:
                    p.requires_grad_(rg)


class Interpreter:
    """Base class: validation, state preservation, target selection; subclasses implement ``explain``.

    Attributes:
        name: registry key.
        model: the classifier (an ImageClassifier: images in [0, 1] -> logits).
    """

    name: str = "interpreter"
    # What torch.compile may wrap in compiled(): "model" (every classifier call) and "explain" (the whole
    # map). Interpreters whose attack needs a double backward (GRAD) compile nothing: compiled graphs
    # support only one backward.
    compile_parts: tuple[str, ...] = ("model", "explain")

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def compiled(self, **compile_kw) -> "Interpreter":
        """A view of this interpreter whose ``compile_parts`` run through torch.compile (the GPU path of an
        attack; off by default). The model's weights are shared; the original is unchanged."""
        import copy

        view = copy.copy(self)
        if "model" in self.compile_parts:
            view.model = torch.compile(self.model, **compile_kw)
        if "explain" in self.compile_parts:
            view.explain = torch.compile(view.explain, **compile_kw)
        return view

    def modules(self) -> tuple[nn.Module, ...]:
        """Modules the interpreter uses (its state is preserved across calls)."""
        return (self.model,)

    def to(self, device: torch.device | str) -> "Interpreter":
        for m in self.modules():
            m.to(device)
        return self

    def __call__(self, x: torch.Tensor, target: torch.Tensor | None = None) -> Explanation:
        check_input(x, self.model, target)
        with preserved_state(*self.modules()):
            e = self.explain(x, target)
        return e

    def explain(self, x: torch.Tensor, target: torch.Tensor | None) -> Explanation:  # pragma: no cover
        raise NotImplementedError

    def native_size(self, hw: tuple[int, int]) -> tuple[int, int]:
        """The (h, w) of the saliency map for inputs of spatial size ``hw``."""
        raise NotImplementedError

    def sampled(self, samples: int) -> "Interpreter | None":
        """A random estimate of this map from ``samples`` of the samples it averages over (IG's path points,
        SmoothGrad's noisy copies), drawn afresh at every call — what an attacker may optimise instead of the
        whole map, as EOT does (``attack_samples`` of an audit target): cheaper with fewer samples; a map that is
        itself random (SmoothGrad) also has a finer view with more. None: the map averages over no samples, or
        no such view differs from the map."""
        return None

    def tracking(self, steps: int) -> ContextManager["Interpreter"]:
        """A block in which differentiable explanations of an iterative interpreter (MASK) continue the previous
        one for ``steps`` optimisation steps instead of solving from scratch (an attack's inner loop; see
        ``Mask.tracking``). A no-op for interpreters computed in one pass."""
        return contextlib.nullcontext(self)

    @staticmethod
    def upsample(saliency: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
        """Bilinear upsampling of maps (B, 1, h, w) to ``size``, for display and IoU."""
        if tuple(saliency.shape[-2:]) == tuple(size):
            return saliency
        return F.interpolate(saliency, size=tuple(size), mode="bilinear", align_corners=False).clamp(0, 1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={getattr(self.model, 'name', type(self.model).__name__)})"


class FunctionInterpreter(Interpreter):
    """A team's own interpreter given as a callable ``fn(x, target) -> map`` (B, 1, h, w) or (B, h, w): the
    class is the model's prediction unless given; the map is min–max normalised. Differentiable when ``fn``
    is (torch operations all the way): then the white-box attacks reach it; the audit's pre-flight checks."""

    compile_parts = ()

    def __init__(self, model: nn.Module, fn: Callable, name: str = "function") -> None:
        super().__init__(model)
        self.fn, self.name = fn, name
        self._native: dict[tuple[int, int], tuple[int, int]] = {}

    def native_size(self, hw):
        hw = tuple(hw)
        if hw not in self._native:
            p = next(self.model.parameters())
            self._native[hw] = tuple(self.explain(torch.rand(1, self.model.input_size[0], *hw, device=p.device,
                                                             dtype=p.dtype), None).saliency.shape[-2:])
        return self._native[hw]

    def explain(self, x, target):
        logits = self.model(x)
        t = pick_target(logits, target).detach()
        try:
            m = self.fn(x, t)
        except InterpreterError:
            raise
        except Exception as exc:  # noqa: BLE001 (a team's code fails in its own ways: name it, no traceback)
            msg = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            raise InterpreterError(f"interpreter {self.name!r} raised {type(exc).__name__}"
                                   f"{': ' + msg if msg else ''} (on a batch of {len(x)} inputs)") from exc
        if not isinstance(m, torch.Tensor):
            raise InterpreterError(f"interpreter {self.name!r} returned {type(m).__name__}, expected a tensor map")
        if m.ndim == 3:
            m = m[:, None]
        if m.ndim != 4 or m.shape[0] != x.shape[0] or m.shape[1] != 1:
            raise InterpreterError(f"interpreter {self.name!r} returned a map of shape {tuple(m.shape)}; expected "
                                   f"(B, 1, h, w) or (B, h, w) with B = {x.shape[0]}")
        if m.numel() == 0:
            raise InterpreterError(f"interpreter {self.name!r} returned an empty map (shape {tuple(m.shape)})")
        m = m.to(x.dtype)
        if not torch.isfinite(m).all():
            raise InterpreterError(f"interpreter {self.name!r} returned NaN or inf")
        return Explanation(logits, minmax(m))


def pick_target(logits: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    return logits.argmax(1) if target is None else target.to(logits.device)


REGISTRY: dict[str, Callable[..., Interpreter]] = {}


BETA = 3.0  # β of beta:grad: softplus-3 is visibly smoother than ReLU on [0, 1] images yet keeps the map's shape


def register(name: str):
    """Class decorator: make an interpreter buildable by name."""

    def deco(cls):
        cls.name = name
        REGISTRY[name] = cls
        return cls

    return deco


def check_name(name: str) -> None:
    """Refuse an interpreter name that :func:`build_interpreter` could never build, without a model (so that an
    audit names a bad interpreter before anything loads). The part that is unknown is the one named: the inner
    map of ``smooth:<name>`` / ``opaque:<name>``, or the surrogate of ``opaque:<name>@<surrogate>``."""
    from underfire.guard import interpreters  # noqa: F401  (fills the registry)

    def plain(n: str, what: str | None) -> None:
        if n not in REGISTRY and n not in ("smoothgrad", "beta:grad"):
            known = ", ".join(sorted([*REGISTRY, "smoothgrad", "beta:grad"]))
            raise InterpreterError(f"unknown interpreter {n!r}; known: {known}" if what is None else
                                   f"{what} {n!r} is not a known interpreter; known: {known}")

    if not isinstance(name, str) or not name:
        raise InterpreterError(f"an interpreter name is a non-empty string, got {name!r}")
    prefix, colon, rest = name.partition(":")
    if not colon or name == "beta:grad":
        return plain(name, None)
    if prefix == "smooth":
        if rest == "mask" or rest.startswith("smooth:"):
            raise InterpreterError(f"{name!r}: smoothing wraps a one-pass interpreter (grad, cam, rts), not {rest!r}")
        return plain(rest, f"in {name!r}, the smoothed interpreter")
    if prefix == "opaque":
        inner, at, surrogate = rest.partition("@")
        plain(inner, f"in {name!r}, the served interpreter")
        if at:
            plain(surrogate, f"in {name!r}, the surrogate")
        return None
    if prefix in ("captum", "gradcam"):
        if not rest:
            raise InterpreterError(f"{name!r}: name a method, e.g. captum:IntegratedGradients or gradcam:GradCAM")
        return None
    if prefix == "beta":
        raise InterpreterError(f"{name!r}: β-smoothing changes a gradient map's backward pass; only 'beta:grad' exists")
    raise InterpreterError(f"interpreter {name!r} has an unknown prefix {prefix!r}: known prefixes are smooth:, "
                           f"captum:, gradcam:, opaque:")


def build_interpreter(name: str, model: nn.Module, **kwargs) -> Interpreter:
    """Build a registered interpreter by name (grad, cam, mask, rts); kwargs go to its constructor.

    ``smooth:<name>`` wraps interpreter ``<name>`` in :class:`guard.smoothing.Smoothed` (kwargs: sigma, samples).
    ``captum:<Method>`` / ``gradcam:<Method>`` adapt captum / pytorch-grad-cam (:mod:`guard.adapters`);
    ``opaque:<name>[@<surrogate>]`` serves ``<name>`` as a black box (no gradient; a surrogate to transfer from).
    ``smoothgrad`` is ``smooth:grad`` with SmoothGrad's noise (σ = 0.15, 16 copies; kwargs sigma, samples).
    ``beta:grad`` is β-smoothed GRAD (Dombrowski et al. 2019): the deployed gradient map is computed through
    softplus-β in place of every ReLU in the backward pass, always (kwargs: beta, default ``BETA``).
    """
    check_name(name)  # the one place that knows which names exist (and fills the registry)
    if name.startswith("smooth:"):
        from underfire.guard.smoothing import Smoothed

        return Smoothed(build_interpreter(name.split(":", 1)[1], model), **kwargs)

    if name.startswith(("captum:", "gradcam:", "opaque:")):  # the reference libraries (optional extras) and
        # black-box views of native interpreters (guard/adapters.py)
        from underfire.guard.adapters import build_adapter

        return build_adapter(name, model, **kwargs)

    if name == "smoothgrad":  # SmoothGrad (Smilkov et al. 2017): GRAD averaged over noisy copies, σ = 15% of the
        # range, the copies not clipped (captum NoiseTunnel's convention)
        from underfire.guard.smoothing import Smoothed

        sm = Smoothed(build_interpreter("grad", model), sigma=kwargs.pop("sigma", 0.15),
                      samples=kwargs.pop("samples", 16), clip=kwargs.pop("clip", False), **kwargs)
        sm.name = "smoothgrad"
        return sm

    if name == "beta:grad":
        grad = build_interpreter("grad", model, surrogate="softplus", always_surrogate=True,
                                 beta=kwargs.pop("beta", BETA), **kwargs)
        grad.name = name
        return grad

    factory = getattr(REGISTRY[name], "for_model", REGISTRY[name])
    return factory(model, **kwargs)
