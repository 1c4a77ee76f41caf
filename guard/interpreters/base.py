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


@dataclass(frozen=True)
class Traits:
    """What the rest of underfire needs to know of an interpreter, declared once where it is registered (the
    contract table of docs/architecture.md): the CLI, the audit, the attacks and the report read these, never
    an interpreter's name.

    preset: the ADV² settings it is attacked with: a row of ``attacks.adv2.PAPER`` ("grad", "cam", "rts") or
        "mask" (the bilevel ``MaskAdv2`` for an iterative solver).
    label: as the report shows it.
    iterative: each map is an optimisation of its own (MASK): left out of the default detector members and
        adaptive attacks (their cost), never smoothed, its pre-flight gradient check left to the test suite.
    random: each call draws noise (SmoothGrad, ``smooth:``): attacks take an expectation (EOT).
    variants: map defense → the registry name deployed in its place (``{"beta": "beta:grad"}``).
    """

    preset: str
    label: str
    iterative: bool = False
    random: bool = False
    variants: tuple[tuple[str, str], ...] = ()

    def variant(self, defense: str) -> str | None:
        return dict(self.variants).get(defense)


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
    # A team's own interpreter (a callable, or a subclass that declares nothing) is attacked with CAM's preset,
    # the one that suits a map of any resolution; ``register`` or a subclass's own ``traits`` say otherwise.
    traits: Traits = Traits(preset="cam", label="a team's map")

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
        grad_wanted = torch.is_grad_enabled()
        try:
            with torch.enable_grad():  # a gradient map works under the audit's no-grad judging calls too
                m = self.fn(x, t)
            if not grad_wanted and isinstance(m, torch.Tensor):
                m = m.detach()
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


@dataclass(frozen=True)
class Entry:
    """One registered interpreter: how to build it for a model, and its traits."""

    factory: Callable[..., Interpreter]
    traits: Traits


REGISTRY: dict[str, Entry] = {}


def register(name: str, *, preset: str, label: str | None = None, iterative: bool = False, random: bool = False,
             variants: dict[str, str] | None = None):
    """Decorator of an Interpreter class (or of a factory ``(model, **kw) -> Interpreter``): buildable by
    ``name`` with these traits. A name registered twice is refused (a plug-in must not silently replace one)."""
    traits = Traits(preset, label or name.upper(), iterative, random, tuple(sorted((variants or {}).items())))

    def deco(obj):
        if name in REGISTRY:
            raise InterpreterError(f"interpreter {name!r} is registered twice ({REGISTRY[name].factory.__module__} "
                                   f"and {obj.__module__}); pick another name")
        if isinstance(obj, type):
            obj.name, obj.traits = name, traits
        REGISTRY[name] = Entry(getattr(obj, "for_model", obj), traits)
        return obj

    return deco
