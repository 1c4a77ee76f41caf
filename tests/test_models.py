"""The model zoo on real weights and real data, and its errors."""

from __future__ import annotations

import pytest
import torch

from underfire.guard.errors import ModelError
from underfire.guard.models import CHECKPOINT_DIR, ImageClassifier, load_model
from underfire.guard.nets import SmallDenseNet, SmallResNet
from underfire.guard.weights import Checkpoint, read_checkpoint
from underfire.training.classifier import accuracy


def _top(model, x, names, name, k=3):
    i = names.index(name)
    with torch.no_grad():
        p = model(x[i:i + 1]).softmax(1)[0]
    return [model.categories[j] for j in p.topk(k).indices.tolist()]


def test_mobilenet_real_weights_predict_the_photos(mobilenet, photo_batch):
    x, names = photo_batch
    assert set(_top(mobilenet, x, names, "chelsea")) == {"Egyptian cat", "tiger cat", "tabby"}
    assert _top(mobilenet, x, names, "coffee", 1) == ["espresso"]
    assert mobilenet.input_size == (3, 224, 224) and len(mobilenet.categories) == 1000


def test_efficientnet_lite0_real_weights(photo_batch):
    model = load_model("efficientnet_lite0")
    x, names = photo_batch
    assert _top(model, x, names, "chelsea", 3)[0] in {"Egyptian cat", "tiger cat", "tabby"}
    assert "espresso" in _top(model, x, names, "coffee", 2)


def test_wrapper_takes_unit_range_and_normalises(mobilenet):
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        direct = mobilenet.net((x - mobilenet.mean) / mobilenet.std)
        torch.testing.assert_close(mobilenet(x), direct, rtol=0, atol=0)
    assert not mobilenet.training


@pytest.mark.parametrize("name, arch", [("fmnist_resnet", SmallResNet), ("fmnist_densenet", SmallDenseNet)])
def test_fmnist_nets_reach_91_percent_on_the_real_test_set(name, arch, fmnist_test):
    model = load_model(name)
    assert isinstance(model.net, arch)
    assert len(fmnist_test) == 10_000
    acc = accuracy(model, fmnist_test)
    assert acc >= 0.91, f"{name}: {acc:.4f}"
    ck = read_checkpoint(CHECKPOINT_DIR / f"{name}.pt")
    assert ck["metrics"]["test_top1"] == pytest.approx(acc, abs=2e-3)  # the committed figure is true
    assert ck["config"]["epochs"] >= 1


def test_unknown_model_name():
    with pytest.raises(ModelError, match="unknown model 'nope'"):
        load_model("nope")
    with pytest.raises(ModelError, match="unknown torchvision classifier"):
        load_model("torchvision:nope")


def test_missing_weights_say_where_to_put_the_file():
    # ResNet-50's IMAGENET1K_V1 file is not in the cache on this machine (no download possible).
    from underfire.guard.weights import hub_checkpoint_dir

    if (hub_checkpoint_dir() / "resnet50-0676ba61.pth").exists():
        pytest.skip("ResNet-50 weights are cached here")
    with pytest.raises(ModelError, match=r"place resnet50-0676ba61\.pth .* into"):
        load_model("resnet50")


def test_random_weight_paper_architectures_by_name():
    for arch in ("resnet50", "densenet169"):
        m = load_model(f"torchvision:{arch}")
        assert isinstance(m, ImageClassifier) and m.supports_cam()


def test_corrupt_and_foreign_checkpoints(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(ModelError, match="corrupt"):
        load_model(str(bad))
    # a DenseNet checkpoint relabelled as a ResNet one
    ck = read_checkpoint(CHECKPOINT_DIR / "fmnist_densenet.pt")
    ck["arch"] = "small_resnet"
    wrong = tmp_path / "wrong.pt"
    torch.save(ck, wrong)
    with pytest.raises(ModelError, match="does not fit architecture SmallResNet"):
        load_model(str(wrong))
    # a state_dict of another torchvision architecture
    sd = tmp_path / "r18.pth"
    torch.save(load_model("torchvision:resnet18").net.state_dict(), sd)
    with pytest.raises(ModelError, match="does not fit architecture"):
        load_model("torchvision:resnet34", weights=str(sd))
    # a torchvision state_dict of the right architecture loads
    m = load_model("torchvision:resnet18", weights=str(sd))
    assert isinstance(m, ImageClassifier)


def test_checkpoint_roundtrip_weights_only(tmp_path):
    net = SmallResNet(width=4)
    path = tmp_path / "c.pt"
    Checkpoint(arch="small_resnet", state_dict=net.state_dict(), config={"epochs": 1}).save(path)
    assert not (tmp_path / "c.pt.tmp").exists()
    ck = torch.load(path, weights_only=True)
    assert ck["arch"] == "small_resnet" and ck["config"] == {"epochs": 1}


def test_entry_point_models():
    m = load_model("torchvision.models:resnet18")
    assert isinstance(m, ImageClassifier)
    with pytest.raises(ModelError, match="cannot be imported"):
        load_model("no_such_module:fn")
