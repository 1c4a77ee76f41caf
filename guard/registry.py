"""Every interpreter by name, and what each is: the one place that knows which names exist.

Plain names are the entries of ``REGISTRY`` (each interpreter module registers itself with its traits, see
``base.register``). Prefixed names wrap another interpreter; the table ``PREFIXES`` says how each prefix is
checked, built and what its traits are:

- ``smooth:<name>``: randomized smoothing of ``<name>`` (``guard.smoothing.Smoothed``; kwargs sigma, samples);
- ``captum:<Method>`` / ``gradcam:<Method>``: the reference libraries' implementations (``guard.adapters``),
  attacked through their native twin;
- ``opaque:<name>[@<surrogate>]``: ``<name>`` served as a black box (no gradient; a surrogate to transfer from).

    build_interpreter("smooth:cam", model, sigma=0.1)
    traits_of("smooth:cam").preset      # "cam": the ADV² settings it is attacked with
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from torch import nn

import underfire.guard.interpreters  # noqa: F401  (each module registers its interpreters)
import underfire.guard.smoothing  # noqa: F401  (registers smoothgrad)
from underfire.guard.adapters import CAPTUM_TWINS, GRADCAM_TWINS, build_adapter, build_twin
from underfire.guard.interpreters.base import REGISTRY, Interpreter, InterpreterError, Traits
from underfire.guard.smoothing import Smoothed


def _plain(name: str, what: str | None = None) -> Traits:
    if name not in REGISTRY:
        known = ", ".join(sorted(REGISTRY))
        raise InterpreterError(f"unknown interpreter {name!r}; known: {known}" if what is None else
                               f"{what} {name!r} is not a known interpreter; known: {known}")
    return REGISTRY[name].traits


def _smooth(name: str, rest: str) -> Traits:
    wrapped = ":" in rest and rest not in REGISTRY  # smooth:smooth:cam, smooth:captum:...: not a plain map
    inner = None if wrapped else _plain(rest, f"in {name!r}, the smoothed interpreter")
    if inner is None or inner.iterative or inner.random:
        raise InterpreterError(f"{name!r}: smoothing wraps a one-pass interpreter (grad, cam, rts, ...), not {rest!r}")
    return replace(inner, label=f"smoothed {inner.label}", random=True, variants=())


def _adapter(name: str, rest: str) -> Traits:
    if not rest:
        raise InterpreterError(f"{name!r}: name a method, e.g. captum:IntegratedGradients or gradcam:GradCAM")
    prefix = name.partition(":")[0]
    twin = (CAPTUM_TWINS if prefix == "captum" else GRADCAM_TWINS).get(rest, None if prefix == "captum" else "gradcam")
    twin = "grad" if twin == "grad:logit" else twin
    preset = REGISTRY[twin].traits.preset if twin in REGISTRY else "grad"  # captum's maps are pooled like GRAD's
    return Traits(preset=preset, label=f"{prefix} {rest}")


def _opaque(name: str, rest: str) -> Traits:
    inner, at, surrogate = rest.partition("@")
    served = _plain(inner, f"in {name!r}, the served interpreter")
    if at:
        attacked = _plain(surrogate, f"in {name!r}, the surrogate")
        return replace(attacked, label=f"{served.label} (black box)", variants=())
    return replace(served, label=f"{served.label} (black box)", variants=())


@dataclass(frozen=True)
class Prefix:
    """A family of names ``<prefix>:<rest>``: its traits (checking the name) and how to build one."""

    traits: Callable[[str, str], Traits]
    build: Callable[..., Interpreter]


PREFIXES: dict[str, Prefix] = {
    "smooth": Prefix(_smooth, lambda name, rest, model, **kw: Smoothed(build_interpreter(rest, model), **kw)),
    "captum": Prefix(_adapter, lambda name, rest, model, **kw: build_adapter(name, model, build_interpreter, **kw)),
    "gradcam": Prefix(_adapter, lambda name, rest, model, **kw: build_adapter(name, model, build_interpreter, **kw)),
    "opaque": Prefix(_opaque, lambda name, rest, model, **kw: build_adapter(name, model, build_interpreter, **kw)),
}


def traits_of(name_or_interpreter: str | Interpreter) -> Traits:
    """The traits of an interpreter object, or of any name :func:`build_interpreter` builds (checking the
    name without a model: a bad name is refused naming the part that is unknown)."""
    if isinstance(name_or_interpreter, Interpreter):
        return name_or_interpreter.traits
    name = name_or_interpreter
    if not isinstance(name, str) or not name:
        raise InterpreterError(f"an interpreter name is a non-empty string, got {name!r}")
    if name in REGISTRY:
        return REGISTRY[name].traits
    prefix, colon, rest = name.partition(":")
    if colon and prefix in PREFIXES:
        return PREFIXES[prefix].traits(name, rest)
    if colon:
        hint = (f"; of that prefix only {', '.join(n for n in REGISTRY if n.startswith(prefix + ':'))} exists" if
                any(n.startswith(prefix + ":") for n in REGISTRY) else "")
        raise InterpreterError(f"interpreter {name!r} has an unknown prefix {prefix!r}: known prefixes are "
                               f"{', '.join(p + ':' for p in PREFIXES)}{hint}")
    return _plain(name)


def check_name(name: str) -> None:
    """Refuse a name :func:`build_interpreter` could never build, without a model (so that an audit names a
    bad interpreter before anything loads)."""
    traits_of(name)


def build_interpreter(name: str, model: nn.Module, **kwargs) -> Interpreter:
    """Build an interpreter by name for ``model``; kwargs go to its constructor (see the module docstring)."""
    check_name(name)
    if name in REGISTRY:
        return REGISTRY[name].factory(model, **kwargs)
    prefix, _, rest = name.partition(":")
    it = PREFIXES[prefix].build(name, rest, model, **kwargs)
    if type(it).traits is Interpreter.traits:  # an adapter: the traits its prefix gives it
        it.traits = PREFIXES[prefix].traits(name, rest)
    return it


def known_names() -> list[str]:
    """The plain names and the prefixes, for help texts and errors."""
    return sorted(REGISTRY) + [f"{p}:<name>" for p in PREFIXES]


def twin_of(adapter: Interpreter, model: nn.Module) -> Interpreter | None:
    """The native twin of an adapter (the differentiable map its attacks optimise), or None."""
    return build_twin(adapter, model, build_interpreter)


def traits_or_none(name: str) -> Traits | None:
    """The traits of a name the registry builds; None for any other name (a team's own map, known only once its
    entry point or ``audit()`` hands it over)."""
    try:
        return traits_of(name)
    except InterpreterError:
        return None


def label_of(name: str) -> str:
    """How reports name an interpreter: its registered label ("Grad-CAM", "RTS^A"), a team's own name as given."""
    traits = traits_or_none(name)
    return traits.label if traits else name
