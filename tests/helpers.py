"""Entry points for CLI tests (``module:function`` deployments)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from guard.models import FMNIST_MEAN, FMNIST_STD, ImageClassifier

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def cli(*args, cwd, env_extra: dict | None = None, **kw) -> subprocess.CompletedProcess:
    """``underfire ARGS`` as a user runs it: a subprocess, output captured."""
    return subprocess.run([sys.executable, "-m", "audit.cli", *map(str, args)], cwd=cwd, env={**ENV, **(env_extra or {})},
                          capture_output=True, text=True, timeout=600, **kw)


def one_error(r: subprocess.CompletedProcess, needle: str, code: int = 1) -> str:
    """The run ended with status ``code`` and exactly one 'Error:' line containing ``needle``, no traceback."""
    assert r.returncode == code, (r.returncode, r.stderr[-2000:])
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and needle in errors[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    return errors[0]


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


def probs_model() -> ImageClassifier:
    """The bundled Fashion-MNIST ResNet with a softmax on its outputs (a deployment returning probabilities)."""
    from guard.models import load_model

    m = load_model("fmnist_resnet")
    m.net = nn.Sequential(m.net, nn.Softmax(dim=1))
    return m


def untrained_model() -> ImageClassifier:
    """A 28×28 ResNet with random weights (an untrained deployment)."""
    from guard.models import SmallResNet

    torch.manual_seed(0)
    return ImageClassifier(SmallResNet(), FMNIST_MEAN, FMNIST_STD, name="untrained", input_size=(1, 28, 28),
                           categories=[str(i) for i in range(10)])


class _Quantised(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(torch.round(x * 8) / 8)  # rounding: zero gradient w.r.t. the input everywhere


def masked_model() -> ImageClassifier:
    """The bundled Fashion-MNIST ResNet behind input quantisation: accurate, but with no input gradient."""
    from guard.models import load_model

    m = load_model("fmnist_resnet")
    m.net = _Quantised(m.net)
    return m


def raising_model() -> ImageClassifier:
    """An entry point that fails the way user code does."""
    raise RuntimeError("cannot open /models/prod.ckpt")
