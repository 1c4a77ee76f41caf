"""The small CAM-compatible networks of the bundled Fashion-MNIST models (1×28×28 inputs, GAP + linear head)."""

from __future__ import annotations

import torch
from torch import nn

# Fashion-MNIST: the normalisation the bundled nets were trained with, and the class names
FMNIST_MEAN = (0.2860,)
FMNIST_STD = (0.3530,)
FMNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.short = (
            nn.Identity() if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.short(x))


class SmallResNet(nn.Module):
    """ResNet-style net for 1×28×28: stem + max-pool (14²), stages at 14² and 7², GAP + linear.

    CAM resolution 7×7; about 0.3M parameters.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.stage1 = nn.Sequential(_BasicBlock(w, w, 1), _BasicBlock(w, w, 1))
        self.stage2 = nn.Sequential(_BasicBlock(w, 2 * w, 2), _BasicBlock(2 * w, 2 * w, 1))
        self.fc = nn.Linear(2 * w, num_classes)

    def cam_features(self, x: torch.Tensor) -> torch.Tensor:  # (B, 2w, 7, 7)
        return self.stage2(self.stage1(self.stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.cam_features(x).mean((2, 3)))


class _DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, 2 * growth, 1, bias=False),
            nn.BatchNorm2d(2 * growth), nn.ReLU(), nn.Conv2d(2 * growth, growth, 3, 1, 1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.body(x)], 1)


class SmallDenseNet(nn.Module):
    """DenseNet-style net for 1×28×28: dense blocks at 14² and 7² with a transition, GAP + linear.

    CAM resolution 7×7; about 0.15M parameters.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, growth: int = 16, layers: int = 4) -> None:
        super().__init__()
        c = 2 * growth
        mods: list[nn.Module] = [nn.Conv2d(in_channels, c, 3, 1, 1, bias=False), nn.MaxPool2d(2)]
        for block in range(2):
            for _ in range(layers):
                mods.append(_DenseLayer(c, growth))
                c += growth
            if block == 0:  # transition: halve channels and resolution
                mods += [nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False), nn.AvgPool2d(2)]
                c //= 2
        mods += [nn.BatchNorm2d(c), nn.ReLU()]
        self.features = nn.Sequential(*mods)
        self.fc = nn.Linear(c, num_classes)

    def cam_features(self, x: torch.Tensor) -> torch.Tensor:  # (B, c, 7, 7)
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.cam_features(x).mean((2, 3)))
