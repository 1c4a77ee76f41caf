"""Datasets: real Fashion-MNIST, the bundled photos, ImageFolder trees, and their errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from underfire.training.data import (
    PHOTO_DIR,
    DataError,
    ImageFolderDataset,
    fashion_mnist,
    load_image,
    load_images,
    stack,
)


def test_fashion_mnist_is_the_real_set(fmnist_test):
    train = fashion_mnist("train")
    assert len(train) == 60_000 and len(fmnist_test) == 10_000
    x, y = fmnist_test.tensors
    assert x.shape == (10_000, 1, 28, 28) and x.dtype == torch.float32
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert torch.bincount(y).tolist() == [1000] * 10  # the published test-set balance
    assert 0.28 < float(train.tensors[0].mean()) < 0.29  # the published training-set mean 0.2860


def test_fashion_mnist_errors(monkeypatch, tmp_path):
    with pytest.raises(DataError, match="split"):
        fashion_mnist("val")
    import underfire.training.data as data

    monkeypatch.setattr(data, "FMNIST_DIRS", (tmp_path,))
    monkeypatch.delenv("UNDERFIRE_FMNIST_DIR", raising=False)
    monkeypatch.setenv("UNDERFIRE_DATA", str(tmp_path / "dl"))

    def no_network(split):
        raise OSError("network unreachable")

    monkeypatch.setattr(data, "_fmnist_from_torchvision", no_network)
    with pytest.raises(DataError, match="dataset-fashion-mnist.*torchvision's download"):
        fashion_mnist("test")


def test_bundled_photos_have_sources(photo_batch):
    x, names = photo_batch
    assert len(names) >= 15 and x.shape == (len(names), 3, 224, 224)
    assert float(x.min()) >= 0 and float(x.max()) <= 1
    sources = (PHOTO_DIR / "SOURCES.md").read_text()
    for n in names:
        assert f"| {n}.png |" in sources
    assert {"chelsea", "coffee", "astronaut", "rocket", "grace_hopper", "china", "flower"} <= set(names)


def _tree(root: Path, classes=("a", "b"), per=2) -> Path:
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per):
            Image.new("RGB", (40, 30), (i * 50, 100, 200)).save(root / c / f"{i}.png")
    return root


def test_image_folder(tmp_path):
    ds = ImageFolderDataset(_tree(tmp_path / "t"), size=32)
    assert ds.classes == ["a", "b"] and len(ds) == 4
    x, y = stack(ds)
    assert x.shape == (4, 3, 32, 32) and y.tolist() == [0, 0, 1, 1]


def test_image_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class subfolders"):
        ImageFolderDataset(tmp_path / "empty")
    with pytest.raises(DataError, match="no image files"):
        load_images([tmp_path / "empty"])
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not a png")
    with pytest.raises(DataError, match="cannot decode image .*junk.png"):
        load_image(junk)
    with pytest.raises(DataError, match="not found"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "onlydirs" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no image files"):
        ImageFolderDataset(tmp_path / "onlydirs")
