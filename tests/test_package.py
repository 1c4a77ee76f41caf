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
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    where = _run(py, "-c", "import guard; print(guard.__file__)", cwd=outside, env=env).stdout
    assert str(venv) in where and str(ROOT) not in where  # the installed copy, not the checkout
    exe = venv / "bin" / "underfire"
    r = _run(exe, "--help", cwd=outside, env=env)
    assert r.returncode == 0 and "audit" in r.stdout, r.stderr[-2000:]
    # the bundled Fashion-MNIST checkpoint and photos come from the wheel's package data
    r = _run(exe, "predict", "--model", "fmnist_resnet", cwd=outside, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    r = _run(exe, "predict", cwd=outside, env=env)  # MobileNetV2 on the bundled photos
    assert r.returncode == 0 and "chelsea" in r.stdout, r.stderr[-2000:] + r.stdout[-2000:]
