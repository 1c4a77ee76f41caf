"""The four interpreters of the ADV² paper behind one contract (see base.py)."""

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
from guard.interpreters.mask import Mask, MaskConfig
from guard.interpreters.rts import RTS, RTSA, SaliencyNet

__all__ = [
    "REGISTRY", "Explanation", "Interpreter", "InterpreterError", "build_interpreter", "minmax",
    "CAM", "GradSaliency", "ReluSurrogate", "Mask", "MaskConfig", "RTS", "RTSA", "SaliencyNet",
]
