"""Attacks on (classifier, interpreter) pairs: one optimisation loop (pgd.py), thin compositions."""

from attacks.adv2 import PGD, Adv2, MaskAdv2, make_adv2
from attacks.pgd import Attack, AttackResult, Stage
from attacks.stadv import StAdv, StAdv2
from attacks.threats import AttackError, FlowField, LinfBall, quantize

__all__ = ["PGD", "Adv2", "MaskAdv2", "make_adv2", "Attack", "AttackResult", "Stage", "StAdv", "StAdv2",
           "AttackError", "FlowField", "LinfBall", "quantize"]
