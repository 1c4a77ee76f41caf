"""Entry points for CLI tests (``module:function`` deployments)."""

from __future__ import annotations

import torch
from torch import nn

from guard.models import FMNIST_MEAN, FMNIST_STD, ImageClassifier


class _NaNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(784, 10)

    def forward(self, x):
        return self.fc(x.flatten(1)) * float("nan")


def nan_model() -> ImageClassifier:
    """A 28×28 classifier whose outputs are NaN (a broken deployment)."""
    return ImageClassifier(_NaNNet(), FMNIST_MEAN, FMNIST_STD, name="nan_model", input_size=(1, 28, 28),
                           categories=[str(i) for i in range(10)])
