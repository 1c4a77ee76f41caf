"""The interpreters behind one contract (see base.py): the ADV² paper's four (GRAD, CAM, MASK, RTS) and the
ones teams deploy (Grad-CAM, Grad-CAM++, Input×Gradient, Integrated Gradients, Occlusion;
SmoothGrad = smooth:grad). Each module registers its interpreters with their traits (``base.register``);
build one by name with ``underfire.guard.registry.build_interpreter``."""

from underfire.guard.interpreters.base import REGISTRY, Explanation, Interpreter, InterpreterError, Traits, minmax, register
from underfire.guard.interpreters.cam import CAM
from underfire.guard.interpreters.grad import GradSaliency, ReluSurrogate
from underfire.guard.interpreters.gradcam import GradCAM, GradCAMPlusPlus
from underfire.guard.interpreters.gradients import InputXGradient, IntegratedGradients
from underfire.guard.interpreters.mask import Mask, MaskConfig
from underfire.guard.interpreters.occlusion import Occlusion
from underfire.guard.interpreters.rts import RTS, RTSA, SaliencyNet

__all__ = [
    "REGISTRY", "Explanation", "Interpreter", "InterpreterError", "Traits", "minmax", "register",
    "CAM", "GradSaliency", "ReluSurrogate", "Mask", "MaskConfig", "RTS", "RTSA", "SaliencyNet",
    "GradCAM", "GradCAMPlusPlus", "InputXGradient", "IntegratedGradients", "Occlusion",
]

# Every module of this folder registers its interpreters when imported: a new interpreter is one new module here
# (and one row of the contract table in tests/test_interpreters.py), nothing else to list.
import importlib as _importlib  # noqa: E402
import pkgutil as _pkgutil  # noqa: E402

for _module in _pkgutil.iter_modules(__path__):
    _importlib.import_module(f"{__name__}.{_module.name}")
