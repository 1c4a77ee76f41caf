"""underfire as a package: the wheel carries the code, the bundled checkpoints and photos, and its
``underfire`` command works from a fresh virtual environment outside the repository."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

from tests.helpers import ROOT


def _run(*args, **kw):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=600, **kw)


# what a user's notebook imports, from a folder whose own packages have our folders' names
IMPORTS = ("from underfire.audit import audit; from underfire.training import fashion_mnist; "
           "import underfire.guard, underfire.attacks; print(underfire.guard.__file__)")
# a notebook's audit of objects in memory: a bare nn.Module, its own map as a callable, (x, y) tensors
NOTEBOOK = """
import torch
from underfire.audit import audit
from underfire.guard import load_model
from underfire.training import fashion_mnist

net = load_model("fmnist_resnet").net
x, y = fashion_mnist("test").tensors

def my_map(x, target):
    f = net.cam_features((x - 0.286) / 0.353)
    return torch.einsum("bkhw,bk->bhw", f, net.fc.weight[target]).relu()

report = audit(net, {"my_map": my_map}, (x[:100], y[:100]), mean=(0.286,), std=(0.353,), n=2, eps=24,
               shorten=25, defenses=[], calibration_n=16, bootstrap=20, examples=0)
print(report.headline)
"""


def _shadowing_project(folder: Path) -> Path:
    """An ordinary ML repository: its own training/, audit/, guard/ and attacks/ packages."""
    for pkg in ("training", "audit", "guard", "attacks"):
        (folder / pkg).mkdir(parents=True)
        (folder / pkg / "__init__.py").write_text("raise ImportError('the user\\'s own package was imported')\n")
        (folder / pkg / "data.py").write_text("")
    return folder


def test_a_users_own_packages_do_not_shadow_the_editable_install(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = _run(sys.executable, "-c", IMPORTS, cwd=_shadowing_project(tmp_path), env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert str(ROOT) in r.stdout


def test_the_wheel_installs_and_runs_outside_the_repository(tmp_path):
    r = _run(sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q", "-w",
             tmp_path / "dist", cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("underfire-*.whl")
    venv = tmp_path / "venv"
    assert _run(sys.executable, "-m", "venv", venv).returncode == 0
    py = venv / "bin" / "python"
    # the heavy dependencies (torch, ...) come from this environment's site-packages, added as a plain path: its
    # .pth files (the editable install of this checkout) are not processed, so `underfire` can only come from
    # the wheel
    site = _run(py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    r = _run(py, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel)
    assert r.returncode == 0, r.stderr[-2000:]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["OMP_NUM_THREADS"] = "1"
    outside = _shadowing_project(tmp_path / "elsewhere")
    where = _run(py, "-c", IMPORTS, cwd=outside, env=env)
    assert where.returncode == 0, where.stderr[-2000:]
    assert str(venv) in where.stdout and str(ROOT) not in where.stdout  # the installed copy, not the checkout
    nb = _run(py, "-c", NOTEBOOK, cwd=outside, env=env)
    assert nb.returncode == 0, nb.stderr[-2000:]
    assert "spoofability" in nb.stdout and "/ my_map" in nb.stdout, nb.stdout
    exe = venv / "bin" / "underfire"
    r = _run(exe, "--help", cwd=outside, env=env)
    assert r.returncode == 0 and "audit" in r.stdout, r.stderr[-2000:]
    # the bundled Fashion-MNIST checkpoint and photos come from the wheel's package data
    r = _run(exe, "predict", "--model", "fmnist_resnet", cwd=outside, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    r = _run(exe, "predict", cwd=outside, env=env)  # MobileNetV2 on the bundled photos
    assert r.returncode == 0 and "chelsea" in r.stdout, r.stderr[-2000:] + r.stdout[-2000:]
