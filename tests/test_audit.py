"""The audit runner and CLI: report schema, HTML from JSON, resume after a kill, torchrun sharding, exit codes,
bad deployments. Runs a tiny real audit (Fashion-MNIST ResNet, CAM + RTS, squeezing) through the CLI."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from underfire.audit.html import render_html
from underfire.audit.report import SCHEMA_VERSION, ReportError, load_report
from underfire.audit.config import AuditConfig, AuditError
from tests.helpers import ENV, cli, one_error

CONFIG = """
name = "tiny"
batch_size = 2
bootstrap = 50
examples = 1
[[targets]]
model = "fmnist_resnet"
interpreters = ["cam", "rts"]
n = 4
attacks = ["pgd", "adv2", "adaptive"]
defenses = ["squeeze"]
shorten = 50
calibration_n = 32
adaptive_interpreters = ["cam"]
target_maps = ["benign", "shapes"]
"""



def records(run: Path) -> dict:
    rep = json.loads((run / "report.json").read_text())
    return {k: (t["records"], t["summary"]) for k, t in rep["targets"].items()}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("audit")
    (d / "tiny.toml").write_text(CONFIG)
    return d


@pytest.fixture(scope="module")
def full_run(work):
    r = cli("audit", "--config", "tiny.toml", "--out", "runs", "--json", cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    return work / "runs" / "tiny", r


def test_report_json_schema_and_summary(full_run):
    run, r = full_run
    summary = json.loads(r.stdout)
    rep = load_report(run / "report.json")
    assert rep["schema_version"] == SCHEMA_VERSION
    assert rep["config"]["targets"][0]["interpreters"] == ["cam", "rts"]
    assert rep["environment"]["torch"] and rep["environment"]["device"]
    t = rep["targets"]["fmnist_resnet@fashion-mnist"]
    assert t["n"] == 4 and len(t["records"]["interpreters"]["cam"]["adv2"]["l1"]) == 4
    assert set(t["summary"]["interpreters"]["cam"]) >= {"pgd", "adv2", "adaptive-squeeze", "spoofability", "tau",
                                                        "adv2-shapes", "pgd_within_tau"}
    assert "benign_l1_to_target" in t["summary"]["interpreters"]["rts"]["adv2-shapes"]
    assert 0 <= summary["headline"]["spoofability"] <= 1
    assert summary["headline"] == rep["headline"]
    assert "squeeze" in t["detectors"] and t["detectors"]["squeeze"]["calibration"]["n"] == 32
    assert "progress" not in r.stdout and "batch 2/2" in r.stderr  # progress on stderr, data on stdout
    assert json.loads((run / "config.json").read_text())["name"] == "tiny"


def test_html_is_rendered_from_the_json_only(full_run):
    run, _ = full_run
    page = (run / "report.html").read_text()
    assert page == render_html(json.loads((run / "report.json").read_text()))
    assert page.count("<img") >= 5 and "Headline spoofability" in page


def test_load_report_rejects_other_schemas(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps({"schema_version": 999}))
    with pytest.raises(ReportError, match="schema version"):
        load_report(tmp_path / "r.json")


def test_resume_after_kill_gives_identical_results(full_run, work):
    run_a, _ = full_run
    p = subprocess.Popen([sys.executable, "-m", "underfire.audit.cli", "audit", "--config", "tiny.toml", "--out", "killed"],
                         cwd=work, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = work / "killed" / "tiny" / "journal" / "fmnist_resnet@fashion-mnist" / "batch_00000.json"
    t0 = time.time()
    while not first.exists() and p.poll() is None and time.time() - t0 < 300:
        time.sleep(0.2)
    p.send_signal(signal.SIGSTOP)  # hold it mid-run (alive, lock held) while a second process tries
    assert p.poll() is None, "the first run ended before it could be caught working"
    busy = cli("audit", "--config", "tiny.toml", "--out", "killed", "--resume", cwd=work)
    one_error(busy, f"in use by process {p.pid}")  # a second process on a locked folder is refused
    busy = cli("audit", "--config", "tiny.toml", "--out", "killed", "--overwrite", cwd=work)
    one_error(busy, f"in use by process {p.pid}")
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert first.exists() and not (work / "killed" / "tiny" / "report.json").exists()
    assert (work / "killed" / ".tiny.lock").exists()  # a dead process's lock: stale, taken over below
    again = cli("audit", "--config", "tiny.toml", "--out", "killed", cwd=work)
    assert again.returncode == 1 and "--resume" in again.stderr  # never silently overwrites a run
    other = cli("audit", "--config", "tiny.toml", "--out", "killed", "--resume", "--batch-size", "3", cwd=work)
    assert other.returncode == 1 and "another configuration" in other.stderr  # the batches must line up
    r = cli("audit", "--config", "tiny.toml", "--out", "killed", "--resume", cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "batch 1/2 already in the journal, skipped" in r.stderr
    assert records(work / "killed" / "tiny") == records(run_a)
    assert not (work / "killed" / ".tiny.lock").exists()


def test_resume_refuses_batches_of_another_run(full_run, work, tmp_path):
    """A journal batch copied into another batch's place, or made with other settings, is refused by name."""
    import shutil

    from underfire.audit.journal import digest

    run = tmp_path / "runs" / "tiny"
    shutil.copytree(full_run[0], run)
    (run / "report.json").unlink()
    journal = run / "journal" / "fmnist_resnet@fashion-mnist"
    shutil.copy(journal / "batch_00000.json", journal / "batch_00001.json")
    r = cli("audit", "--config", work / "tiny.toml", "--out", tmp_path / "runs", "--resume", cwd=work)
    one_error(r, "covers samples 0–1, but batch batch_00001 is samples 2–3")
    (journal / "batch_00001.json").unlink()
    rec = json.loads((journal / "batch_00000.json").read_text())
    rec["fingerprint"]["config"]["targets.eps"] = 16  # as if made by a run with another ε (its own digest valid)
    rec["digest"] = digest(rec)
    (journal / "batch_00000.json").write_text(json.dumps(rec))
    r = cli("audit", "--config", work / "tiny.toml", "--out", tmp_path / "runs", "--resume", cwd=work)
    one_error(r, "targets.eps: 16 → None")


