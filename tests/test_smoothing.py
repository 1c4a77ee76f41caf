"""Smoothed interpreters and their per-pixel certificate: the contract, known answers, the vote's bound."""

from __future__ import annotations

import math

import pytest
import torch

from underfire.guard.registry import build_interpreter
from underfire.guard.interpreters.base import Explanation, Interpreter
from underfire.guard.smoothing import Smoothed, linf_as_l2, lower_bound, radius
from tests.conftest import tiny_classifier


class FixedMap(Interpreter):
    """A map that ignores the input: pixel i has value i / P."""

    name = "fixed"

    def native_size(self, hw):
        return (4, 4)

    def explain(self, x, target):
        m = torch.arange(16, dtype=x.dtype).view(1, 1, 4, 4).expand(x.shape[0], 1, 4, 4) / 15
        return Explanation(self.model(x), m + 0 * x.mean())


def test_smoothed_is_an_interpreter_with_a_gradient():
    model = tiny_classifier()
    sm = Smoothed(build_interpreter("cam", model), sigma=0.05, samples=4)
    x = torch.rand(3, 1, 28, 28, dtype=torch.float64, requires_grad=True)
    e = sm(x)
    assert e.saliency.shape == (3, 1, 7, 7) and e.logits.shape == (3, 10)
    assert float(e.saliency.detach().min()) >= 0 and float(e.saliency.detach().max()) <= 1
    (g,) = torch.autograd.grad(e.saliency.sum(), x)
    assert torch.isfinite(g).all() and float(g.abs().sum()) > 0
    assert not model.training


def test_one_sample_without_noise_is_the_base_map():
    model = tiny_classifier()
    cam = build_interpreter("cam", model)
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64)
    torch.testing.assert_close(Smoothed(cam, sigma=0.0, samples=1)(x).saliency, cam(x).saliency, atol=1e-9, rtol=0)


def test_vote_bound_matches_a_direct_binomial_computation():
    from scipy.stats import binomtest

    for c, n, a in ((100, 100, 0.05), (73, 100, 0.01), (51, 100, 0.05), (0, 20, 0.05), (9, 10, 0.001)):
        direct = binomtest(c, n).proportion_ci(confidence_level=1 - 2 * a, method="exact").low
        assert float(lower_bound(torch.tensor([c]), n, a)) == pytest.approx(direct, abs=1e-9)
    assert float(radius(torch.tensor([0.4]), 0.25)) == 0.0  # no majority: no certificate


def test_certificate_of_a_map_that_ignores_the_input():
    """Every copy votes the same top-k: each pixel is decided, with p_lower = (α/P)^(1/n) and radius σ·Φ⁻¹ of it."""
    from scipy.stats import norm

    sm = Smoothed(FixedMap(tiny_classifier()), sigma=0.25, samples=50)
    cert = sm.certify(torch.rand(2, 1, 28, 28, dtype=torch.float64), samples=50, k=0.25, alpha=0.05)
    want = torch.zeros(16, dtype=torch.int8)
    want[12:] = 1  # the four largest of 16 pixels
    assert (cert["decision"] == want).all()
    p = (0.05 / 16) ** (1 / 50)
    torch.testing.assert_close(cert["p_lower"], torch.full((2, 16), p, dtype=torch.float64), atol=1e-9, rtol=0)
    r = 0.25 * norm.ppf(p)
    torch.testing.assert_close(cert["radius"], torch.full((2, 16), r, dtype=torch.float64), atol=1e-9, rtol=0)
    expect = [1.0 if rad <= r else 0.0 for rad in cert["radii"]]
    assert cert["certified"].tolist() == [expect, expect]


def test_certificate_on_a_real_model(fmnist_resnet, fmnist_small):
    x, _ = fmnist_small
    sm = Smoothed(build_interpreter("cam", fmnist_resnet), sigma=0.1, samples=8)
    cert = sm.certify(x[:2], samples=40, k=0.2)
    f = cert["certified"]
    assert f.shape == (2, 3) and float(f.min()) >= 0 and float(f.max()) <= 1
    assert (f[:, 0] >= f[:, 1]).all() and (f[:, 1] >= f[:, 2]).all()  # larger radius, fewer certified pixels
    assert set(cert["decision"].unique().tolist()) <= {-1, 0, 1}
    assert linf_as_l2(24 / 255, (1, 28, 28)) == pytest.approx(24 / 255 * 28)
    assert math.isfinite(float(cert["radius"].max()))


def test_smooth_prefix_builds_a_smoothed_interpreter_and_its_adv2_preset():
    from underfire.attacks.adv2 import make_adv2
    from underfire.guard.interpreters.base import InterpreterError

    model = tiny_classifier()
    sm = build_interpreter("smooth:grad", model, sigma=0.05, samples=2)
    assert isinstance(sm, Smoothed) and sm.name == "smooth:grad" and sm.sigma == 0.05
    assert make_adv2("smooth:grad", 8 / 255, "short").describe() == make_adv2("grad", 8 / 255, "short").describe()
    with pytest.raises(InterpreterError, match="one-pass"):
        build_interpreter("smooth:mask", model)


def test_audit_attacks_a_smoothed_interpreter_and_reports_its_certificate(tmp_path):
    """`--interpreters cam,smooth:cam`: ADV² attacks the smoothed map through the one loop (EOT: each call draws
    new noise); the report carries its certified fractions and the ℓ2 reach of the ℓ∞ budget."""
    import json

    from tests.helpers import cli

    r = cli("audit", "--model", "fmnist_resnet", "--interpreters", "cam,smooth:cam", "--n", "2", "--attacks",
            "pgd,adv2", "--defenses", "", "--shorten", "50", "--out", tmp_path, cwd=tmp_path)
    assert r.returncode in (0, 4), r.stderr[-2000:]
    assert "certified top-20% pixels" in r.stdout
    (tg,) = json.loads((tmp_path / "default" / "report.json").read_text())["targets"].values()
    c = tg["summary"]["interpreters"]["smooth:cam"]["certified"]
    assert c["radii"] == [0.05, 0.1, 0.25] and all(0 <= v <= 1 for v in c["mean"])
    assert "certified" not in tg["summary"]["interpreters"]["cam"]
    assert tg["summary"]["interpreters"]["smooth:cam"]["adv2"]["asr"]["n"] == 2
    assert tg["linf_as_l2"] == pytest.approx(24 / 255 * 28)


@pytest.mark.slow  # two audits (≈ 40 s on 2 cores)
def test_smoothed_audit_records_are_reproducible(tmp_path):
    """The smoothing noise is seeded per batch: a rerun gives identical records."""
    import json

    from tests.helpers import cli

    args = ("audit", "--model", "fmnist_resnet", "--interpreters", "cam,smooth:cam", "--n", "2", "--attacks",
            "pgd,adv2", "--defenses", "", "--shorten", "50", "--out", tmp_path)
    r = cli(*args, cwd=tmp_path)
    (tg,) = json.loads((tmp_path / "default" / "report.json").read_text())["targets"].values()
    again = cli(*args, "--name", "again", cwd=tmp_path)
    assert again.returncode == r.returncode
    (tg2,) = json.loads((tmp_path / "again" / "report.json").read_text())["targets"].values()
    assert tg2["records"] == tg["records"]  # the smoothing noise is seeded per batch: a rerun is identical
