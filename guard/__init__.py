"""underfire.guard: the interpreters (one contract, one registry), the defenses and the models they explain.

    from underfire.guard import ImageClassifier, build_interpreter, load_model, traits_of
"""

from underfire.guard.adapters import Transfer
from underfire.guard.calibration import Detector, DetectorError
from underfire.guard.ensemble import DisagreementDetector, InterpreterEnsemble, NormalisedDisagreementDetector
from underfire.guard.errors import UnderfireError
from underfire.guard.interpreters.base import (REGISTRY, Explanation, FunctionInterpreter, Interpreter, InterpreterError,
                                              Traits, register)
from underfire.guard.learned import LearnedDetector
from underfire.guard.errors import ModelError
from underfire.guard.models import ImageClassifier, load_model
from underfire.guard.registry import build_interpreter, check_name, known_names, traits_of
from underfire.guard.smoothing import Smoothed
from underfire.guard.squeeze import SqueezeDetector
from underfire.guard.stability import StabilityDetector

__all__ = ["Transfer", "Detector", "DetectorError", "DisagreementDetector", "InterpreterEnsemble",
           "NormalisedDisagreementDetector", "UnderfireError", "REGISTRY", "Explanation", "FunctionInterpreter",
           "Interpreter", "InterpreterError", "Traits", "register", "LearnedDetector", "ImageClassifier",
           "ModelError", "load_model", "build_interpreter", "check_name", "known_names", "traits_of", "Smoothed",
           "SqueezeDetector", "StabilityDetector"]
