"""Training and evaluating the small Fashion-MNIST classifiers (the 28×28 CAM-compatible nets)."""

from __future__ import annotations

import platform
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from underfire.guard.models import FMNIST_CLASSES, SMALL_ARCHS, ImageClassifier

from underfire.guard.weights import Checkpoint
from underfire.training.data import fashion_mnist
from underfire.training.loop import TrainConfig, run
from underfire.guard.errors import ModelError


@dataclass
class ClassifierConfig(TrainConfig):
    arch: str = "small_resnet"
    pad: int = 2  # random-crop padding (pixels); plus horizontal flips


def augment(x: torch.Tensor, pad: int, gen: torch.Generator | None = None) -> torch.Tensor:
    """Random translation by up to ``pad`` pixels and random horizontal flip, batched. x: (B, C, H, W)."""
    b, _, h, w = x.shape
    if pad > 0:
        xp = F.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
        dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
        rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(b, x.shape[1], h, w + 2 * pad)
        xp = xp.gather(2, rows.to(x.device))
        cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(b, x.shape[1], h, w)
        x = xp.gather(3, cols.to(x.device))
    flip = torch.rand(b, generator=gen) < 0.5
    return torch.where(flip.view(b, 1, 1, 1).to(x.device), x.flip(3), x)


@torch.no_grad()
def accuracy(model: torch.nn.Module, ds: Dataset, batch_size: int = 500) -> float:
    """Top-1 accuracy of ``model`` (images in [0, 1]) on a TensorDataset."""
    if not isinstance(ds, TensorDataset):
        raise TypeError("accuracy() expects a TensorDataset")
    x, y = ds.tensors
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    correct = sum(int((model(x[i:i + batch_size].to(dev)).argmax(1).cpu() == y[i:i + batch_size]).sum())
                  for i in range(0, len(x), batch_size))
    model.train(was)
    return correct / len(x)


def train_classifier(cfg: ClassifierConfig, device: str = "cpu",
                     progress: Callable[[dict], None] | None = None) -> tuple[ImageClassifier, Checkpoint]:
    """Train a small net on the real Fashion-MNIST training set; evaluate on the 10k test set."""
    if cfg.arch not in SMALL_ARCHS:
        raise ModelError(f"unknown arch {cfg.arch!r}; choose from {sorted(SMALL_ARCHS)}")
    torch.manual_seed(cfg.seed)
    net = SMALL_ARCHS[cfg.arch]()
    from underfire.guard.models import FMNIST_MEAN, FMNIST_STD

    model = ImageClassifier(net, FMNIST_MEAN, FMNIST_STD, name=f"fmnist_{cfg.arch}", input_size=(1, 28, 28),
                            categories=FMNIST_CLASSES)
    model.train()
    train_set = fashion_mnist("train")
    gen = torch.Generator().manual_seed(cfg.seed + 1)

    def step(m: torch.nn.Module, batch: tuple) -> tuple[torch.Tensor, dict]:
        x, y = batch
        logits = m(augment(x, cfg.pad, gen))
        return F.cross_entropy(logits, y), {}

    stats = run(model, model.parameters(), step, train_set, cfg, device=device, progress=progress)
    model.eval()
    acc = accuracy(model, fashion_mnist("test"))
    ck = Checkpoint(
        arch=cfg.arch, state_dict={k: v.detach().cpu() for k, v in net.state_dict().items()},
        config=cfg.to_dict(),
        metrics={"test_top1": acc, "train_seconds": round(stats["seconds"], 1), "steps": stats["steps"],
                 "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
                 "torch": str(torch.__version__)},
    )
    return model, ck
