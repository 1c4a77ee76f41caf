"""Feature squeezing: squeezers against their definitions, calibration, files, the adaptive attack's hooks."""

from __future__ import annotations

import pytest
import torch

from underfire.attacks.adaptive import adaptive
from underfire.attacks.adv2 import PGD, make_adv2
from underfire.attacks.threats import AttackError
from underfire.guard.calibration import DetectorError, threshold_at_fpr
from underfire.guard.squeeze import SqueezeDetector, bit_depth, make_squeezer, median, non_local_means
from tests.conftest import tiny_classifier


def test_bit_depth_known_values():
    x = torch.tensor([0.0, 0.1, 0.2, 0.5, 0.6, 0.9, 1.0]).view(1, 1, 1, 7)
    assert bit_depth(x, 1).flatten().tolist() == [0, 0, 0, 0, 1, 1, 1]  # round(x) (0.5 rounds to even)
    torch.testing.assert_close(bit_depth(x, 2).flatten(),
                               torch.tensor([0, 0, 1 / 3, 2 / 3, 2 / 3, 1, 1]), atol=1e-6, rtol=0)
    assert len(bit_depth(torch.rand(1, 1, 32, 32), 3).unique()) <= 8


def test_straight_through_bit_depth_passes_gradient():
    x = torch.rand(1, 1, 4, 4, requires_grad=True)
    bit_depth(x, 2, straight_through=True).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))


def _naive_median(x: torch.Tensor, k: int) -> torch.Tensor:
    """Loops over pixels: window [i − k//2, i + (k−1)//2], replicated border, upper median."""
    b, c, h, w = x.shape
    out = torch.empty_like(x)
    lo, hi = k // 2, (k - 1) // 2
    for i in range(h):
        for j in range(w):
            rows = [min(max(r, 0), h - 1) for r in range(i - lo, i + hi + 1)]
            cols = [min(max(q, 0), w - 1) for q in range(j - lo, j + hi + 1)]
            win = x[:, :, rows][:, :, :, cols].flatten(2)
            out[:, :, i, j] = win.sort(-1).values[..., (k * k) // 2]
    return out


def test_median_on_a_known_patch():
    x = torch.tensor([[1.0, 2, 3], [4, 5, 6], [7, 8, 9]]).view(1, 1, 3, 3)
    m3 = median(x, 3)
    assert float(m3[0, 0, 1, 1]) == 5.0  # centre: median of 1..9
    assert float(m3[0, 0, 0, 0]) == 2.0  # corner window [1,1,2,1,1,2,4,4,5] -> 2
    m2 = median(x, 2)
    assert float(m2[0, 0, 1, 1]) == 4.0  # window {1,2,4,5}: upper median 4 (scipy median_filter rank 2)


@pytest.mark.parametrize("k", [2, 3])
def test_differentiable_median_equals_exact(k):
    x = torch.rand(2, 3, 9, 11, generator=torch.Generator().manual_seed(k))
    torch.testing.assert_close(median(x, k), _naive_median(x, k), atol=0, rtol=0)
    xg = x.clone().requires_grad_(True)
    median(xg, k).sum().backward()
    assert xg.grad.abs().sum() > 0 and torch.isfinite(xg.grad).all()


def test_non_local_means_gray_and_colour():
    g = torch.rand(2, 1, 28, 28)
    c = torch.rand(1, 3, 32, 32)
    for x in (g, c):
        y = non_local_means(x, 4)
        assert y.shape == x.shape and 0 <= float(y.min()) and float(y.max()) <= 1
        assert (y - x).abs().mean() > 0  # it denoises something
    flat = torch.full((1, 1, 16, 16), 0.5)
    torch.testing.assert_close(non_local_means(flat, 4), flat, atol=1 / 255, rtol=0)


def test_unknown_squeezer():
    with pytest.raises(DetectorError, match="unknown squeezer"):
        make_squeezer("blur-3")


@pytest.mark.parametrize("dist", ["uniform", "exponential", "ties"])
@pytest.mark.parametrize("fpr", [0.01, 0.05, 0.2])
def test_threshold_reaches_requested_fpr(dist, fpr):
    g = torch.Generator().manual_seed(0)
    if dist == "uniform":
        s = torch.rand(5000, generator=g)
    elif dist == "exponential":
        s = torch.empty(5000).exponential_(generator=g)
    else:
        s = torch.randint(0, 20, (5000,), generator=g).float()
    t = threshold_at_fpr(s, fpr)
    got = float((s > t).double().mean())
    assert got <= fpr + 1e-9
    if dist != "ties":
        assert got >= fpr - 2 / 5000  # not needlessly conservative
        fresh = torch.rand(20000, generator=g) if dist == "uniform" else torch.empty(20000).exponential_(generator=g)
        sigma = (fpr * (1 - fpr) * (1 / 5000 + 1 / 20000)) ** 0.5  # sampling error of both estimates
        assert abs(float((fresh > t).double().mean()) - fpr) < 4 * sigma  # held-out draws, same distribution


def test_empty_or_bad_calibration():
    with pytest.raises(DetectorError, match="empty"):
        threshold_at_fpr(torch.empty(0), 0.05)
    with pytest.raises(DetectorError, match="NaN"):
        threshold_at_fpr(torch.tensor([0.1, float("nan")]), 0.05)
    with pytest.raises(DetectorError, match="false-positive"):
        threshold_at_fpr(torch.rand(10), 1.5)
    det = SqueezeDetector(tiny_classifier(torch.float32))
    with pytest.raises(DetectorError, match="empty"):
        det.calibrate(torch.empty(0, 1, 28, 28))
    with pytest.raises(DetectorError, match="not calibrated"):
        det.flags(torch.rand(2, 1, 28, 28))


def test_real_detector_fpr_and_file_round_trip(fmnist_resnet, fmnist_test, tmp_path):
    """Calibrated on 400 real benign images at 5%: the held-out FPR stays near 5% for every squeezer."""
    x = fmnist_test.tensors[0]
    det = SqueezeDetector(fmnist_resnet, ["bits-2", "median-2", "nlm-11-3-4"])
    cal = det.calibrate(x[5000:5400], 0.05, heldout=x[7000:7400])
    for k, v in cal["fpr_heldout"].items():
        assert abs(v - 0.05) <= 0.035, (k, v)
    path = tmp_path / "sq.pt"
    det.save(path)
    again = SqueezeDetector.load(path, fmnist_resnet)
    assert again.thresholds == det.thresholds and again.config() == det.config()
    other = tiny_classifier(torch.float32)
    with pytest.raises(DetectorError, match="calibrated for model 'fmnist_resnet'"):
        SqueezeDetector.load(path, other)
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DetectorError):
        SqueezeDetector.load(tmp_path / "bad.pt", fmnist_resnet)


