"""The interpreters behind one contract (see base.py): the ADV² paper's four (GRAD, CAM, MASK, RTS) and the
ones teams deploy (Grad-CAM, Grad-CAM++, Input×Gradient, Integrated Gradients, Occlusion;
SmoothGrad = smooth:grad)."""

from underfire.guard.interpreters.base import (
    REGISTRY,
    Explanation,
    Interpreter,
    InterpreterError,
    build_interpreter,
    minmax,
)
from underfire.guard.interpreters.cam import CAM
from underfire.guard.interpreters.grad import GradSaliency, ReluSurrogate
from underfire.guard.interpreters.gradcam import GradCAM, GradCAMPlusPlus
from underfire.guard.interpreters.gradients import InputXGradient, IntegratedGradients
from underfire.guard.interpreters.mask import Mask, MaskConfig
from underfire.guard.interpreters.occlusion import Occlusion
from underfire.guard.interpreters.rts import RTS, RTSA, SaliencyNet

__all__ = [
    "REGISTRY", "Explanation", "Interpreter", "InterpreterError", "build_interpreter", "minmax",
    "CAM", "GradSaliency", "ReluSurrogate", "Mask", "MaskConfig", "RTS", "RTSA", "SaliencyNet",
    "GradCAM", "GradCAMPlusPlus", "InputXGradient", "IntegratedGradients", "Occlusion",
]
