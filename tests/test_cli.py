"""The command line as a user runs it: exit codes, output, one clear error line. In process (click's runner:
the same entry point, no torch import per call); the real process is tested where it is the point (kill and
resume, torchrun, the installed wheel's command: test_audit.py, test_package.py)."""

from __future__ import annotations

import pytest

from tests.helpers import cli_here


def run(*args, cwd=None):
    return cli_here(*args, cwd=cwd)


def test_predict_bundled_photos():
    r = run("predict")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    block = out.split("chelsea:")[1].split(":")[0]
    assert "Egyptian cat" in block and "tabby" in block and "tiger cat" in block
    assert out.split("coffee:")[1].splitlines()[1].strip().endswith("espresso")
    assert out.count("%") == 5 * 16


def test_predict_json_record_for_the_docs():
    """`predict --json` is the record the docs' prediction table is generated from: machine, date, top-k."""
    import json

    r = run("predict", "--model", "fmnist_resnet", "--json", "-k", "2")
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["kind"] == "predictions" and rec["model"] == "fmnist_resnet" and rec["environment"]["date"]
    assert len(rec["images"]) == 8 and all(len(im["top"]) == 2 for im in rec["images"])
    for im in rec["images"]:  # the label in the name is the true class; the ResNet gets most right
        assert im["top"][0][1] >= im["top"][1][1]
    assert sum(im["name"].endswith(f"({im['top'][0][0]})") for im in rec["images"]) >= 6


@pytest.mark.parametrize(
    "args, msg",
    [
        (["predict", "--model", "nope"], "unknown model 'nope'"),
        (["predict", "--model", "resnet50"], "not in torch's cache"),
        (["predict", "{junk}"], "cannot decode image"),
        (["predict", "{empty}"], "holds no image files"),
        (["predict", "--model", "{corrupt}"], "corrupt"),
        (["explain", "--model", "torchvision:mobilenet_v3_small", "--interpreters", "cam"], "no interpreter could"),
    ],
)
def test_bad_input_one_clear_error(args, msg, tmp_path):
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"nope")
    (tmp_path / "empty").mkdir()
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00\x01")
    args = [a.format(junk=junk, empty=tmp_path / "empty", corrupt=corrupt) for a in args]
    r = run(*args, cwd=tmp_path)
    assert r.returncode == 1, (r.stdout, r.stderr)
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and msg in errors[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "runs").exists()


def test_explain_fmnist_writes_png(tmp_path):
    r = run("explain", "--model", "fmnist_resnet", "-n", "3", "--mask-steps", "30", "--out", tmp_path / "x")
    assert r.returncode == 0, r.stderr
    png = tmp_path / "x" / "fmnist_resnet.png"
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
    assert not list((tmp_path / "x").glob("*.tmp*"))


def test_detect_calibrates_then_scores_files(tmp_path):
    """`underfire detect`: calibrate on real benign images, save, reload for another call, score a .pt batch."""
    import torch

    from underfire.training.data import fashion_mnist

    th = tmp_path / "sq.pt"
    r = run("detect", "--calibrate", "60", "--thresholds", th, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert th.is_file() and "held-out FPR" in r.stdout
    x = fashion_mnist("test").tensors[0][:3]
    noisy = (x + 0.3 * torch.randn_like(x)).clamp(0, 1)  # heavy noise: squeezing moves the prediction
    torch.save({"x_adv": torch.cat([x, noisy])}, tmp_path / "batch.pt")
    r = run("detect", "--thresholds", th, tmp_path / "batch.pt", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("batch.pt[")]
    assert len(lines) == 6 and "flagged" in r.stdout
    r = run("detect", "--model", "fmnist_densenet", "--thresholds", th, cwd=tmp_path)
    assert r.returncode == 1 and "calibrated for model 'fmnist_resnet'" in r.stderr


@pytest.mark.slow  # 35–100 s on 2 cores; RTS^A training itself is covered by tests/test_rts_adv.py
def test_train_rts_adversarial_with_area_match(tmp_path):
    """`train rts --adversarial --own-encoder --area-match`: a checkpoint with its encoder and calibrated balance
    that the `rtsa` interpreter loads, and the quality line."""
    out = tmp_path / "rtsa.pt"
    r = run("train", "rts", "--adversarial", "--own-encoder", "--model", "fmnist_resnet", "--limit", "32",
            "--epochs", "1", "--batch-size", "16", "--area-match", "0.9", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "mean mask area" in r.stdout
    import torch

    ck = torch.load(out, weights_only=False)
    assert ck["adversarial"] and "encoder_state_dict" in ck and ck["config"]["area_match"] == 0.9
    cal = ck["metrics"]["area_calibration"]
    assert cal["images"] == 32 and ck["balance"] == pytest.approx(cal["balance"], rel=1e-3)
    assert cal["area_target"] == pytest.approx(0.9 * cal["area_start"], rel=1e-3)


def test_the_readme_python_examples_run(tmp_path):
    """The README's Python examples are code that works, not prose: run them as written, in a folder of their
    own (the first writes audit.html)."""
    import re
    import subprocess
    import sys

    from tests.helpers import ENV, ROOT

    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(blocks) >= 2
    for code in blocks:
        r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        if "audit(" in code:  # the notebook audit: a measured headline, a page, a gate's exit status
            assert re.search(r"spoofability \d+% \(95% CI \d+%–\d+%, \d+/4\) at .*/ my_map", r.stdout), r.stdout
            assert re.search(r"gate: [034]", r.stdout) and (tmp_path / "audit.html").stat().st_size > 10_000
        else:
            (success,) = re.findall(r"tensor\(([\d.]+)\)", r.stdout)
            assert 0 <= float(success) <= 1
