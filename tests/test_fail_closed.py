"""Fail closed: a deployment the audit cannot measure is refused (exit 4) or marked INCONCLUSIVE (exit 4),
never passed; bad settings end in one 'Error:' line (exit 1) before anything is loaded; rates carry exact
intervals; τ measures map noise only. Through the CLI as subprocesses, as a user (or a CI gate) runs it."""

from __future__ import annotations

import json
import math

import pytest
import torch

from underfire.audit.metrics import rate
from tests.helpers import cli, one_error

SMALL = ("--model", "fmnist_resnet", "--n", "2", "--interpreters", "cam", "--attacks", "pgd,adv2", "--defenses", "", "--shorten", "50")


def _nothing_written(out):
    assert not out.exists() or not any(out.rglob("*")), sorted(map(str, out.rglob("*")))


@pytest.mark.parametrize("args, needle", [
    (["--model", "torchvision:mobilenet_v2", "--data", "photos"], "without weights is an untrained network"),
    (["--model", "tests.helpers:untrained_model"], "is at chance on fashion-mnist"),
    (["--model", "tests.helpers:probs_model"], "returns probabilities"),
    (["--model", "tests.helpers:masked_model", "--interpreters", "grad"], "logits have no gradient"),
])
def test_unmeasurable_deployments_are_refused(args, needle, tmp_path):
    out = tmp_path / "runs"
    r = cli("audit", *SMALL, *args, "--fail-above", "1", "--out", out, cwd=tmp_path)
    one_error(r, needle, code=4)
    _nothing_written(out)


