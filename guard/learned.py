"""A learned detector: one logistic regression (scikit-learn) over the scores of other detectors.

    parts = [SqueezeDetector(model), NormalisedDisagreementDetector([grad, cam]), StabilityDetector([grad, cam])]
    det = LearnedDetector(parts).train(x_benign_fit, x_attacked_fit)   # benign vs PGD / ADV² of other images
    det.calibrate(x_benign_threshold, fpr=0.05)                        # the threshold, on other benign images
    det.detected(x)

Features are every part's component scores (not their aggregates), after each part has fitted its benign
levels; ``train`` fits StandardScaler + LogisticRegression (balanced classes) on benign and attacked
examples and keeps the fitted coefficients as tensors, so the score — the regression's logit — is
differentiable through the parts (the adaptive attacker's hinge goes through it). The threshold comes from
``calibrate`` on benign images the regression was not trained on.
"""

from __future__ import annotations

from typing import Sequence

import torch

from underfire.guard.calibration import Detector, DetectorError


class LearnedDetector(Detector):
    kind = "learned"
    decision = "learned"

    def __init__(self, parts: Sequence[Detector]) -> None:
        if not parts:
            raise DetectorError("a learned detector needs at least one detector to take scores from")
        super().__init__(parts[0].model)
        if any(p.model is not self.model for p in parts):
            raise DetectorError("all parts of a learned detector must watch the same model object")
        self.parts = list(parts)

    def features(self, x: torch.Tensor, differentiable: bool = False) -> torch.Tensor:
        """(B, F): the parts' component scores, in a fixed order."""
        cols = []
        for p in self.parts:
            for k, v in p.scores(x, differentiable).items():
                if k != p.aggregate:
                    cols.append(v)
        return torch.stack(cols, 1)

    def feature_names(self) -> list[str]:
        return [f"{p.kind}:{k}" for p in self.parts for k in p.config_keys() if k != p.aggregate]

    def _all_features(self, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([self.features(x[i:i + batch]).cpu() for i in range(0, len(x), batch)])

    def train(self, x_benign: torch.Tensor, x_attacked: torch.Tensor) -> dict:
        """Fit the parts' benign levels on ``x_benign``, then the regression on benign (0) vs attacked (1)."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.metrics import roc_auc_score
        from sklearn.preprocessing import StandardScaler

        if len(x_benign) < 2 or len(x_attacked) < 2:
            raise DetectorError(f"a learned detector needs at least 2 benign and 2 attacked examples, got "
                                f"{len(x_benign)} and {len(x_attacked)}")
        with torch.no_grad():
            for p in self.parts:
                p.fit(x_benign)
        feats = torch.cat([self._all_features(x_benign), self._all_features(x_attacked)]).double().numpy()
        if not torch.isfinite(torch.from_numpy(feats)).all():
            raise DetectorError("the parts' scores on the training examples contain NaN or inf")
        labels = [0] * len(x_benign) + [1] * len(x_attacked)
        scaler = StandardScaler().fit(feats)
        reg = LogisticRegression(class_weight="balanced", max_iter=1000).fit(scaler.transform(feats), labels)
        self.fitted = {"parts": [p.fitted for p in self.parts], "mean": scaler.mean_.tolist(),
                       "scale": scaler.scale_.tolist(), "coef": reg.coef_[0].tolist(),
                       "intercept": float(reg.intercept_[0]), "features": self.feature_names(),
                       "train": {"benign": len(x_benign), "attacked": len(x_attacked),
                                 "auc": float(roc_auc_score(labels, reg.decision_function(scaler.transform(feats))))}}
        return self.fitted["train"]

    def fit(self, x_benign: torch.Tensor) -> None:
        if "coef" not in self.fitted:
            raise DetectorError("train the learned detector (benign vs attacked examples) before calibrating it")

    def scores(self, x: torch.Tensor, differentiable: bool = False) -> dict[str, torch.Tensor]:
        if "coef" not in self.fitted:
            raise DetectorError("the learned detector is not trained: call train() first")
        with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
            f = self.features(x, differentiable)
            t = lambda k: torch.tensor(self.fitted[k], dtype=f.dtype, device=f.device)  # noqa: E731
            return {"learned": ((f - t("mean")) / t("scale")) @ t("coef") + self.fitted["intercept"]}

    def load_state(self, ck: dict, source: str = "thresholds") -> "LearnedDetector":
        super().load_state(ck, source)
        if self.fitted.get("features") != self.feature_names():
            raise DetectorError(f"{source} was trained on features {self.fitted.get('features')}, "
                                f"not {self.feature_names()}")
        for p, f in zip(self.parts, self.fitted["parts"]):
            p.fitted = f
        return self

    def config(self) -> dict:
        return {"parts": [{"kind": p.kind, **p.config()} for p in self.parts]}

    def cost(self) -> dict:
        costs = [p.cost() for p in self.parts]
        return {k: None if any(c[k] is None for c in costs) else sum(c[k] for c in costs) for k in ("forwards", "maps")}

    def config_keys(self) -> list[str]:
        return ["learned"]
