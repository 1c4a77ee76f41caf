"""Interpreter ensembles and their disagreement detector (the ADV² paper's first mitigation).

ADV² made against one interpreter transfers poorly to others (the paper's Table 9), so on an attacked
input the members of an ensemble disagree more than on a benign one.

    ens = InterpreterEnsemble([grad, cam, rts])        # itself an Interpreter: every attack runs on it
    e = ens(x)                                         # saliency = mean of the members' maps
    det = DisagreementDetector([grad, cam, rts, mask]).calibrate(x_benign, fpr=0.05)
    det.detected(x)                                    # (B,) bool

Maps are compared at the finest member resolution (bilinear upsampling of the coarser ones).
Disagreement scores per input, over all member pairs (i, j):
    corr 1 − mean_ij Pearson r(m_i, m_j)        (the decision; differentiable)
    l1   mean_ij L1(m_i, m_j)                  (differentiable)
    iou  1 − mean_ij IoU of the top-20% pixels (not differentiable; detection only)
The adaptive attacker's hinge covers the differentiable ones. :class:`NormalisedDisagreementDetector` divides
each pair's 1 − r by that pair's benign level (its median on the calibration set), so a pair of members
that always disagree (GRAD vs CAM) does not drown the pairs that usually agree; with two members it
ranks inputs exactly as ``corr`` does. ``corr`` is the decision because it ignores
each member's own scale and offset (GRAD is high-frequency, CAM a blob): measured on the Fashion-MNIST
ResNet (GRAD + CAM + RTS, calibrated at 5% FPR on 500 benign test images, 60 attacked images, ÷4
schedule) it flags PGD / ADV²-CAM / ADV²-RTS / ADV²-GRAD 12 / 22 / 23 / 13%, where ``l1`` flags 7 / 3 / 8 / 10%
(held-out FPR 6% and 4%). Per-pair scores standardised by their benign mean and spread did no better.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Sequence

import torch

from underfire.guard.calibration import Detector, DetectorError
from underfire.guard.interpreters.base import Explanation, Interpreter, InterpreterError
from underfire.guard.registry import build_interpreter
from underfire.guard.maps import iou_at_k, l1 as map_l1, pearson

REDUCTIONS = ("mean", "max", "min", "median")


def _finest(members: Sequence[Interpreter], hw: tuple[int, int]) -> tuple[int, int]:
    return max((m.native_size(hw) for m in members), key=lambda s: s[0] * s[1])


def member_maps(members: Sequence[Interpreter], x: torch.Tensor,
                target: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(logits of the first member, every member's map at the finest member resolution)."""
    size = _finest(members, tuple(x.shape[-2:]))
    logits, maps = None, []
    for m in members:
        e = m(x, target)
        logits = e.logits if logits is None else logits
        maps.append(m.upsample(e.saliency, size))
    return logits, maps


class InterpreterEnsemble(Interpreter):
    """An ensemble of interpreters of one model, itself an Interpreter.

    Args:
        members: interpreters sharing the same model (at least one).
        reduce: how member maps combine per pixel: mean (default), max, min or median.
    """

    name = "ensemble"
    compile_parts = ()  # members share one model object; compiling them one by one would break that

    def __init__(self, members: Sequence[Interpreter], reduce: str = "mean") -> None:
        if not members:
            raise InterpreterError("an interpreter ensemble needs at least one member")
        model = members[0].model
        if any(m.model is not model for m in members):
            raise InterpreterError("all ensemble members must explain the same model object")
        if reduce not in REDUCTIONS:
            raise InterpreterError(f"unknown reduction {reduce!r}; use one of {', '.join(REDUCTIONS)}")
        super().__init__(model)
        self.members, self.reduce = list(members), reduce
        self.name = "+".join(m.name for m in self.members)

    def modules(self):
        return tuple({id(mod): mod for m in self.members for mod in m.modules()}.values())

    def native_size(self, hw):
        return _finest(self.members, hw)

    @contextlib.contextmanager
    def tracking(self, steps: int):
        """Every member's tracking block (MASK members continue their previous mask; see ``Mask.tracking``)."""
        with contextlib.ExitStack() as stack:
            for m in self.members:
                stack.enter_context(m.tracking(steps))
            yield self

    def __call__(self, x, target=None):
        return self.explain(x, target)  # every member validates and preserves state itself

    def explain(self, x, target):
        logits, maps = member_maps(self.members, x, target)
        stack = torch.stack(maps)  # (M, B, 1, h, w)
        if self.reduce == "mean":
            sal = stack.mean(0)
        elif self.reduce == "max":
            sal = stack.amax(0)
        elif self.reduce == "min":
            sal = stack.amin(0)
        else:
            sal = stack.median(0).values
        return Explanation(logits, sal)


