"""Black-box ADV² (attacks/blackbox.py): the estimator, exact query counting, the budget, the start."""

from __future__ import annotations

import math

import pytest
import torch

from underfire.attacks.blackbox import Counted, QueryAdv2, estimate, transfer_start
from underfire.attacks.threats import AttackError
from underfire.guard.registry import build_interpreter
from underfire.guard.interpreters.base import Explanation, Interpreter
from tests.conftest import tiny_classifier
from tests.helpers import ROOT


@pytest.mark.parametrize("kind", ["nes", "spsa"])
def test_the_estimate_agrees_in_sign_with_the_true_gradient(kind):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(3, 1, 6, 6, generator=gen, dtype=torch.float64)
    c = torch.rand(3, 1, 6, 6, generator=gen, dtype=torch.float64)

    def loss(v):  # a smooth per-sample objective (B,) with a known gradient
        return (w * torch.sin(3 * v) + (v - c) ** 2).flatten(1).sum(1)

    v = torch.rand(3, 1, 6, 6, generator=gen, dtype=torch.float64).requires_grad_(True)
    (true,) = torch.autograd.grad(loss(v).sum(), v)
    shape = (3, 400, 1, 6, 6)
    u = (torch.randn(shape, generator=gen, dtype=torch.float64) if kind == "nes"
         else torch.randint(0, 2, shape, generator=gen).double() * 2 - 1)
    calls = []

    def f(vs):  # the points of sample b come as one block of 2k: repeat w and c to match
        calls.append(len(vs))
        rep = lambda t: t.repeat_interleave(len(vs) // 3, 0)  # noqa: E731
        return (rep(w) * torch.sin(3 * vs) + (vs - rep(c)) ** 2).flatten(1).sum(1)

    g, mean = estimate(f, v.detach(), u, 1e-3)
    assert calls == [3 * 2 * 400]  # one batch for every sample and direction
    big = true.abs() > true.abs().flatten().median()
    agree = (g.sign() == true.sign())[big].double().mean()
    cos = torch.nn.functional.cosine_similarity(g.flatten(1), true.flatten(1)).min()
    assert agree > 0.9 and cos > 0.6, (float(agree), float(cos))
    assert torch.allclose(mean, loss(v.detach()), atol=1e-3)
    # a wrong sign convention (f(v − σu) − f(v + σu)) would disagree everywhere: the check can fail
    g_wrong, _ = estimate(lambda vs: -f(vs), v.detach(), u, 1e-3)
    assert (g_wrong.sign() == true.sign())[big].double().mean() < 0.1


class _Smooth(Interpreter):
    """A smooth differentiable map (a blurred |input|-weighted logit map) that records every image it is shown."""

    compile_parts = ()

    def __init__(self, model):
        super().__init__(model)
        self.name, self.seen = "toy", 0

    def native_size(self, hw):
        return (hw[0] // 4, hw[1] // 4)

    def explain(self, x, target):
        self.seen += x.shape[0]
        z = self.model(x)
        m = torch.nn.functional.avg_pool2d(torch.sigmoid(8 * (x - 0.5)) * x.mean((1, 2, 3), keepdim=True), 4)
        return Explanation(z, m / m.flatten(1).amax(1).clamp_min(1e-9).view(-1, 1, 1, 1))


def _setup(n=3):
    model = tiny_classifier(dtype=torch.float32)
    x = torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    x = torch.round(x * 255) / 255
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, (y + 1) % 10


@pytest.mark.parametrize("threat", ["graybox", "blackbox"])
def test_query_counting_is_exact_and_within_the_budget(threat):
    model, x, y_t = _setup()
    toy = _Smooth(model)
    bm = toy(x).saliency
    budget, spent = 300, torch.tensor([20, 20, 20])
    a = QueryAdv2(24 / 255, budget, threat=threat, samples=4, check_every=3)
    toy.seen, shown = 0, []
    hook = model.register_forward_hook(lambda m, inp, out: shown.append(len(inp[0])))
    try:
        r = a(toy, x, y_t, bm, start=None, spent=spent)
    finally:
        hook.remove()
    q = torch.tensor(r.history["queries"])
    # the deployment saw exactly what the attack counted (less the 20 already spent per image): in the gray
    # box every map (the classifier's gradient is free), in the black box every image the classifier was shown
    assert int((q - spent).sum()) == (toy.seen if threat == "graybox" else sum(shown))
    assert sum(shown) > toy.seen if threat == "graybox" else True
    assert (q <= budget).all() and (q > budget - 2 * 4 - 3).all()  # the plan uses the budget, never more
    trace = r.history["trace"]
    assert all(len(t) >= 2 and [p[0] for p in t] == sorted(p[0] for p in t) for t in trace)  # queries grow
    best = [[math.inf if b is None else b for _, b in t] for t in trace]  # None: no success yet
    assert all(b[i] >= b[i + 1] for b in best for i in range(len(b) - 1))  # the best L1 only falls


def test_a_refinement_never_returns_worse_than_its_start_and_counts_the_transfer():
    """The transfer start is judged like any iterate; its judgements are queries of the real map."""
    from underfire.attacks.adv2 import make_adv2
    from underfire.guard.adapters import Transfer
    from underfire.audit.metrics import l1

    model, x, y_t = _setup(2)
    real = Counted(_Smooth(model))
    twin = build_interpreter("grad", model)
    r0, spent = transfer_start(make_adv2("grad", 24 / 255, steps=(10, 10)), Transfer(twin, real), x, y_t,
                               _Smooth(model)(x).saliency, real)
    assert int(spent.sum()) == real.images and (spent == spent[0]).all() and spent[0] > 0
    bm = _Smooth(model)(x).saliency
    before = l1(_Smooth(model)(r0.x_adv).saliency, bm)
    r = QueryAdv2(24 / 255, int(spent[0]) + 50, samples=2)(real, x, y_t, bm, start=r0.x_adv, spent=spent)
    assert max(r.history["queries"]) <= int(spent[0]) + 50
    ok0 = r0.success
    after = l1(r.explanation.saliency, bm)
    assert (r.success | ~ok0).all() and (after[ok0] <= before[ok0] + 1e-6).all()
    assert (r.x_adv - x).abs().amax() <= 24 / 255 + 1e-6


def test_the_oracle_has_no_gradient_and_bad_arguments_are_refused():
    model, x, y_t = _setup(2)
    c = Counted(_Smooth(model))
    xg = x.clone().requires_grad_(True)
    assert not c(xg).saliency.requires_grad and c.images == 2
    with pytest.raises(AttackError, match="threat"):
        QueryAdv2(0.1, threat="whitebox")
    with pytest.raises(AttackError, match="estimator"):
        QueryAdv2(0.1, estimator="adam")
    with pytest.raises(AttackError, match="ε-ball"):
        QueryAdv2(8 / 255, 100)(c, x, y_t, c(x).saliency, start=(x + 0.5).clamp(0, 1))


NUMPY_MODULE = '''
import torch
from underfire.guard.registry import build_interpreter
from underfire.guard.models import load_model


def build():
    model = load_model("fmnist_resnet")
    cam = build_interpreter("cam", model)

    def numpy_cam(x, target):  # a map computed outside torch: no gradient reaches the input
        with torch.no_grad():
            m = cam(x.detach(), target).saliency
        return torch.from_numpy(m.cpu().numpy().copy())

    return model, {"npcam": numpy_cam}
'''


def test_an_interpreter_without_a_gradient_is_attacked_by_queries_and_never_passes_a_gate(tmp_path, monkeypatch):
    """The pre-flight finds no gradient; the audit runs query ADV² instead of a white-box attack that could
    not move, reports its spoofability as a lower bound, and the CLI gate does not pass it."""
    from underfire.audit.config import AuditConfig, Target
    from underfire.audit.runner import run_audit
    from tests.helpers import cli

    (tmp_path / "npmodels.py").write_text(NUMPY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    rep = run_audit(AuditConfig(name="np", batch_size=3, bootstrap=10, examples=0, targets=[
        Target("npmodels:build", interpreters=["npcam"], n=3, attacks=["pgd", "adv2"], defenses=[], shorten=50,
               queries=120)]), tmp_path / "runs")
    tg = next(iter(rep["targets"].values()))
    per = tg["records"]["interpreters"]["npcam"]
    assert "adv2" not in per and "blackbox" in per  # no white-box attack on a map without a gradient
    assert max(per["blackbox"]["queries"]) <= 120
    a = tg["summary"]["interpreters"]["npcam"]
    assert a["spoofability"]["n"] == 3 and "query ADV² only" in a["lower_bound"]
    assert a["blackbox"]["asr"]["mean"] > 0  # the query attack moved the input where a gradient attack could not
    env = {"PYTHONPATH": f"{tmp_path}:{ROOT}"}
    r = cli("audit", "--model", "npmodels:build", "--interpreters", "npcam", "--attacks", "pgd,adv2", "--defenses",
            "", "--n", "2", "--shorten", "50", "--queries", "60", "--fail-above", "1.0", "--out", tmp_path / "o",
            cwd=tmp_path, env_extra=env)
    assert r.returncode == 4, r.stderr[-2000:]
    assert "LOWER BOUND" in r.stderr and "cannot pass --fail-above" in r.stderr


def test_a_budget_the_transfer_already_spent_is_never_exceeded():
    """When the start's queries leave no room for one estimated step, the start is returned as is and not one
    query more is counted (before, the start's re-judgement and the final read overshot the budget by 2)."""
    model, x, y_t = _setup(2)
    toy = _Smooth(model)
    bm = toy(x).saliency
    start = (x + 8 / 255 * torch.sign(torch.randn(x.shape, generator=torch.Generator().manual_seed(2)))).clamp(0, 1)
    start = torch.round(start * 255) / 255
    for spent in (100, 95, 80):  # budget 100; one step costs 2 · 4 samples + judgements
        toy.seen = 0
        r = QueryAdv2(24 / 255, 100, samples=4)(toy, x, y_t, bm, start=start, spent=spent)
        assert max(r.history["queries"]) <= 100, spent
        if spent > 100 - 2 - 2 * 4:
            assert r.history["queries"] == [spent, spent] and toy.seen == 1 * len(x)  # only the result's own read
            torch.testing.assert_close(r.x_adv, start)
