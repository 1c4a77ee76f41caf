"""underfire as a library: ``audit(model, interpreters, data, **settings) -> AuditReport`` on objects a team
holds (a bare nn.Module, a callable map, tensors), with the CLI's pre-flight refusals and clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from underfire.audit import AuditConfig, AuditError, AuditRefused, AuditReport, Target, audit, run_audit
from underfire.guard import load_model
from underfire.guard.nets import SmallResNet
from underfire.training import fashion_mnist

QUICK = dict(n=3, shorten=25, calibration_n=16, bootstrap=20, examples=1, noise_draws=1)


@pytest.fixture(scope="module")
def team():
    """A team's deployment as objects: the bundled Fashion-MNIST ResNet as a bare nn.Module with its
    normalisation, a map of its own as a callable, and labelled test images as tensors."""
    clf = load_model("fmnist_resnet")
    net, mean, std = clf.net, clf.mean.flatten().tolist(), clf.std.flatten().tolist()

    def saliency(x, target):  # a class activation map of the net's last features, computed by the team
        f = net.cam_features((x - mean[0]) / std[0])
        return torch.einsum("bkhw,bk->bhw", f, net.fc.weight[target]).relu()

    x, y = fashion_mnist("test").tensors
    return net, mean, std, saliency, (x[:120], y[:120])


def test_a_notebook_audits_an_in_memory_module_with_a_callable_map(team, tmp_path):
    net, mean, std, saliency, data = team
    report = audit(net, {"saliency": saliency}, data, mean=mean, std=std, defenses=[], **QUICK)
    assert isinstance(report, AuditReport)
    h = report.headline
    assert h.status == "measured" and 0 <= h.spoofability <= 1 and h.n == 3
    assert h.where.endswith("/ saliency")
    (tg,) = report.targets.values()
    assert tg.spoofability("saliency")["n"] == 3
    assert report.config["targets"][0]["model"] == "python:SmallResNet"
    assert report.config["targets"][0]["data"] == "python:tensors"
    # the team's map was checked against its finite differences (a faithful gradient: no lower bound), and the
    # report says which attack settings a map that declares none was given
    assert not h.lower_bound
    assert any(w.startswith("PRESET: saliency declares no ADV² preset") for w in tg.warnings)
    # a record that round-trips, and a page
    again = AuditReport.from_json(report.to_json(tmp_path / "r.json"))
    assert again.headline == h and json.loads((tmp_path / "r.json").read_text())["headline"]["n"] == 3
    assert "<html" in report.write_html(tmp_path / "r.html").read_text()[:200].lower()
    assert report.gate(fail_above=1.0).exit_code == 0 and report.gate(fail_above=-0.0).exit_code in (0, 3)


def test_untrained_and_probability_output_modules_are_refused_as_on_the_cli(team):
    net, mean, std, saliency, data = team
    torch.manual_seed(0)
    with pytest.raises(AuditRefused, match="chance|untrained|random"):
        audit(SmallResNet(), ["grad"], data, mean=mean, std=std, **QUICK)
    with pytest.raises(AuditRefused, match="probabilit"):
        audit(nn.Sequential(net, nn.Softmax(1)), ["grad"], data, mean=mean, std=std, **QUICK)


@pytest.mark.parametrize("call, needle", [
    (lambda net, d: audit(net, ["grad"], d), "normalises its input"),
    (lambda net, d: audit(net, ["grad"], "fashion-mnist", mean=(0.5,), std=(0.5,)), "input size"),
    (lambda net, d: audit(net, ["grad"], (d[0] * 2, d[1]), mean=(0.5,), std=(0.5,)), "in \\[0, 1\\]"),
    (lambda net, d: audit(net, ["grad"], (d[0], d[1][:5]), mean=(0.5,), std=(0.5,)), "one class index"),
    (lambda net, d: audit(net, [lambda x, t: x.mean(1)], d, mean=(0.5,), std=(0.5,)), "name this interpreter"),
    (lambda net, d: audit(net, ["grad"], d, mean=(0.5,), std=(0.5,), n_images=3), "unknown audit settings"),
    (lambda net, d: audit(net, ["grad"], d, mean=(0.5,), std=(0.5,), n="3"), "must be an integer"),
    (lambda net, d: audit(42, ["grad"], d), "nn.Module or a model name"),
])
def test_bad_objects_get_one_clear_error(team, call, needle):
    net, _, _, _, data = team
    with pytest.raises(AuditError, match=needle):
        call(net, data)


def test_run_audit_leaves_the_callers_config_alone_and_reports_the_resolved_one(tmp_path):
    """Validation resolves defaults (here: the defenses that apply) on a copy; the report's config is what ran,
    and it agrees with the target section."""
    target = {k: v for k, v in QUICK.items() if k not in ("bootstrap", "examples")}
    cfg = AuditConfig(targets=[Target("fmnist_resnet", interpreters=["grad", "cam"], attacks=["adv2"], **target)],
                      bootstrap=20, examples=0)
    report = run_audit(cfg, tmp_path / "run")
    assert cfg.targets[0].defenses is None and cfg.targets[0].attacks == ["adv2"]
    ran = report["config"]["targets"][0]
    assert ran["defenses"] == ["squeeze", "ensemble"] and ran["attacks"][0] == "pgd"
    (tg,) = report["targets"].values()
    assert tg["target"]["defenses"] == ran["defenses"]
