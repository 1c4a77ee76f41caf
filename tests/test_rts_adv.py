"""RTS^A training mechanics on real data (the quality claims live in benchmarks/rts_adv.py)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import TensorDataset

from underfire.guard.interpreters.rts import RTS, load_saliency_net
from underfire.guard.weights import save_checkpoint
from underfire.training.rts_adv import RTSAdvConfig, calibrate_balance, mask_area, rts_adv_loss, train_rts_adv


def test_rts_adv_trains_on_real_data_and_round_trips(fmnist_resnet, fmnist_test, tmp_path):
    x, y = fmnist_test.tensors[0][:64], fmnist_test.tensors[1][:64]
    cfg = RTSAdvConfig(epochs=1, batch_size=16, lr=1e-3, warm_steps=2, joint_steps=3, log_every=1, limit=64)
    base = RTS.for_model(fmnist_resnet)
    before = {k: v.clone() for k, v in base.net.state_dict().items()}
    flags = [p.requires_grad for p in fmnist_resnet.parameters()]
    logs = []
    interp, ck = train_rts_adv(fmnist_resnet, TensorDataset(x, y), cfg, progress=logs.append, start=base)
    losses = [p["loss"] for p in logs]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    assert all(math.isfinite(p["logs"]["robust_l1"]) for p in logs)
    assert any(not torch.equal(before[k], v) for k, v in interp.net.state_dict().items())
    assert ck["adversarial"] and ck["config"]["eps"] == cfg.eps
    assert not fmnist_resnet.training and [p.requires_grad for p in fmnist_resnet.parameters()] == flags
    save_checkpoint(ck, tmp_path / "rtsa.pt")
    again = RTS(fmnist_resnet, load_saliency_net(tmp_path / "rtsa.pt", "fmnist_resnet"))
    with torch.no_grad():
        torch.testing.assert_close(again(x[:4]).saliency, interp(x[:4]).saliency)


def test_robustness_term_decreases_when_optimised(fmnist_resnet, fmnist_test):
    """Steps on the RTS^A loss of one fixed batch lower it (the objective is trainable, not constant)."""
    x, y = fmnist_test.tensors[0][:16], fmnist_test.tensors[1][:16]
    cfg = RTSAdvConfig(warm_steps=2, joint_steps=2, adv2_prob=1.0)
    interp = RTS.for_model(fmnist_resnet)
    interp.net.train()
    opt = torch.optim.Adam(interp.net.parameters(), lr=1e-3)
    vals = []
    for _ in range(6):
        loss, _ = rts_adv_loss(interp, x, y, cfg, torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        vals.append(float(loss.detach()))
    interp.net.eval()
    assert vals[-1] < vals[0]


def test_repel_term_adds_its_hinge_to_the_loss(fmnist_resnet, fmnist_test):
    """repel_weight · relu(τ − L1(RTS(x_adv, c_t), RTS(x, y))) is added on top of the anchor loss, nothing else."""
    x, y = fmnist_test.tensors[0][:8], fmnist_test.tensors[1][:8]
    interp = RTS.for_model(fmnist_resnet)
    plain, _ = rts_adv_loss(interp, x, y, RTSAdvConfig(warm_steps=2, joint_steps=2), torch.Generator().manual_seed(0))
    cfg = RTSAdvConfig(warm_steps=2, joint_steps=2, repel_weight=3.0, repel_margin=2.0)  # τ above any L1: active
    loss, logs = rts_adv_loss(interp, x, y, cfg, torch.Generator().manual_seed(0))
    assert 0 < float(logs["repel"]) <= 2.0
    torch.testing.assert_close(loss - plain, 3.0 * logs["repel"], rtol=1e-5, atol=1e-6)


def test_own_encoder_is_trained_saved_and_loaded(fmnist_resnet, fmnist_test, tmp_path):
    """own_encoder: a copy of the classifier is fine-tuned with the saliency net; the deployed classifier is
    untouched, the logits are still the classifier's, and RTS.for_model restores the same maps."""
    x, y = fmnist_test.tensors[0][:32], fmnist_test.tensors[1][:32]
    cfg = RTSAdvConfig(epochs=1, batch_size=16, lr=1e-3, warm_steps=1, joint_steps=2, limit=32, own_encoder=True)
    weights = {k: v.clone() for k, v in fmnist_resnet.state_dict().items()}
    interp, ck = train_rts_adv(fmnist_resnet, TensorDataset(x, y), cfg, start=RTS.for_model(fmnist_resnet))
    assert interp.encoder is not None and "encoder_state_dict" in ck
    assert all(torch.equal(weights[k], v) for k, v in fmnist_resnet.state_dict().items())  # classifier untouched
    moved = [k for k, v in interp.encoder.net.state_dict().items() if not torch.equal(weights["net." + k], v)]
    assert moved  # the own encoder was trained
    with torch.no_grad():
        torch.testing.assert_close(interp(x[:4]).logits, fmnist_resnet(x[:4]))
    save_checkpoint(ck, tmp_path / "rtsa_own.pt")
    again = RTS.for_model(fmnist_resnet, tmp_path / "rtsa_own.pt")
    assert again.encoder is not None
    with torch.no_grad():
        torch.testing.assert_close(again(x[:4]).saliency, interp(x[:4]).saliency)