def test_resume_refuses_a_replaced_checkpoint(tmp_path):
    """The model file swapped between a kill and --resume: same path, same config, other weights → refused."""
    import shutil

    from underfire.guard.models import CHECKPOINT_DIR

    shutil.copy(CHECKPOINT_DIR / "fmnist_resnet.pt", tmp_path / "m.pt")
    args = ("audit", "--model", tmp_path / "m.pt", "--n", "2", "--batch-size", "1", "--interpreters", "cam",
            "--attacks", "pgd", "--defenses", "", "--shorten", "50", "--name", "swap", "--out", tmp_path / "runs")
    r = cli(*args, cwd=tmp_path)  # PGD only: the journal is written, and a run without ADV² measures nothing
    assert r.returncode == 4 and "INCONCLUSIVE: no ADV² attack ran" in r.stderr, r.stderr[-2000:]
    run = tmp_path / "runs" / "swap"
    (run / "report.json").unlink()
    (journal,) = (run / "journal").iterdir()
    (journal / "batch_00001.json").unlink()  # as if killed after batch 0
    shutil.copy(CHECKPOINT_DIR / "fmnist_densenet.pt", tmp_path / "m.pt")
    one_error(cli(*args, "--resume", cwd=tmp_path), "made with other weights")


def test_failed_overwrite_keeps_the_finished_run(full_run, work):
    """--overwrite builds the new run beside the old one: a failure leaves the old run byte for byte."""
    run, _ = full_run
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for extra, needle in ((["--model", "tests.helpers:probs_model"], "probabilities"),):  # fails after loading
        r = cli("audit", "--config", "tiny.toml", "--out", "runs", "--overwrite", *extra, cwd=work)
        one_error(r, needle, code=4 if needle == "probabilities" else 1)
        after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
        assert after == before
        assert not [p.name for p in (work / "runs").iterdir() if p.name.startswith(".tiny")]  # no staging, no lock


