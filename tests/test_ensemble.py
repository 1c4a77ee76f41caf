"""Interpreter ensembles and the disagreement detector."""

from __future__ import annotations

import pytest
import torch

from underfire.attacks.adv2 import Adv2
from underfire.guard.calibration import DetectorError
from underfire.guard.ensemble import DisagreementDetector, InterpreterEnsemble, build_ensemble
from underfire.guard.maps import pearson
from underfire.guard.registry import build_interpreter
from underfire.guard.interpreters.base import InterpreterError
from tests.conftest import tiny_classifier


@pytest.mark.parametrize("reduce", ["mean", "max", "min", "median"])
def test_ensemble_of_identical_members_equals_the_member(reduce):
    model = tiny_classifier()
    cam = build_interpreter("cam", model)
    x = torch.rand(3, 1, 28, 28, dtype=torch.float64)
    one, three = cam(x), InterpreterEnsemble([cam, cam, cam], reduce=reduce)(x)
    torch.testing.assert_close(three.saliency, one.saliency, atol=1e-12, rtol=0)
    torch.testing.assert_close(three.logits, one.logits)


def test_ensemble_common_resolution_and_gradient():
    model = tiny_classifier()
    ens = build_ensemble("grad+cam", model)
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64, requires_grad=True)
    e = ens(x)
    assert e.saliency.shape == (2, 1, 7, 7) == (2, 1, *ens.native_size((28, 28)))  # GRAD 7×7 (pool 4), CAM 7×7
    (g,) = torch.autograd.grad(e.saliency.sum(), x)
    assert g.abs().sum() > 0
    assert not model.training


def test_ensemble_errors():
    a, b = tiny_classifier(), tiny_classifier(seed=1)
    with pytest.raises(InterpreterError, match="at least one"):
        InterpreterEnsemble([])
    with pytest.raises(InterpreterError, match="same model"):
        InterpreterEnsemble([build_interpreter("cam", a), build_interpreter("cam", b)])
    with pytest.raises(InterpreterError, match="reduction"):
        InterpreterEnsemble([build_interpreter("cam", a)], reduce="mode")
    with pytest.raises(DetectorError, match="two"):
        DisagreementDetector([build_interpreter("cam", a)])


def test_an_attack_runs_against_an_ensemble_unchanged(fmnist_resnet, fmnist_small):
    x, y = fmnist_small
    ens = build_ensemble("cam+rts", fmnist_resnet)
    r = Adv2("cam", 24 / 255, steps=(3, 3), check_every=3)(ens, x[:2], (y[:2] + 1) % 10, ens(x[:2]).saliency)
    assert r.explanation.saliency.shape == (2, 1, 7, 7)


def test_disagreement_detector_reaches_its_fpr_on_real_benign_data(fmnist_resnet, fmnist_test, tmp_path):
    x = fmnist_test.tensors[0]
    members = [build_interpreter(n, fmnist_resnet) for n in ("grad", "cam", "rts")]
    det = DisagreementDetector(members)
    cal = det.calibrate(x[5000:5500], 0.05, heldout=x[7000:7500])
    for k, v in cal["fpr_heldout"].items():
        assert abs(v - 0.05) <= 0.03, (k, v)
    det.save(tmp_path / "ens.pt")
    again = DisagreementDetector.load(tmp_path / "ens.pt", members)
    assert again.thresholds == det.thresholds
    with pytest.raises(DetectorError, match="members"):
        DisagreementDetector.load(tmp_path / "ens.pt", members[:2])


def test_correlation_score_ignores_scale_and_offset_and_has_a_gradient():
    a = torch.rand(4, 1, 7, 7, dtype=torch.float64)
    torch.testing.assert_close(pearson(a, 0.5 * a + 0.2), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(pearson(a, -a), -torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(pearson(a, torch.full_like(a, 0.3)), torch.zeros(4, dtype=torch.float64), atol=1e-6, rtol=0)
    model = tiny_classifier()
    det = DisagreementDetector([build_interpreter("grad", model), build_interpreter("cam", model)])
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64, requires_grad=True)
    s = det.scores(x, differentiable=True)
    assert det.decision == "corr" and set(s) == {"corr", "l1", "iou"}
    assert ((s["corr"] >= 0) & (s["corr"] <= 2)).all()
    (g,) = torch.autograd.grad(s["corr"].sum(), x)
    assert g.abs().sum() > 0


def test_mask_tracking_continues_the_previous_mask_and_judges_from_scratch(fmnist_resnet, fmnist_small):
    """Inside ``tracking`` a differentiable MASK explanation takes ``steps`` Adam steps from the previous one
    (what an attack through an ensemble with a MASK member needs); a judging call still solves from scratch."""
    x = fmnist_small[0][:3]
    mask = build_interpreter("mask", fmnist_resnet, steps=20, unroll=2, deterministic=True)
    calls = []
    hook = fmnist_resnet.register_forward_hook(lambda *a: calls.append(1))
    try:
        deployed = mask(x).saliency
        x2 = (x + 0.01).clamp(0, 1)
        with mask.tracking(3):
            first = mask(x.clone().requires_grad_(True))
            calls.clear()
            second = mask(x2.clone().requires_grad_(True))
            tracked_calls = len(calls)
            judged = mask(x).saliency
            calls.clear()
            again = mask(x).saliency  # the same tensor judged again (attack, then detector): no second solve
            assert len(calls) == 0 and again is judged
            x.add_(0)  # modified in place: solved again
            mask(x)
            assert len(calls) > 20
        calls.clear()
        mask(x2.clone().requires_grad_(True))  # the block is over: from scratch again
        fresh_calls = len(calls)
    finally:
        hook.remove()
    t = fmnist_resnet(x).argmax(1)
    m, st = mask.solve(x, t)
    m, st = mask.solve(x2, t, steps=3, m0=m, state=st)
    m, _ = mask.solve(x2, t, steps=2, m0=m, state=st, create_graph=True)
    torch.testing.assert_close(second.saliency, 1 - m)
    assert first.saliency.requires_grad and second.saliency.requires_grad
    assert tracked_calls < fresh_calls - 15  # 3 + 2 steps instead of 20 + 2
    torch.testing.assert_close(judged, deployed)
    with pytest.raises(InterpreterError, match="at least one step"):
        with mask.tracking(0):
            pass


def test_an_attack_tracks_a_mask_member_of_an_ensemble(fmnist_resnet, fmnist_small):
    x, y = fmnist_small
    ens = InterpreterEnsemble([build_interpreter("cam", fmnist_resnet),
                               build_interpreter("mask", fmnist_resnet, steps=30, unroll=1)])
    calls = []
    hook = fmnist_resnet.register_forward_hook(lambda *a: calls.append(1))
    try:
        counts = {}
        for track in (0, 2):
            calls.clear()
            r = Adv2("cam", 24 / 255, steps=(1, 6), check_every=6, track=track)(
                ens, x[:2], (y[:2] + 1) % 10, ens(x[:2]).saliency)
            counts[track] = len(calls)
    finally:
        hook.remove()
    assert r.explanation.saliency.shape == (2, 1, 14, 14)
    assert counts[0] - counts[2] >= 5 * 25  # joint steps 2–6: 2 tracked MASK steps each instead of a 30-step solve
