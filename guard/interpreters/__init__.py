"""The interpreters behind one contract (see base.py): the ADV² paper's four (GRAD, CAM, MASK, RTS) and the
ones teams deploy (Grad-CAM, Grad-CAM++, Input×Gradient, Integrated Gradients, Occlusion;
SmoothGrad = smooth:grad)."""

from guard.interpreters.base import (
    REGISTRY,
    Explanation,
    Interpreter,
    InterpreterError,
    build_interpreter,
    minmax,
)
from guard.interpreters.cam import CAM
from guard.interpreters.grad import GradSaliency, ReluSurrogate
from guard.interpreters.gradcam import GradCAM, GradCAMPlusPlus
from guard.interpreters.gradients import InputXGradient, IntegratedGradients
from guard.interpreters.mask import Mask, MaskConfig
from guard.interpreters.occlusion import Occlusion
from guard.interpreters.rts import RTS, RTSA, SaliencyNet

__all__ = [
    "REGISTRY", "Explanation", "Interpreter", "InterpreterError", "build_interpreter", "minmax",
    "CAM", "GradSaliency", "ReluSurrogate", "Mask", "MaskConfig", "RTS", "RTSA", "SaliencyNet",
    "GradCAM", "GradCAMPlusPlus", "InputXGradient", "IntegratedGradients", "Occlusion",
]