def test_torchrun_two_processes_equal_one(full_run, work):
    run_a, _ = full_run
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29731",
                        "-m", "underfire.audit.cli", "audit", "--config", "tiny.toml", "--out", "dist"],
                       cwd=work, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((work / "dist" / "tiny" / "report.json").read_text())
    assert rep["environment"]["world_size"] == 2
    assert records(work / "dist" / "tiny") == records(run_a)


def test_fail_above_exit_codes(work, full_run):
    run, _ = full_run
    head = json.loads((run / "report.json").read_text())["headline"]
    assert head["status"] == "measured" and head["spoofability"] > 0  # the premise of the exit-3 case below
    ok = cli("audit", "--config", "tiny.toml", "--out", "runs", "--resume", "--fail-above", "1.0", cwd=work)
    assert ok.returncode == 0, ok.stderr[-2000:]
    bad = cli("audit", "--config", "tiny.toml", "--out", "runs", "--resume", "--fail-above", "0", cwd=work)
    assert bad.returncode == 3 and "FAIL: spoofability" in bad.stderr
    for never in ("2", "-0.5"):  # a gate that can never fire, or always fires: refused before anything runs
        r = cli("audit", "--config", "tiny.toml", "--out", "runs", "--resume", "--fail-above", never, cwd=work)
        assert r.returncode == 1 and "--fail-above is a spoofability in [0, 1]" in r.stderr, r.stderr[-2000:]
        assert "Traceback" not in r.stderr


def _one_error(r, needle: str, out: Path):
    one_error(r, needle)
    assert not list(out.rglob("report.json")) and not list(out.rglob("report.html"))


def test_bad_deployments_get_one_clear_error(work, tmp_path):
    out = tmp_path / "runs"
    args = ("--n", "2", "--interpreters", "grad", "--defenses", "", "--attacks", "pgd", "--shorten", "100",
            "--out", str(out))
    _one_error(cli("audit", "--model", "no_such_model", *args, cwd=work), "no_such_model", out)
    _one_error(cli("audit", "--model", "tests.helpers:nan_model", *args, cwd=work), "NaN", out)
    junk = tmp_path / "junk" / "shirts"
    junk.mkdir(parents=True)
    (junk / "a.png").write_text("this is not a png")
    _one_error(cli("audit", "--model", "fmnist_resnet", "--data", str(tmp_path / "junk"), *args, cwd=work), "a.png", out)
    many = tmp_path / "many"
    for i in range(11):
        (many / f"c{i:02d}").mkdir(parents=True)
        Image.new("L", (28, 28), color=i * 20).save(many / f"c{i:02d}" / "x.png")
    _one_error(cli("audit", "--model", "fmnist_resnet", "--data", str(many), *args, cwd=work), "11 class folders", out)
    assert not out.exists() or not any(out.iterdir())  # failed runs leave no folder behind


def test_config_validation():
    with pytest.raises(AuditError, match="unknown audit settings"):
        AuditConfig.from_dict({"nme": "x"})
    with pytest.raises(AuditError, match="unknown attacks"):
        AuditConfig.from_dict({"targets": [{"attacks": ["fgsm"]}]}).validate()
    with pytest.raises(AuditError, match="two interpreters"):
        AuditConfig.from_dict({"targets": [{"interpreters": ["cam"], "defenses": ["ensemble"]}]}).validate()
    with pytest.raises(AuditError, match="precision"):
        AuditConfig.from_dict({"precision": "int8"}).validate()


def test_rerun_keeps_a_finished_report(full_run, work):
    run_a, _ = full_run
    before = (run_a / "report.json").read_text()
    r = cli("audit", "--config", "tiny.toml", "--out", "runs", cwd=work)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "holds a finished report" in r.stderr
    assert (run_a / "report.json").read_text() == before  # nothing already written is lost
    dated = [p for p in (work / "runs").iterdir() if p.name.startswith("tiny-")]
    assert len(dated) == 1 and records(dated[0]) == records(run_a)


