"""Attacks on (classifier, interpreter) pairs: one optimisation loop (pgd.py), thin compositions."""

from underfire.attacks.adv2 import PGD, Adv2, MaskAdv2, make_adv2
from underfire.attacks.pgd import Attack, AttackResult, Stage
from underfire.attacks.stadv import StAdv, StAdv2
from underfire.attacks.threats import AttackError, FlowField, LinfBall, quantize

__all__ = ["PGD", "Adv2", "MaskAdv2", "make_adv2", "Attack", "AttackResult", "Stage", "StAdv", "StAdv2",
           "AttackError", "FlowField", "LinfBall", "quantize"]
