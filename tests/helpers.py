"""Entry points for CLI tests (``module:function`` deployments)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from underfire.guard.models import FMNIST_MEAN, FMNIST_STD, ImageClassifier

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def cli(*args, cwd, env_extra: dict | None = None, process: bool = False, **kw):
    """``underfire ARGS`` as a user runs it, output captured: in this process (click's runner, one thread, no torch
    import to pay) unless ``process`` (a real subprocess, where the process itself is the point)."""
    if not process:
        return cli_here(*args, env=env_extra, cwd=cwd)
    return subprocess.run([sys.executable, "-m", "underfire.audit.cli", *map(str, args)], cwd=cwd, env={**ENV, **(env_extra or {})},
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
    from underfire.guard.models import load_model

    m = load_model("fmnist_resnet")
    m.net = nn.Sequential(m.net, nn.Softmax(dim=1))
    return m


def untrained_model() -> ImageClassifier:
    """A 28×28 ResNet with random weights (an untrained deployment)."""
    from underfire.guard.nets import SmallResNet

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
    from underfire.guard.models import load_model

    m = load_model("fmnist_resnet")
    m.net = _Quantised(m.net)
    return m


def raising_model() -> ImageClassifier:
    """An entry point that fails the way user code does."""
    raise RuntimeError("cannot open /models/prod.ckpt")


# -- a team's maps, for the fail-closed tests --------------------------------------------------------------------
def _cam_of(m):
    from underfire.guard.registry import build_interpreter

    return build_interpreter("cam", m)


def honest_map_model():
    """The bundled ResNet with a team's own map: CAM computed in plain torch (its gradient is its derivative)."""
    from underfire.guard.models import load_model

    m = load_model("fmnist_resnet")
    cam = _cam_of(m)
    return m, {"ours": lambda x, t: cam(x, t).saliency}


def detached_map_model():
    """A team's map detached from its input plus a tiny term in x: its gradient is not zero (pre-flight's first
    check passes) but says nothing about how the map changes."""
    from underfire.guard.models import load_model

    m = load_model("fmnist_resnet")
    cam = _cam_of(m)
    return m, {"ours": lambda x, t: cam(x.detach(), t).saliency.detach() + 1e-4 * x.mean((1, 2, 3)).view(-1, 1, 1, 1)}


def raising_map_model():
    """A team's map that raises on its first call."""
    from underfire.guard.models import load_model

    def broken(x, t):
        raise RuntimeError("explanation service unavailable")
    return load_model("fmnist_resnet"), {"ours": broken}


def later_raising_map_model():
    """A team's map that works for its first calls (pre-flight passes) and then raises mid-attack."""
    from underfire.guard.models import load_model

    m = load_model("fmnist_resnet")
    cam, calls = _cam_of(m), [0]

    def flaky(x, t):
        calls[0] += 1
        if calls[0] > 40:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return cam(x, t).saliency
    return m, {"ours": flaky}


def empty_map_model():
    """A team's map that returns an empty tensor."""
    from underfire.guard.models import load_model

    return load_model("fmnist_resnet"), {"ours": lambda x, t: torch.zeros(len(x), 1, 0, 0)}


class Ran:
    """What a CLI run left: exit status and its two streams (the shape of subprocess.CompletedProcess)."""

    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def cli_here(*args, env: dict | None = None, cwd: Path | None = None) -> Ran:
    """``underfire ARGS`` in this process (click's runner: no torch import to pay); an exception that is not an
    exit is re-raised, so a test sees an internal error as one. ``cwd``: the working folder meanwhile."""
    from click.testing import CliRunner

    from underfire.audit.cli import main

    old, threads = Path.cwd(), torch.get_num_threads()
    try:
        if cwd is not None:
            os.chdir(cwd)
        torch.set_num_threads(1)  # as the subprocesses run (OMP_NUM_THREADS=1): the same records either way
        r = CliRunner().invoke(main, [str(a) for a in args], env=env, catch_exceptions=True)
    finally:
        os.chdir(old)
        torch.set_num_threads(threads)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return Ran(r.exit_code, r.stdout, r.stderr)
