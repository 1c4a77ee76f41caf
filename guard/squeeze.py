"""Feature squeezing (Xu, Evans & Qi, NDSS 2018): flag inputs whose prediction moves when the input is
squeezed.

    score_s(x) = ‖softmax f(x) − softmax f(s(x))‖₁        joint(x) = max_s score_s(x)

Squeezers (the paper's Table 4 uses bits-2, bits-3, median-3, nlm-11-3-4):
- ``bits-k``: bit-depth reduction to k bits, round(x·(2^k − 1)) / (2^k − 1);
- ``median-k``: k×k median filter (k = 2 takes the window [i−1, i] and the upper median, like
  scipy.ndimage.median_filter that the original code uses; borders replicate the edge pixel);
- ``nlm-11-3-h``: OpenCV non-local means, search window 11, patch 3, strength h (on the 8-bit image;
  ``fastNlMeansDenoisingColored`` for colour, ``fastNlMeansDenoising`` for grayscale).

Bit depth and median run batched in torch on the input's device. For the adaptive attacker
(``differentiable=True``): the median is exact in the forward pass and passes the gradient to the selected
pixel; bit depth and NLM use the straight-through estimate (forward squeezed, backward identity).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from underfire.guard.calibration import Detector, DetectorError


def bit_depth(x: torch.Tensor, bits: int, straight_through: bool = False) -> torch.Tensor:
    """Reduce x in [0, 1] to ``bits`` bits per channel."""
    if not 1 <= bits <= 8:
        raise DetectorError(f"bit depth must be in 1..8, got {bits}")
    levels = 2 ** bits - 1
    q = torch.round(x * levels) / levels
    return x + (q - x).detach() if straight_through else q


def median(x: torch.Tensor, k: int) -> torch.Tensor:
    """k×k median filter per channel (exact; differentiable almost everywhere through the sort). x: (B, C, H, W)."""
    if k < 2:
        raise DetectorError(f"median window must be at least 2, got {k}")
    b, c, h, w = x.shape
    lo, hi = k // 2, (k - 1) // 2  # window offsets [i − lo, i + hi]: k = 2 → [i − 1, i], k = 3 → [i − 1, i + 1]
    xp = F.pad(x.reshape(b * c, 1, h, w), (lo, hi, lo, hi), mode="replicate")
    patches = F.unfold(xp, k)  # (B·C, k², H·W)
    med = patches.sort(dim=1).values[:, (k * k) // 2]  # upper median for even k², the median for odd
    return med.view(b, c, h, w)


def non_local_means(x: torch.Tensor, strength: float, window: int = 11, patch: int = 3,
                    straight_through: bool = False) -> torch.Tensor:
    """OpenCV non-local means on the 8-bit image (CPU, per image)."""
    import cv2

    img = (x.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, C)
    out = np.empty_like(img)
    for i, im in enumerate(img):
        if im.shape[-1] == 1:
            out[i, ..., 0] = cv2.fastNlMeansDenoising(np.ascontiguousarray(im[..., 0]), None, h=strength,
                                                      templateWindowSize=patch, searchWindowSize=window)
        else:
            out[i] = cv2.fastNlMeansDenoisingColored(np.ascontiguousarray(im), None, strength, strength, patch, window)
    q = torch.from_numpy(out).permute(0, 3, 1, 2).to(device=x.device, dtype=x.dtype) / 255
    return x + (q - x).detach() if straight_through else q


@dataclass(frozen=True)
class Squeezer:
    name: str
    fn: Callable[[torch.Tensor, bool], torch.Tensor]  # (x, differentiable) -> squeezed x


def make_squeezer(name: str) -> Squeezer:
    """``bits-<k>``, ``median-<k>`` or ``nlm-<window>-<patch>-<strength>``."""
    kind, _, rest = name.partition("-")
    try:
        args = [int(a) for a in rest.split("-")] if rest else []
    except ValueError:
        args = None
    if kind == "bits" and args and len(args) == 1:
        return Squeezer(name, lambda x, d, k=args[0]: bit_depth(x, k, straight_through=d))
    if kind == "median" and args and len(args) == 1:
        return Squeezer(name, lambda x, d, k=args[0]: median(x, k))
    if kind == "nlm" and args and len(args) == 3:
        w, p, h = args
        return Squeezer(name, lambda x, d: non_local_means(x, h, w, p, straight_through=d))
    raise DetectorError(f"unknown squeezer {name!r}: use bits-<k>, median-<k> or nlm-<window>-<patch>-<strength>")


DEFAULT_SQUEEZERS = ("bits-2", "bits-3", "median-2", "median-3", "nlm-11-3-2", "nlm-11-3-4")


class SqueezeDetector(Detector):
    """Feature-squeezing detector for ``model`` (an ImageClassifier taking images in [0, 1]).

    Scores: one per squeezer and ``joint`` (their maximum, Xu et al.'s detector); decision by ``joint``.
    """

    kind = "squeeze"
    decision = "joint"
    aggregate = "joint"

    def __init__(self, model, squeezers: tuple[str, ...] | list[str] = DEFAULT_SQUEEZERS) -> None:
        super().__init__(model)
        if not squeezers:
            raise DetectorError("feature squeezing needs at least one squeezer")
        self.squeezers = [make_squeezer(s) for s in squeezers]

    def scores(self, x: torch.Tensor, differentiable: bool = False) -> dict[str, torch.Tensor]:
        with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
            p = self.model(x).softmax(1)  # (B, K)
            out = {s.name: (p - self.model(s.fn(x, differentiable)).softmax(1)).abs().sum(1) for s in self.squeezers}
        out["joint"] = torch.stack(list(out.values())).amax(0)
        return out

    def config(self) -> dict:
        return {"squeezers": [s.name for s in self.squeezers]}

    def cost(self) -> dict:
        return {"forwards": 1 + len(self.squeezers), "maps": 0}

    def config_keys(self) -> list[str]:
        return [s.name for s in self.squeezers] + ["joint"]

    @classmethod
    def load(cls, path, model) -> "SqueezeDetector":
        ck = cls.read(path)
        det = cls(model, ck.get("config", {}).get("squeezers", DEFAULT_SQUEEZERS))
        return det.load_state(ck, str(path))