def test_declared_probabilities_are_audited_as_log_probabilities(tmp_path):
    r = cli("audit", *SMALL, "--model", "tests.helpers:probs_model", "--interpreters", "grad", "--outputs", "probs",
            "--out", tmp_path, "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads((tmp_path / "default" / "report.json").read_text())
    (tg,) = rep["targets"].values()
    assert tg["target"]["outputs"] == "probs" and tg["summary"]["interpreters"]["grad"]["pgd"]["asr"]["mean"] >= 0.5


def test_random_weights_asked_for_are_labelled_and_a_failed_pgd_is_inconclusive(tmp_path):
    """--weights random runs (labelled UNTRAINED); PGD with one step fails, so the target is INCONCLUSIVE in the
    terminal, JSON and HTML, and the run exits 4 even under the most lenient gate."""
    r = cli("audit", "--model", "torchvision:mobilenet_v2", "--weights", "random", "--data", "photos", "--n", "2",
            "--interpreters", "cam", "--attacks", "pgd,adv2", "--defenses", "", "--shorten", "1000",
            "--fail-above", "1", "--out", tmp_path, cwd=tmp_path)
    assert r.returncode == 4, r.stderr[-2000:]
    assert "UNTRAINED" in r.stdout and "INCONCLUSIVE" in r.stderr and "passes no gate" in r.stderr
    rep = json.loads((tmp_path / "default" / "report.json").read_text())
    (tg,) = rep["targets"].values()
    assert not tg["status"]["conclusive"] and "plain PGD reached" in tg["status"]["reasons"][0]
    assert rep["headline"]["status"] == "inconclusive" and rep["headline"]["inconclusive"]
    assert "INCONCLUSIVE" in (tmp_path / "default" / "report.html").read_text()


@pytest.mark.parametrize("toml, needle", [
    ('[[targets]]\neps = "big"', "targets[0].eps must be a number or absent, got 'big'"),
    ('[[targets]]\nn = "4"', "targets[0].n must be an integer, got '4'"),
    ('[[targets]]\nshorten = 0', "shorten must be an integer ≥ 1, got 0"),
    ('[[targets]]\ninterpreters = "cam"', "targets[0].interpreters must be a list of strings, got 'cam'"),
])
def test_bad_config_values_one_line_before_loading(toml, needle, tmp_path):
    (tmp_path / "c.toml").write_text(toml + "\n")
    r = cli("audit", "--config", "c.toml", "--out", tmp_path / "runs", cwd=tmp_path)
    one_error(r, needle)
    assert "loading model" not in r.stderr  # refused before anything was loaded
    _nothing_written(tmp_path / "runs")


@pytest.mark.parametrize("raw, needle", [
    ({"targets": [{"eps": 0.03}]}, "eps is in 1/255 units"),
    ({"seed": 1.5}, "setting seed must be an integer"),
    ({"name": "../x"}, "name must be a plain folder name"),
    ({"targets": "all"}, "targets must be a list of tables"),
    ({"targets": [{"noise_draws": 0}]}, "noise_draws must be an integer ≥ 1"),
    ({"targets": [{"outputs": "scores"}]}, "outputs must be 'logits' or 'probs'"),
    ({"min_pgd_asr": 1.5}, "min_pgd_asr must be in [0, 1]"),
    ({"compile": "yes"}, "compile must be a boolean"),
])
def test_more_bad_settings(raw, needle):
    from underfire.audit.config import AuditConfig, AuditError

    with pytest.raises(AuditError) as err:
        AuditConfig.from_dict(raw).validate()
    assert needle in str(err.value)


def test_bad_flags_one_line(tmp_path):
    out = tmp_path / "runs"
    cases = [(["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "cuda:99"], "cuda"),
             (["--device", "tpu"], "device 'tpu'"),
             (["--fail-above", "2"], "--fail-above is a spoofability in [0, 1]"),
             (["--resume", "--name", "never_ran"], "nothing to resume")]
    for args, needle in cases:
        r = cli("audit", *SMALL, *args, "--out", out, cwd=tmp_path)
        one_error(r, needle)
        assert "loading model" not in r.stderr
    _nothing_written(out)
    (tmp_path / "afile").write_text("x")
    one_error(cli("audit", *SMALL, "--out", tmp_path / "afile" / "runs", cwd=tmp_path), "is a file, not a folder")


def test_user_entry_point_that_raises(tmp_path):
    r = cli("audit", *SMALL, "--model", "tests.helpers:raising_model", "--out", tmp_path / "runs", cwd=tmp_path)
    one_error(r, "'tests.helpers:raising_model' raised RuntimeError: cannot open /models/prod.ckpt")
    v = cli("-v", "audit", *SMALL, "--model", "tests.helpers:raising_model", "--out", tmp_path / "runs", cwd=tmp_path)
    assert v.returncode == 1 and "Traceback" in v.stderr and "raising_model" in v.stderr  # -v: the traceback too


def test_detect_refuses_inputs_it_cannot_score(tmp_path):
    from underfire.training.data import fashion_mnist

    th = tmp_path / "sq.pt"
    assert cli("detect", "--calibrate", "40", "--thresholds", th, cwd=tmp_path).returncode == 0
    x = fashion_mnist("test").tensors[0][:2]
    for name, bad, needle in (("nan.pt", x.clone().index_fill_(2, torch.tensor([3]), float("nan")), "NaN"),
                              ("big.pt", x * 5, "[0, 1]")):
        torch.save({"x_adv": bad}, tmp_path / name)
        r = cli("detect", "--thresholds", th, tmp_path / name, cwd=tmp_path)
        line = one_error(r, needle)
        assert name in line and "benign" not in r.stdout


def test_detector_never_calls_an_unscorable_input_benign(fmnist_resnet, fmnist_test):
    """In the library too: a NaN score flags its input; a NaN input is refused."""
    from underfire.guard.interpreters.base import InterpreterError
    from underfire.guard.squeeze import SqueezeDetector

    det = SqueezeDetector(fmnist_resnet)
    det.calibrate(fmnist_test.tensors[0][:40], 0.05)
    assert det.flag_scores({"joint": torch.tensor([float("nan"), 0.0])})["joint"].tolist() == [True, False]
    with pytest.raises(InterpreterError, match="NaN"):
        det.flags(torch.full((1, 1, 28, 28), float("nan")))


def test_rates_carry_exact_intervals():
    r = rate(8, 8)
    assert r["mean"] == 1.0 and r["ci95"][1] == 1.0 and r["ci95"][0] == pytest.approx(0.631, abs=1e-3)
    assert rate(0, 8)["ci95"][0] == 0.0 and rate(0, 8)["ci95"][1] == pytest.approx(0.369, abs=1e-3)
    assert rate(0, 0)["mean"] is None


def test_noise_level_fixes_the_benign_class():
    """τ's noisy maps are taken for the benign class: an interpreter whose map depends only on the class it
    explains shows zero map noise even when the noise flips every prediction."""
    from underfire.audit.config import Target
    from underfire.audit.deployment import Deployment
    from underfire.audit.plan import noise_l1
    from underfire.guard.interpreters.base import Explanation

    class ClassMap:
        def __call__(self, x, target=None):
            logits = torch.randn(len(x), 10)  # every call "predicts" a random class
            cls = logits.argmax(1) if target is None else target
            return Explanation(logits, (cls.float() / 10).view(-1, 1, 1, 1).expand(-1, 1, 7, 7))

    x, y = torch.rand(6, 1, 28, 28), torch.arange(6)
    dep = Deployment(None, {"m": ClassMap()}, 8 / 255, x, y, y, None, None, [])
    bms = {"m": (y.float() / 10).view(-1, 1, 1, 1).expand(-1, 1, 7, 7)}
    d = noise_l1(Target(noise_draws=3), dep, slice(0, 6), 0, bms)["m"]
    assert len(d) == 6 and all(len(row) == 3 for row in d)
    assert max(max(row) for row in d) == 0.0


def test_noise_level_pools_draws_and_reports_its_stability():
    from underfire.audit.aggregate import noise_level

    per = [[0.1 * i + 0.01 * j for j in range(4)] for i in range(10)]
    nl = noise_level(per, 200, 0)
    flat = torch.tensor(per).flatten()
    assert nl["tau"] == pytest.approx(float(flat.quantile(0.95)))
    assert nl["draws"] == 4 and nl["inputs"] == 10 and nl["ci95"][0] < nl["tau"] <= nl["ci95"][1] + 1e-12
    assert math.isnan(noise_level([], 10, 0)["tau"])


def test_headline_is_inconclusive_when_a_target_is_or_nothing_was_measured():
    from underfire.audit.aggregate import headline

    def tg(k, reasons):
        return {"summary": {"interpreters": {"cam": {"spoofability": rate(k, 8)}}}, "status": {"reasons": reasons}}
    h = headline({"a": tg(2, []), "b": tg(6, [])})
    assert h["status"] == "measured" and h["spoofability"] == 0.75 and h["where"] == "b / cam"
    assert h["ci95"] == rate(6, 8)["ci95"]
    assert headline({"a": tg(0, ["plain PGD reached ..."])})["status"] == "inconclusive"
    empty = headline({"a": {"summary": {"interpreters": {"cam": {}}}, "status": {"reasons": []}}})
    assert empty["status"] == "inconclusive" and empty["spoofability"] is None