def test_model_flag_keeps_a_one_target_preset_and_replaces_a_multi_target_one():
    from underfire.audit.cli import resolve_config

    cfg = resolve_config(None, "table4", {"model": "fmnist_densenet"})
    (t,) = cfg.targets
    assert t.model == "fmnist_densenet" and t.calibration_n == 1000 and t.adaptive_interpreters == ["grad", "cam", "rts"]
    cfg = resolve_config(None, "default", {"model": "fmnist_densenet", "n": 3})
    (t,) = cfg.targets
    assert t.model == "fmnist_densenet" and t.n == 3 and t.adv2_interpreters is None  # Target defaults


def test_speed_flags_reach_every_attack_of_the_audit():
    """--precision / --compile go from the CLI flags into the config and into each attack the runner makes."""
    from underfire.audit.cli import resolve_config
    from underfire.audit.deployment import Deployment
    from underfire.audit.plan import adv2_attack, pgd_attack

    cfg = resolve_config(None, "default", {"precision": "bf16", "compile": True})
    assert cfg.precision == "bf16" and cfg.compile is True
    dep = Deployment(None, {}, 8 / 255, None, None, None, None, None, [], None, cfg.precision, cfg.compile)
    t = cfg.targets[0]
    for atk in (pgd_attack(t, dep), adv2_attack(t, dep, "cam"), adv2_attack(t, dep, "mask")):
        assert atk.precision == "bf16" and atk.compile is True and atk.describe()["compile"] is True


def test_auto_batch_size():
    """fit_batch: the largest power of two whose memory fits the budget, within [1, min(n, cap)]; 'auto' on CPU
    is 32; the CLI's string form is accepted and bad values are refused."""
    from underfire.audit.cli import resolve_config
    from underfire.audit.config import AuditConfig, AuditError
    from underfire.audit.deployment import AUTO_CPU_BATCH, Deployment, auto_batch_size, fit_batch

    gib = 2 ** 30
    assert fit_batch(100 * 2 ** 20, 10 * gib, n=10_000) == 64  # 0.7 · 10 GiB / 100 MiB = 71.7 → 64
    assert fit_batch(100 * 2 ** 20, 10 * gib, n=40) == 32
    assert fit_batch(10 * gib, 1 * gib, n=100) == 1  # does not fit at all: one at a time
    assert fit_batch(1.0, 80 * gib, n=10_000) == 1024  # cap
    assert resolve_config(None, "default", {"batch_size": "auto"}).batch_size == "auto"
    assert resolve_config(None, "default", {"batch_size": "8"}).batch_size == 8
    for bad in ("many", 0):
        with pytest.raises(AuditError, match="batch_size"):
            AuditConfig(batch_size=bad).validate()
    dep = Deployment(None, {}, 8 / 255, torch.zeros(100, 1, 28, 28), None, None, None, None, [], None)
    t = AuditConfig().targets[0]
    assert auto_batch_size(t, dep) == AUTO_CPU_BATCH


def test_resumed_auto_batch_keeps_the_journaled_size(tmp_path):
    """An 'auto' run resumed on other hardware must cut the batches the journal was written with."""
    from underfire.audit.config import AuditConfig, AuditError
    from underfire.audit.deployment import Deployment, resolve_batch_size
    from underfire.audit.journal import Journal

    dep = Deployment(None, {}, 8 / 255, torch.zeros(100, 1, 28, 28), None, None, None, None, [], None)
    t, j = AuditConfig().targets[0], Journal(tmp_path, "k")
    assert resolve_batch_size(AuditConfig(batch_size="auto"), t, dep, j, resume=False) == 32
    (j.dir / "batch_size").write_text("12")  # as if the first run had chosen 12 on a GPU
    assert resolve_batch_size(AuditConfig(batch_size="auto"), t, dep, j, resume=True) == 12
    with pytest.raises(AuditError, match="journaled with batch size 12"):
        resolve_batch_size(AuditConfig(batch_size=16), t, dep, j, resume=True)


