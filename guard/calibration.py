"""Detectors calibrated at a false-positive rate: the shared base of feature squeezing and the ensemble
disagreement detector.

A detector gives every input several named scores (higher = more suspicious), e.g. one per squeezer plus
their maximum. Calibration sets, for each score, the threshold that flags at most ``fpr`` of a benign
calibration set; an input is flagged by a score when it exceeds that score's threshold, and by the
detector when its ``decision`` score does. Thresholds are saved with the identity of the model they were
calibrated for (name + a fingerprint of its weights) and refused for any other model.

    det.calibrate(x_benign, fpr=0.05)
    det.save("runs/fmnist_resnet.squeeze.pt");  det = SqueezeDetector.load(path, model)
    flagged = det.flags(x)["joint"]          # (B,) bool
"""

from __future__ import annotations

import hashlib
import math
import os
from typing import Callable

import torch

from underfire.guard.interpreters.base import check_input
from underfire.guard.errors import ModelError
from underfire.guard.weights import read_checkpoint, save_checkpoint
from underfire.guard.errors import UnderfireError


class DetectorError(UnderfireError):
    """Bad calibration data, thresholds for another model, or a detector file that does not fit."""


def threshold_at_fpr(scores: torch.Tensor, fpr: float) -> float:
    """The smallest threshold t among the scores with #(scores > t) ≤ fpr · N (ties count as benign)."""
    if not 0 < fpr < 1:
        raise DetectorError(f"false-positive rate must be in (0, 1), got {fpr}")
    s = scores.detach().flatten().double()
    if s.numel() == 0:
        raise DetectorError("calibration set is empty: thresholds need benign inputs")
    if not torch.isfinite(s).all():
        raise DetectorError("calibration scores contain NaN or inf (check the model's outputs)")
    k = math.ceil(s.numel() * (1 - fpr))  # at least k scores must be ≤ t
    return float(s.sort().values[max(k, 1) - 1])


