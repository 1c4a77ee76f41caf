"""Fail closed, part two: what an audit did not attack never passes a gate, inputs are read as they are, the
journal is tamper-evident, and every failure is one 'Error:' line. In process (click's runner) where the process
itself is not the point."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import cli_here, one_error

SMALL = ("--model", "fmnist_resnet", "--n", "2", "--interpreters", "cam", "--attacks", "pgd,adv2", "--defenses", "",
         "--shorten", "50")


def _report(run):
    return json.loads((run / "report.json").read_text())


# -- a gate never passes on what the audit did not measure ----------------------------------------------------
def test_an_interpreter_listed_but_not_attacked_passes_no_gate(tmp_path):
    (tmp_path / "c.toml").write_text(
        '[[targets]]\nmodel = "fmnist_resnet"\nn = 2\ninterpreters = ["cam", "grad"]\nadv2_interpreters = ["cam"]\n'
        'attacks = ["pgd", "adv2"]\ndefenses = []\nshorten = 50\n')
    r = cli_here("audit", "--config", tmp_path / "c.toml", "--fail-above", "1", "--out", tmp_path / "runs")
    assert r.returncode == 4, r.stderr[-2000:]
    assert "NOT MEASURED" in r.stderr and "grad" in r.stderr and "did not attack" in r.stderr
    assert "NOT MEASURED" in r.stdout  # the terminal summary says it too
    rep = _report(tmp_path / "runs" / "default")
    (tg,) = rep["targets"].values()
    assert "not among adv2_interpreters" in tg["summary"]["interpreters"]["grad"]["not_attacked"]
    assert rep["headline"]["not_attacked"] and "not attacked" in (tmp_path / "runs" / "default" / "report.html").read_text()


def test_a_map_whose_gradient_is_not_its_derivative_is_a_lower_bound(tmp_path):
    """A detached map plus a tiny term in x has a non-zero gradient; the directional-derivative check finds that
    it does not predict the map, so the row is a lower bound and a gate cannot pass on it. The honest version of
    the same map (CAM in plain torch) passes the check."""
    from underfire.audit.checks import gradient_agreement
    from underfire.guard.interpreters.base import FunctionInterpreter
    from tests.helpers import detached_map_model, honest_map_model
    from underfire.training.data import fashion_mnist

    x, y = fashion_mnist("test").tensors
    for build, faithful in ((honest_map_model, True), (detached_map_model, False)):
        m, maps = build()
        ag = gradient_agreement(FunctionInterpreter(m, maps["ours"], "ours"), x[:2], y[:2])
        assert (ag["cosine"] > 0.8) is faithful, ag
    r = cli_here("audit", *SMALL, "--model", "tests.helpers:detached_map_model", "--interpreters", "ours",
                 "--fail-above", "1", "--out", tmp_path)
    assert r.returncode == 4, r.stderr[-2000:]
    assert "UNFAITHFUL GRADIENT" in r.stdout + r.stderr and "LOWER BOUND" in r.stderr
    (tg,) = _report(tmp_path / "default")["targets"].values()
    assert "finite differences" in tg["summary"]["interpreters"]["ours"]["lower_bound"]


def test_random_weights_pass_no_gate_even_when_the_attacks_work(tmp_path):
    """PGD and ADV² do work on a random MobileNetV3 (the run is conclusive), yet it audits no deployment."""
    r = cli_here("audit", "--model", "torchvision:mobilenet_v3_small", "--weights", "random", "--data", "photos",
                 "--n", "2", "--interpreters", "gradcam", "--attacks", "pgd,adv2", "--defenses", "", "--shorten", "40",
                 "--fail-above", "1", "--out", tmp_path)
    assert r.returncode == 4, r.stderr[-2000:]
    assert "an audit of untrained weights passes no gate" in r.stderr and "INCONCLUSIVE: this run" not in r.stderr
    assert _report(tmp_path / "default")["headline"]["status"] == "measured"


def test_random_weights_are_named_in_the_headline():
    from underfire.audit.metrics import rate
    from underfire.audit.aggregate import headline

    def tg(weights):
        return {"target": {"weights": weights}, "status": {"reasons": []},
                "summary": {"interpreters": {"cam": {"spoofability": rate(0, 8)}}}}
    assert headline({"a": tg("random")})["untrained"] == "a"
    assert headline({"a": tg(None)})["untrained"] is None


# -- folders are read as the user laid them out ------------------------------------------------------------------
def _pngs(folder, k=3):
    from underfire.training.data import fashion_mnist

    folder.mkdir(parents=True, exist_ok=True)
    x = fashion_mnist("test").tensors[0][:k]
    for i, im in enumerate(x):
        Image.fromarray((im[0].numpy() * 255).round().astype(np.uint8)).save(folder / f"im{i}.png")
    return x


def test_plain_folder_hidden_entries_and_mixes(tmp_path):
    from underfire.training.data import DataError, folder_kind, load_images

    _pngs(tmp_path / "f")
    (tmp_path / "f" / ".thumbnails").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "f" / ".thumbnails" / "im0.png")
    Image.new("L", (8, 8)).save(tmp_path / "f" / "._im0.png")
    assert folder_kind(tmp_path / "f") == "plain"
    assert len(load_images([tmp_path / "f"], size=28, channels=1)[0]) == 3  # hidden files are not images
    (tmp_path / "f" / "cats").mkdir()
    with pytest.raises(DataError, match=r"holds both images \(im0.png.*and subfolders \(cats/"):
        folder_kind(tmp_path / "f")
    (tmp_path / "f" / "cats").rmdir()
    (tmp_path / "f" / "link").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(DataError, match="link/ \\(a link\\)"):
        folder_kind(tmp_path / "f")
    (tmp_path / "f" / "link").unlink()
    (tmp_path / "f" / "odd.jpg").mkdir()
    with pytest.raises(DataError, match="odd.jpg is a folder named like an image"):
        folder_kind(tmp_path / "f")


def test_a_mixed_folder_is_refused_by_the_audit(tmp_path):
    _pngs(tmp_path / "f")
    (tmp_path / "f" / "sub").mkdir()
    r = cli_here("audit", *SMALL, "--data", tmp_path / "f", "--out", tmp_path / "runs")
    one_error(r, "holds both images")


@pytest.mark.parametrize("mode", ["I;16", "RGB16", "P", "CMYK", "RGBA", "LA"])
def test_wide_and_odd_image_modes_read_as_their_8bit_originals(tmp_path, mode):
    """16-bit grey and RGB, palette, CMYK and images with an (opaque) alpha channel read as the 8-bit image they
    were made from; Pillow's own convert would turn every 16-bit value above 255 white."""
    from tests.test_fail_closed_two import _write_png16_rgb
    from underfire.training.data import fashion_mnist, load_image

    g = (fashion_mnist("test").tensors[0][0, 0].numpy() * 255).round().astype(np.uint8)  # an ankle boot
    rgb = np.stack([g, 255 - g, g // 2], -1)
    path = tmp_path / ("x.tif" if mode == "CMYK" else "x.png")
    if mode == "I;16":
        Image.fromarray(g.astype(np.uint16) * 257).save(path)
    elif mode == "RGB16":
        _write_png16_rgb(rgb.astype(np.uint16) * 257, path)
    elif mode == "P":
        Image.fromarray(g).convert("P").save(path)
    elif mode == "CMYK":
        Image.fromarray(rgb).convert("CMYK").save(path)
    elif mode == "RGBA":
        Image.fromarray(rgb).convert("RGBA").save(path)
    else:
        Image.fromarray(g).convert("LA").save(path)
    grey = mode in ("I;16", "P", "LA")
    want = torch.from_numpy(g if grey else rgb).float() / 255
    want = want[None] if grey else want.permute(2, 0, 1)
    got = load_image(path, size=None, channels=1 if grey else 3)
    torch.testing.assert_close(got, want, atol=1.5 / 255, rtol=0)


def _write_png16_rgb(arr: np.ndarray, path) -> None:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one)."""
    import struct
    import zlib

    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[i].astype(">u2").tobytes() for i in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_float_images_are_refused(tmp_path):
    from underfire.training.data import DataError, load_image

    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(DataError, match="32-bit float samples"):
        load_image(tmp_path / "f.tif", channels=1)


def test_decompression_bombs_are_one_error_everywhere(tmp_path, monkeypatch):
    """An image over Pillow's limit (lowered here, so the test stays small) is one Error naming the file and its
    size, from audit, predict, explain and detect alike."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200)
    _pngs(tmp_path / "f", 3)  # 28×28 = 784 pixels: over 2 × 200
    bomb = tmp_path / "f" / "im0.png"
    for args in (("audit", *SMALL, "--data", tmp_path / "f", "--out", tmp_path / "runs"),
                 ("predict", "--model", "fmnist_resnet", bomb), ("explain", "--model", "fmnist_resnet", bomb),
                 ("detect", "--model", "fmnist_resnet", "--calibrate", "20", "--thresholds", tmp_path / "t.pt", bomb)):
        line = one_error(cli_here(*args), "784 pixels, over Pillow's decompression-bomb limit")
        assert "im0.png" in line


# -- a team's map that fails --------------------------------------------------------------------------------------
@pytest.mark.parametrize("entry, needle", [
    ("raising_map_model", "interpreter 'ours' raised RuntimeError: explanation service unavailable"),
    ("empty_map_model", "interpreter 'ours' returned an empty map"),
    ("later_raising_map_model", "interpreter 'ours' raised RuntimeError: CUDA error"),
])
def test_a_failing_team_map_is_one_error(entry, needle, tmp_path):
    r = cli_here("audit", *SMALL, "--model", f"tests.helpers:{entry}", "--interpreters", "ours",
                 "--out", tmp_path / "runs")
    one_error(r, needle)


# -- settings checked before anything loads ----------------------------------------------------------------------
@pytest.mark.parametrize("args, needle", [
    (("--interpreters", "cam,foo"), "unknown interpreter 'foo'"),
    (("--interpreters", "opaque:cam@nope"), "in 'opaque:cam@nope', the surrogate 'nope' is not a known interpreter"),
    (("--interpreters", "opaque:nope@cam"), "the served interpreter 'nope'"),
    (("--seed", str(2 ** 40)), "seed must be an integer in [0, 2**31)"),
])
def test_bad_settings_are_named_before_loading(args, needle, tmp_path):
    r = cli_here("audit", *SMALL, *args, "--out", tmp_path / "runs")
    one_error(r, needle)
    assert "loading model" not in r.stderr and not (tmp_path / "runs").exists()


def test_labels_map_to_unique_contained_journal_folders():
    from underfire.audit.config import AuditConfig, AuditError, journal_folder

    assert journal_folder("..") not in ("..", ".") and "/" not in journal_folder("a/../b")
    assert not journal_folder(".hidden").startswith(".")
    cfg = AuditConfig.from_dict({"targets": [{"label": "a/b", "n": 2}, {"label": "a_b", "n": 2}]})
    with pytest.raises(AuditError, match="would share the journal folder 'a_b'"):
        cfg.validate()


def test_distributed_variables_without_a_process_group_are_refused(tmp_path):
    """A stray RANK (a cluster's environment) must not make a process act as a worker of a job that does not
    exist: unlocked, in a folder it did not set up."""
    run = tmp_path / "runs" / "default"
    run.mkdir(parents=True)
    (run / "report.json").write_text("{}")
    for env, needle in (({"RANK": "1"}, "lacks WORLD_SIZE, MASTER_ADDR, MASTER_PORT"),
                        ({"RANK": "3", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"},
                         "RANK 3 is not below WORLD_SIZE 2")):
        one_error(cli_here("audit", *SMALL, "--name", "default", "--out", tmp_path / "runs", env=env), needle)
    assert (run / "report.json").read_text() == "{}"


# -- detect refuses files it cannot read ---------------------------------------------------------------------
def test_detect_refuses_unreadable_tensor_files(tmp_path):
    th = tmp_path / "sq.pt"
    assert cli_here("detect", "--calibrate", "20", "--thresholds", th).returncode == 0
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "noise.pt").write_bytes(np.random.default_rng(0).bytes(512))
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    torch.save({"images": torch.rand(1, 1, 28, 28)}, tmp_path / "nokey.pt")
    with open(tmp_path / "pickled.pt", "wb") as f:
        pickle.dump({"x_adv": [1, 2]}, f)
    for name, needle in (("empty.pt", "is an empty file"), ("noise.pt", "corrupt or not a torch file"),
                         ("module.pt", "holds a whole pickled Python object"),
                         ("nokey.pt", "a dict without the key 'x_adv' (its keys: images)"),
                         ("pickled.pt", "corrupt or not a torch file")):
        line = one_error(cli_here("detect", "--thresholds", th, tmp_path / name), needle)
        assert name in line


def test_a_pickled_module_as_model_says_what_it_is(tmp_path):
    torch.save(torch.nn.Linear(2, 2), tmp_path / "whole.pt")
    one_error(cli_here("audit", *SMALL, "--model", tmp_path / "whole.pt", "--out", tmp_path / "runs"),
              "torch.save(model.state_dict(), path)")


# -- the journal: fingerprinted data, digests, damage -------------------------------------------------------
def test_journal_digest_redoes_an_edited_batch_and_refuses_an_unchecked_one(tmp_path):
    from underfire.audit.config import AuditError
    from underfire.audit.journal import Journal

    fp = {"model": "m", "data": "d", "calibration": "c", "config": {}}
    j = Journal(tmp_path, "t", fp)
    j.save(0, {"index": [0, 1], "l1": [0.5, 0.25]})
    assert j.load(0, [0, 1]) == {"index": [0, 1], "l1": [0.5, 0.25]}
    for edit in (lambda r: r["l1"].__setitem__(0, 0.1), lambda r: r.pop("l1"), lambda r: r["l1"].append(0.3)):
        j.save(0, {"index": [0, 1], "l1": [0.5, 0.25]})
        rec = json.loads(j.path(0).read_text())
        edit(rec)
        j.path(0).write_text(json.dumps(rec))
        assert j.load(0, [0, 1]) is None
    assert j.redone == [0]
    rec.pop("digest")
    j.path(0).write_text(json.dumps(rec))
    with pytest.raises(AuditError, match="carries no digest"):
        j.load(0, [0, 1])


def test_resume_redoes_edited_batches_and_refuses_changed_or_damaged_journals(tmp_path):
    """A plain folder, journaled per input: an edited number is redone (and the report says so); a changed
    calibration image and a garbage batch_size file are each refused with one line."""
    _pngs(tmp_path / "f", 6)
    base = ("audit", *SMALL, "--data", tmp_path / "f", "--batch-size", "1", "--out", tmp_path / "runs",
            "--name", "r")
    assert cli_here(*base).returncode == 0
    run = tmp_path / "runs" / "r"
    batch = next((run / "journal").glob("*/batch_00000.json"))
    before = _report(run)["headline"]
    rec = json.loads(batch.read_text())
    rec["interpreters"]["cam"]["adv2"]["l1"][0] = 99.0
    batch.write_text(json.dumps(rec))
    (run / "report.json").unlink()
    r = cli_here(*base, "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    after = _report(run)
    assert after["headline"]["spoofability"] == before["spoofability"]
    assert any("batches 1 no longer matched their digests" in w for w in next(iter(after["targets"].values()))["warnings"])
    # a calibration image (not audited: the first 2 are) changed since the run began
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "f" / "im5.png")
    one_error(cli_here(*base, "--resume"), "calibration / held-out images")
    _pngs(tmp_path / "f", 6)
    (batch.parent / "batch_size").write_text("ten")
    one_error(cli_here(*base, "--resume"), "should hold the run's batch size")


# -- one error root ---------------------------------------------------------------------------------------------
def test_every_library_error_is_an_underfire_error_and_a_bug_is_not_bad_input(tmp_path, monkeypatch):
    """Errors raised on purpose share one root and print as one 'Error:' line; any other exception inside a
    command (here a bare ValueError from deep in the run) is an internal error, exit 70, never 'bad input'."""
    import underfire.audit.config as config
    import underfire.audit.api as api
    from underfire.attacks.threats import AttackError
    from underfire.audit.report import ReportError
    from underfire.guard.calibration import DetectorError
    from underfire.guard.errors import UnderfireError
    from underfire.guard.interpreters.base import InterpreterError
    from underfire.guard.errors import ModelError
    from underfire.training.data import DataError
    from underfire.training.loop import LaunchError

    for cls in (AttackError, ReportError, DetectorError, InterpreterError, ModelError, DataError, LaunchError,
                config.AuditError, config.AuditRefused):
        assert issubclass(cls, UnderfireError), cls
    assert config.AuditRefused.exit_code == 4

    def broken(*a, **k):
        raise ValueError("shapes do not line up")
    monkeypatch.setattr(api, "run_audit", broken)
    r = cli_here("audit", *SMALL, "--out", tmp_path / "runs")
    assert r.returncode == 70 and "Internal error: ValueError: shapes do not line up" in r.stderr
    assert not [ln for ln in r.stderr.splitlines() if ln.startswith("Error:")] and "Traceback" not in r.stderr