def test_adaptive_needs_calibration_and_records_itself(fmnist_resnet, fmnist_test):
    det = SqueezeDetector(fmnist_resnet, ["bits-2", "median-2"])
    with pytest.raises(AttackError, match="calibrated"):
        adaptive(PGD(24 / 255, steps=2), det)
    det.calibrate(fmnist_test.tensors[0][5000:5100], 0.05)
    atk = adaptive(PGD(24 / 255, steps=2), det)
    assert atk.describe()["adaptive_to"][0]["detector"] == "squeeze"
    # the adaptive attacker succeeds by the deployment's rule (argmax), not GRAD-ADV²'s p(c_t) ≥ 0.8 ...
    grad_adv2 = make_adv2("grad", 24 / 255, "short")
    assert grad_adv2.min_confidence == 0.8
    assert adaptive(grad_adv2, det).min_confidence == 0.0 and "p(c_t)" not in grad_adv2.definition()
    # ... unless asked to keep the attack's own
    assert adaptive(make_adv2("grad", 24 / 255, "short"), det, min_confidence=None).min_confidence == 0.8
    # the hinge is differentiable through the squeezers: a gradient reaches the input
    x = fmnist_test.tensors[0][:3].clone().requires_grad_(True)
    h = det.hinge(margin=0.0)(x)
    (g,) = torch.autograd.grad(h.sum(), x)
    assert h.shape == (3,) and g.abs().sum() > 0