def test_area_match_calibrates_the_mask_balance_and_round_trips(fmnist_resnet, fmnist_test, tmp_path):
    """area_match: after training, the mask balance is set so the area on the calibration images is the asked
    multiple of the starting RTS's area there; a larger balance gives smaller masks; the checkpoint keeps it."""
    x, y = fmnist_test.tensors[0][:48], fmnist_test.tensors[1][:48]
    start = RTS.for_model(fmnist_resnet)
    area_start = mask_area(start, x[:32], y[:32])
    cfg = RTSAdvConfig(epochs=1, batch_size=16, warm_steps=1, joint_steps=2, limit=48, area_match=0.8,
                       calib_images=32)
    interp, ck = train_rts_adv(fmnist_resnet, TensorDataset(x, y), cfg, start=start)
    assert ck["balance"] == interp.net.balance > 1.0  # 0.8 × the start's area: masks had to shrink
    assert abs(mask_area(interp, x[:32], y[:32]) - 0.8 * area_start) < 1e-3
    cal = ck["metrics"]["area_calibration"]
    assert cal["images"] == 32 and abs(cal["area_target"] - 0.8 * area_start) < 1e-3
    save_checkpoint(ck, tmp_path / "rtsa_cal.pt")
    again = RTS.for_model(fmnist_resnet, tmp_path / "rtsa_cal.pt")
    assert again.net.balance == interp.net.balance
    with torch.no_grad():
        torch.testing.assert_close(again(x[:4]).saliency, interp(x[:4]).saliency)
    interp.net.balance = 2 * again.net.balance  # monotone: a larger balance, a smaller area
    assert mask_area(interp, x[:32], y[:32]) < mask_area(again, x[:32], y[:32])
    with pytest.raises(ValueError, match="cannot calibrate"):
        calibrate_balance(interp, x[:32], y[:32], area=1.5)
    assert interp.net.balance == 2 * again.net.balance  # a failed calibration leaves the balance as it was


def test_polish_trains_the_head_and_leaves_the_own_encoder(fmnist_resnet, fmnist_test):
    """polish_epochs: the plain RTS loss on the saliency net alone; the own encoder does not move."""
    x, y = fmnist_test.tensors[0][:32], fmnist_test.tensors[1][:32]
    cfg = RTSAdvConfig(epochs=0, polish_epochs=1, batch_size=16, limit=32, own_encoder=True)
    start = RTS.for_model(fmnist_resnet)
    head = {k: v.clone() for k, v in start.net.state_dict().items()}
    interp, ck = train_rts_adv(fmnist_resnet, TensorDataset(x, y), cfg, start=start)
    assert all(torch.equal(fmnist_resnet.state_dict()["net." + k], v) for k, v in interp.encoder.net.state_dict().items())
    assert any(not torch.equal(head[k], v) for k, v in ck["state_dict"].items())
    assert "polish_seconds" in ck["metrics"]
