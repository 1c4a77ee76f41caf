"""RTS: the bundled checkpoints meet the quality bars on the real test set; the trainer runs and round-trips."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from underfire.guard.interpreters import RTS
from underfire.guard.models import CHECKPOINT_DIR
from underfire.guard.weights import read_checkpoint
from underfire.training.rts import RTSConfig, rts_loss, rts_quality, train_rts


@pytest.mark.parametrize("name", ["fmnist_resnet", "fmnist_densenet"])
def test_bundled_rts_quality_on_real_test_set(name, fmnist_test, request):
    model = request.getfixturevalue(name)
    interp = RTS.for_model(model)
    q = rts_quality(interp, fmnist_test, limit=2000)
    assert q["preserved_acc"] >= 0.8 * q["clean_acc"], q
    assert q["destroyed_acc"] <= 0.5 * q["clean_acc"], q
    assert q["area"] <= 0.5, q
    ck = read_checkpoint(CHECKPOINT_DIR / f"rts_{name}.pt")
    assert ck["model"] == name and ck["metrics"]["quality"]["n"] == 10_000


def test_rts_trainer_runs_on_real_data_and_round_trips(fmnist_resnet, fmnist_test, tmp_path):
    x, y = fmnist_test.tensors
    data = TensorDataset(x[:640], y[:640])
    cfg = RTSConfig(epochs=1, phase1_epochs=1, batch_size=64, log_every=1)
    seen = []
    interp, ck = train_rts(fmnist_resnet, data, cfg, progress=seen.append)
    losses = [p["loss"] for p in seen]
    assert len(losses) == 20 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) < sum(losses[:5])
    assert all(p.requires_grad for p in fmnist_resnet.parameters())  # the classifier is given back unfrozen
    path = tmp_path / "rts.pt"
    torch.save(ck, path)
    again = RTS.for_model(fmnist_resnet, path)
    xb = x[:4]
    torch.testing.assert_close(again(xb).saliency, interp(xb).saliency, rtol=0, atol=1e-6)


def test_rts_loss_parts_are_finite(fmnist_resnet, fmnist_small):
    interp = RTS.untrained(fmnist_resnet)
    loss, logs = rts_loss(interp, *fmnist_small, RTSConfig(fake_prob=0.0))
    assert torch.isfinite(loss) and set(logs) == {"area", "p_destroy", "ce_keep"}