def build_ensemble(names: str | Sequence[str], model, **kw) -> InterpreterEnsemble:
    """``"grad+cam+rts"`` (or a list of names) → an ensemble of the registered interpreters."""
    names = names.split("+") if isinstance(names, str) else list(names)
    return InterpreterEnsemble([build_interpreter(n.strip(), model) for n in names if n.strip()], **kw)


class DisagreementDetector(Detector):
    """Flags inputs on which the members' maps disagree more than on benign data (decision: ``corr``)."""

    kind = "ensemble"
    decision = "corr"

    def __init__(self, members: Sequence[Interpreter], top_k: float = 20.0) -> None:
        if len(members) < 2:
            raise DetectorError("a disagreement detector needs at least two interpreters")
        super().__init__(members[0].model)
        if any(m.model is not self.model for m in members):
            raise DetectorError("all ensemble members must explain the same model object")
        self.members, self.top_k = list(members), top_k

    def scores(self, x: torch.Tensor, differentiable: bool = False) -> dict[str, torch.Tensor]:
        with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
            _, maps = member_maps(self.members, x)
            pairs = list(itertools.combinations(maps, 2))
            l1 = torch.stack([map_l1(a, b) for a, b in pairs]).mean(0)
            corr = torch.stack([pearson(a, b) for a, b in pairs]).mean(0)
        with torch.no_grad():
            iou = torch.stack([iou_at_k(a.detach(), b.detach(), self.top_k) for a, b in pairs]).mean(0)
        return {"corr": 1 - corr, "l1": l1, "iou": 1 - iou}

    def config(self) -> dict:
        return {"members": [m.name for m in self.members], "top_k": self.top_k}

    def cost(self) -> dict:
        return {"forwards": 0, "maps": len(self.members)}

    def config_keys(self) -> list[str]:
        return ["corr", "l1", "iou"]

    @classmethod
    def load(cls, path, members: Sequence[Interpreter]) -> "DisagreementDetector":
        ck = cls.read(path)
        names = ck.get("config", {}).get("members")
        if names is not None and names != [m.name for m in members]:
            raise DetectorError(f"{path} was calibrated for members {names}, not {[m.name for m in members]}")
        det = cls(members, ck.get("config", {}).get("top_k", 20.0))
        return det.load_state(ck, str(path))


class NormalisedDisagreementDetector(DisagreementDetector):
    """Disagreement relative to each member pair's benign level:

        rel(x) = mean_ij (1 − r_ij(x)) / median_benign(1 − r_ij)

    The levels are fitted on the calibration set (``fit``) and saved with the thresholds."""

    kind = "ensemble-norm"
    decision = "rel"

    def _pair_disagreement(self, x: torch.Tensor) -> torch.Tensor:
        """(pairs, B): 1 − Pearson r of every member pair."""
        _, maps = member_maps(self.members, x)
        return torch.stack([1 - pearson(a, b) for a, b in itertools.combinations(maps, 2)])

    def fit(self, x_benign: torch.Tensor) -> None:
        d = torch.cat([self._pair_disagreement(x_benign[i:i + 256]).cpu() for i in range(0, len(x_benign), 256)], 1)
        self.fitted = {"pair_levels": d.median(1).values.clamp_min(1e-6).tolist()}

    def scores(self, x: torch.Tensor, differentiable: bool = False) -> dict[str, torch.Tensor]:
        if "pair_levels" not in self.fitted:
            raise DetectorError("the normalised disagreement detector is not fitted: call calibrate() first")
        with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
            d = self._pair_disagreement(x)
            levels = torch.tensor(self.fitted["pair_levels"], dtype=d.dtype, device=d.device)[:, None]
            return {"rel": (d / levels).mean(0)}

    def config_keys(self) -> list[str]:
        return ["rel"]
