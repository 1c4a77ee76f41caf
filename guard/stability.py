"""Map-stability detector: ADV² fits the map to one exact input, so small changes of that input move an
attacked map more than a benign one.

    det = StabilityDetector([grad, cam]).calibrate(x_benign, fpr=0.05)
    det.detected(x)                                    # (B,) bool

For every member g and transformation T (defaults: Gaussian noise of σ = 8/255, a shift by one pixel in a
random diagonal direction, a 2×2 median filter), the score is

    s_{g,T}(x) = L1(align(g(T(x))), g(x)) / level_{g,T}

with both maps for the class predicted on x, compared at the input resolution (a shifted input's map
shifted back), and level_{g,T} the median of the same L1 on the benign calibration set (``fit``). The
decision ``joint`` is the largest s_{g,T}. The noise and the shift direction are drawn anew at each call, so
an adaptive attacker that differentiates through the scores averages over them (EOT) by calling it.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from underfire.guard.calibration import Detector, DetectorError
from underfire.guard.interpreters.base import Interpreter, pick_target
from underfire.guard.maps import l1
from underfire.guard.squeeze import make_squeezer

DEFAULT_TRANSFORMS = ("noise-8", "shift-1", "median-2")


def shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """x translated by (dy, dx) pixels, borders replicated. x: (B, C, H, W)."""
    p = max(abs(dy), abs(dx))
    if p == 0:
        return x
    h, w = x.shape[-2:]
    xp = F.pad(x, (p, p, p, p), mode="replicate")
    return xp[..., p - dy:p - dy + h, p - dx:p - dx + w]


class Transform:
    """One named input transformation and how to bring the transformed input's map back into register."""

    def __init__(self, name: str) -> None:
        kind, _, arg = name.partition("-")
        self.name, self.kind = name, kind
        try:
            self.value = float(arg)
        except ValueError:
            self.value = None
        if kind in ("noise", "shift"):
            if self.value is None or self.value <= 0:
                raise DetectorError(f"transform {name!r} needs a positive size: noise-<σ in 1/255>, shift-<pixels>")
            self.squeezer = None
        else:
            self.squeezer = make_squeezer(name)  # DetectorError names the known forms
        self.offset = (0, 0)

    def __call__(self, x: torch.Tensor, differentiable: bool) -> torch.Tensor:
        if self.kind == "noise":
            return (x + self.value / 255 * torch.randn_like(x)).clamp(0, 1)
        if self.kind == "shift":
            s = int(self.value)
            sy, sx = (torch.randint(0, 2, (2,)) * 2 - 1).tolist()
            self.offset = (s * sy, s * sx)
            return shift(x, *self.offset)
        return self.squeezer.fn(x, differentiable)

    def align(self, m: torch.Tensor) -> torch.Tensor:
        """The map of the transformed input brought back to the original's frame (m at input resolution)."""
        return shift(m, -self.offset[0], -self.offset[1]) if self.kind == "shift" else m


class StabilityDetector(Detector):
    """Flags inputs whose maps move more under small input changes than benign maps do (decision ``joint``)."""

    kind = "stability"
    decision = "joint"
    aggregate = "joint"

    def __init__(self, members: Sequence[Interpreter], transforms: Sequence[str] = DEFAULT_TRANSFORMS) -> None:
        if not members:
            raise DetectorError("a stability detector needs at least one interpreter")
        super().__init__(members[0].model)
        if any(m.model is not self.model for m in members):
            raise DetectorError("all stability members must explain the same model object")
        if not transforms:
            raise DetectorError("a stability detector needs at least one transform")
        self.members, self.transforms = list(members), [Transform(t) for t in transforms]

    def keys(self) -> list[str]:
        return [f"{m.name}/{t.name}" for m in self.members for t in self.transforms]

    def raw(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Unnormalised L1 moves per member/transform (B,)."""
        hw = tuple(x.shape[-2:])
        out = {}
        for m in self.members:
            e = m(x)
            cls = pick_target(e.logits, None).detach()
            ref = m.upsample(e.saliency, hw)
            for t in self.transforms:
                xt = t(x, True)
                out[f"{m.name}/{t.name}"] = l1(t.align(m.upsample(m(xt, cls).saliency, hw)), ref)
        return out

    def fit(self, x_benign: torch.Tensor) -> None:
        parts: dict[str, list[torch.Tensor]] = {}
        for i in range(0, len(x_benign), 256):
            for k, v in self.raw(x_benign[i:i + 256]).items():
                parts.setdefault(k, []).append(v.detach().cpu())
        self.fitted = {"levels": {k: float(torch.cat(v).median().clamp_min(1e-6)) for k, v in parts.items()}}

    def scores(self, x: torch.Tensor, differentiable: bool = False) -> dict[str, torch.Tensor]:
        levels = self.fitted.get("levels")
        if not levels:
            raise DetectorError("the stability detector is not fitted: call calibrate() first")
        with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
            out = {k: v / levels[k] for k, v in self.raw(x).items()}
        out["joint"] = torch.stack(list(out.values())).amax(0)
        return out

    def config(self) -> dict:
        return {"members": [m.name for m in self.members], "transforms": [t.name for t in self.transforms]}

    def cost(self) -> dict:
        return {"forwards": 0, "maps": len(self.members) * (1 + len(self.transforms))}

    def config_keys(self) -> list[str]:
        return self.keys() + ["joint"]

    @classmethod
    def load(cls, path, members: Sequence[Interpreter]) -> "StabilityDetector":
        ck = cls.read(path)
        cfg = ck.get("config", {})
        if cfg.get("members") not in (None, [m.name for m in members]):
            raise DetectorError(f"{path} was calibrated for members {cfg['members']}, not {[m.name for m in members]}")
        return cls(members, cfg.get("transforms", DEFAULT_TRANSFORMS)).load_state(ck, str(path))