def roc_auc(benign: list[float] | torch.Tensor, attacked: list[float] | torch.Tensor) -> float | None:
    """ROC AUC (scikit-learn) of a score separating attacked (positive) from benign inputs; None when either
    side is empty. Non-finite attacked scores count as +inf (they are flagged), benign ones as +inf too."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    b = np.nan_to_num(np.asarray(benign, dtype=np.float64), nan=np.inf)
    a = np.nan_to_num(np.asarray(attacked, dtype=np.float64), nan=np.inf)
    if len(b) == 0 or len(a) == 0:
        return None
    big = np.finfo(np.float64).max
    scores = np.clip(np.concatenate([b, a]), -big, big)
    return float(roc_auc_score(np.r_[np.zeros(len(b)), np.ones(len(a))], scores))


def model_identity(model) -> dict:
    """Name and a SHA-1 fingerprint of the weights: thresholds are only valid for the model they came from."""
    h = hashlib.sha1()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return {"name": getattr(model, "name", type(model).__name__), "fingerprint": h.hexdigest()[:16]}


class Detector:
    """Base class. Subclasses set ``kind`` and ``decision`` and implement ``scores`` and ``config``."""

    kind = "detector"
    decision = "joint"
    aggregate: str | None = None  # a score that only combines the others (left out of the hinge)

    def __init__(self, model) -> None:
        self.model = model
        self.thresholds: dict[str, float] = {}
        self.fpr: float | None = None
        self.calibration: dict = {}
        self.fitted: dict = {}  # what ``fit`` learned from benign data (saved with the thresholds)

    # -- to implement ----------------------------------------------------------------------------------------
    def scores(self, x: torch.Tensor, differentiable: bool = False) -> dict[str, torch.Tensor]:
        """Named per-sample scores (B,). With ``differentiable`` they carry a graph to x (adaptive attacks)."""
        raise NotImplementedError

    def config(self) -> dict:
        return {}

    def cost(self) -> dict:
        """Extra work per judged input: classifier forward passes and interpreter maps (None: unknown)."""
        return {"forwards": None, "maps": None}

    def fit(self, x_benign: torch.Tensor) -> None:
        """Learn what the scores need from benign data before thresholds are set (e.g. benign disagreement
        levels to normalise by); stored in ``self.fitted`` and saved with the thresholds. Default: nothing."""

    # -- shared ----------------------------------------------------------------------------------------------
    def score_all(self, x: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """``scores`` over a large set in batches, without gradients."""
        if x.shape[0] == 0:
            raise DetectorError("no inputs to score: the set is empty")
        parts: dict[str, list[torch.Tensor]] = {}
        with torch.no_grad():
            for i in range(0, x.shape[0], batch_size):
                for k, v in self.scores(x[i:i + batch_size]).items():
                    parts.setdefault(k, []).append(v.detach().cpu())
        return {k: torch.cat(v) for k, v in parts.items()}

    def calibrate(self, x_benign: torch.Tensor, fpr: float = 0.05, heldout: torch.Tensor | None = None) -> dict:
        """Set every score's threshold at ``fpr`` on ``x_benign``; report the FPR on ``heldout`` if given."""
        if x_benign is None or x_benign.shape[0] == 0:
            raise DetectorError("calibration set is empty: thresholds need benign inputs")
        with torch.no_grad():
            self.fit(x_benign)
        s = self.score_all(x_benign)
        self.thresholds = {k: threshold_at_fpr(v, fpr) for k, v in s.items()}
        self.fpr = fpr
        self.calibration = {"n": int(x_benign.shape[0]), "fpr_target": fpr,
                            "fpr_calibration": {k: float((v > self.thresholds[k]).float().mean()) for k, v in s.items()}}
        if heldout is not None and heldout.shape[0] > 0:
            self.calibration["n_heldout"] = int(heldout.shape[0])
            check_input(heldout, self.model)
            held = self.score_all(heldout)
            self.calibration["fpr_heldout"] = {k: float(v.float().mean()) for k, v in self.flag_scores(held).items()}
            self.calibration["heldout_scores"] = held[self.decision].tolist()  # the benign side of ROC AUC
        return self.calibration

    def _require_calibrated(self) -> None:
        if not self.thresholds:
            raise DetectorError(f"{self.kind} detector is not calibrated: call calibrate() or load thresholds")

    def flags(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per score: (B,) bool, True = flagged as adversarial. Inputs are validated (shape, channels, finite,
        [0, 1]; InterpreterError otherwise) and a score that is not finite flags its input: nothing that could
        not be scored is called benign."""
        self._require_calibrated()
        check_input(x, self.model)
        with torch.no_grad():
            s = self.scores(x)
        return self.flag_scores(s)

    def flag_all(self, x: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
        self._require_calibrated()
        check_input(x, self.model)
        return self.flag_scores(self.score_all(x, batch_size))

    def flag_scores(self, scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Flags from already computed scores (a score that is not finite flags its input)."""
        return {k: (v > self.thresholds[k]) | ~torch.isfinite(v) for k, v in scores.items()}

    def detected(self, x: torch.Tensor) -> torch.Tensor:
        """The detector's decision: (B,) bool by the ``decision`` score."""
        return self.flags(x)[self.decision]

    def hinge(self, margin: float = 0.75, weight: float = 20.0) -> Callable[[torch.Tensor], torch.Tensor]:
        """Per-sample Σ_s weight · relu(score_s(x) − (t_s − (1 − margin)·|t_s|)): the adaptive attacker's term,
        which pushes each score below its threshold t_s with a margin (margin · t_s for a positive t_s; a signed
        score such as the learned detector's logit gets the same relative room below a negative threshold).

        Sums over the component scores; an aggregate score (``aggregate``, e.g. the max) is covered by them."""
        self._require_calibrated()
        aim = {k: t - (1 - margin) * abs(t) for k, t in self.thresholds.items()}

        def term(x: torch.Tensor) -> torch.Tensor:
            s = self.scores(x, differentiable=True)
            return sum(weight * torch.relu(v - aim[k]) for k, v in s.items() if k != self.aggregate)
        return term

    # -- files -----------------------------------------------------------------------------------------------
    def state(self) -> dict:
        self._require_calibrated()
        return {"kind": self.kind, "model": model_identity(self.model), "config": self.config(),
                "thresholds": dict(self.thresholds), "fpr": self.fpr, "calibration": self.calibration,
                "fitted": self.fitted}

    def save(self, path: str | os.PathLike) -> None:
        save_checkpoint(self.state(), path)

    def load_state(self, ck: dict, source: str = "thresholds") -> "Detector":
        if ck.get("kind") != self.kind:
            raise DetectorError(f"{source} holds {ck.get('kind')!r} thresholds, not {self.kind!r}")
        mine, theirs = model_identity(self.model), ck.get("model", {})
        if mine != theirs:
            raise DetectorError(
                f"{source} was calibrated for model {theirs.get('name')!r} (weights {theirs.get('fingerprint')}), "
                f"not for {mine['name']!r} (weights {mine['fingerprint']}): calibrate again for this model")
        missing = set(self.config_keys()) - set(ck.get("thresholds", {}))
        if missing:
            raise DetectorError(f"{source} has no thresholds for {sorted(missing)}: calibrate again")
        self.thresholds = {k: float(v) for k, v in ck["thresholds"].items()}
        self.fpr, self.calibration = ck.get("fpr"), ck.get("calibration", {})
        self.fitted = ck.get("fitted", {})
        return self

    def config_keys(self) -> list[str]:
        """Score names this detector produces (to check a loaded file covers them)."""
        return []

    @staticmethod
    def read(path: str | os.PathLike) -> dict:
        try:
            return read_checkpoint(path)
        except ModelError as exc:
            raise DetectorError(str(exc)) from exc
