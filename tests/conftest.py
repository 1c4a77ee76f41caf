"""Shared fixtures: real models and data where a claim depends on them, tiny float64 nets for mechanics."""

from __future__ import annotations

import pytest
import torch

from underfire.guard.models import FMNIST_MEAN, FMNIST_STD, ImageClassifier, load_model

from underfire.guard.nets import SmallResNet

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def mobilenet():
    return load_model("mobilenet_v2")


@pytest.fixture(scope="session")
def fmnist_resnet():
    return load_model("fmnist_resnet")


@pytest.fixture(scope="session")
def fmnist_densenet():
    return load_model("fmnist_densenet")


@pytest.fixture(scope="session")
def photo_batch():
    from underfire.training.data import photos

    return photos()


@pytest.fixture(scope="session")
def fmnist_test():
    from underfire.training.data import fashion_mnist

    return fashion_mnist("test")


@pytest.fixture(scope="session")
def fmnist_small(fmnist_test):
    return fmnist_test.tensors[0][:6], fmnist_test.tensors[1][:6]


def tiny_classifier(dtype=torch.float64, seed: int = 0) -> ImageClassifier:
    """A ResNet-style 28×28 net of width 4 with random weights: for mechanics and gradcheck only."""
    torch.manual_seed(seed)
    net = SmallResNet(num_classes=10, width=4)
    for m in net.modules():  # give BatchNorm non-trivial running statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    model = ImageClassifier(net, FMNIST_MEAN, FMNIST_STD, name="tiny", input_size=(1, 28, 28),
                            categories=[str(i) for i in range(10)])
    return model.to(dtype).eval()


@pytest.fixture
def tiny():
    return tiny_classifier()