def test_a_plain_folder_of_images_is_audited_with_the_models_predictions(tmp_path, fmnist_resnet):
    """A folder without class subfolders (the usual thing to audit an ImageNet model with): the model's own
    predictions are the classes, and the detectors calibrate on crops of the images that are not audited."""
    from underfire.audit.config import Target, validate_target
    from underfire.audit.deployment import build_deployment
    from underfire.training.data import fashion_mnist

    xs = fashion_mnist("test").tensors[0][:12]
    for i, im in enumerate(xs):
        Image.fromarray((im[0].numpy() * 255).round().astype("uint8"), mode="L").save(tmp_path / f"img{i:02d}.png")
    t = Target("fmnist_resnet", interpreters=["cam"], data=str(tmp_path), n=4, calibration_n=16)
    validate_target(t)
    dep = build_deployment(t, 0, torch.device("cpu"))
    assert len(dep.x) == 4 and torch.equal(dep.y, fmnist_resnet(dep.x).argmax(1))
    assert dep.x_cal.shape == (16, 1, 28, 28) and dep.x_heldout.shape == (16, 1, 28, 28)
    assert torch.allclose(dep.x[0], xs[0], atol=1 / 255)


def test_the_html_report_renders_in_headless_chromium(full_run, tmp_path):
    """What a reviewer opens: Chromium renders it without console errors; the screenshot is a real page (not
    blank); the maps are laid over their images and the plain-language paragraph is there."""
    import re
    import shutil

    browser = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    if browser is None:
        pytest.skip("no Chromium on this machine (Debian: apt-get install chromium)")
    run, _ = full_run
    page = (run / "report.html").read_text()
    assert page.count("class=\"ov\"") >= 3 and "class='plain'" in page
    assert re.search(r"<p class='plain'>On 4 audited inputs, an attacker allowed to change each pixel", page)
    shot = tmp_path / "report.png"
    r = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'p'}",
                        "--enable-logging=stderr", "--v=0", "--window-size=1200,2000", f"--screenshot={shot}",
                        (run / "report.html").as_uri()], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    console = [ln for ln in r.stderr.splitlines() if "CONSOLE" in ln or "Uncaught" in ln]
    assert not console, console
    im = Image.open(shot).convert("RGB")
    assert im.size == (1200, 2000)
    colours = len(im.resize((300, 500)).getcolors(1 << 20))
    assert colours > 200, colours  # text, tables and maps, not an empty page


def test_adv2_tables_benchmark_runs_through_the_audit(tmp_path):
    """benchmarks/adv2_tables.py is a front end of run_audit (one path for the paper's tables): its record is an
    audit record with the tuning option applied to every ADV², and it prints Table 3's row from it."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "t.json"
    r = subprocess.run([sys.executable, "benchmarks/adv2_tables.py", "--n", "2", "--interpreters", "cam",
                        "--shorten", "100", "--batch", "2", "--threads", "1", "--adv2", "lam_scale=3",
                        "--json", str(out)], cwd=root, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["schema_version"] and report["config"]["targets"][0]["adv2_options"] == {"lam_scale": 3}
    (tg,) = report["targets"].values()
    assert "adv2" in tg["summary"]["interpreters"]["cam"]
    assert "| cam |" in r.stdout and "lam_scale" in r.stdout


def test_a_bad_adv2_option_is_refused_by_name():
    from underfire.audit.config import AuditConfig, AuditError, Target

    cfg = AuditConfig(targets=[Target(interpreters=["cam"], adv2_options={"lam_scal": 3})])
    with pytest.raises(AuditError, match="lam_scal"):
        cfg.validate()


def test_plain_words_names_the_weakest_interpreter_only_when_one_is_weaker():
    """The report's opening paragraph ranks interpreters only when their spoofability differs."""
    from underfire.audit.report import plain_words

    def tg(rates):
        return {"n": 8, "eps_255": 8, "status": {"reasons": []}, "target": {"defenses": []},
                "summary": {"interpreters": {k: {"spoofability": {"mean": m / 8, "k": m, "n": 8, "ci95": [0, 1]}}
                                             for k, m in rates.items()}}}
    tied = plain_words("m@d", tg({"grad": 8, "cam": 8}))
    assert "spoofed equally often" in tied and "weakest" not in tied
    ranked = plain_words("m@d", tg({"grad": 8, "cam": 3}))
    assert "grad is the weakest of the 2 interpreters audited; cam held best (38%)" in ranked
