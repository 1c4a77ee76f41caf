"""Attack strength (attacks/strength.py, audit/defenses.py convergence): the ensemble runs cheapest first, each
member only on inputs no earlier one spoofed, keeps the worst case per input; a row whose costliest members
still gain is NOT CONVERGED and credits nothing; a quick row is unchecked and credits nothing."""

from pathlib import Path

import pytest
import torch

from underfire.attacks.strength import LEVELS, Member, members, run_ensemble
from underfire.attacks.threats import AttackError
from underfire.audit.defenses import compare, convergence
from underfire.audit.metrics import rate


def _toy(power: dict[str, float], need: torch.Tensor):
    """Members whose 'attack' reaches power[name]; input i is spoofed when the power reaches need[i]."""
    calls = []

    def attack_with(m, idx):
        calls.append((m.name, idx.tolist()))
        return torch.full((len(idx), 1), power[m.name])

    def judge(xa, idx):
        got = xa[:, 0]
        ok = (got >= need[idx]).tolist()
        return {"l1": (need[idx] - got).tolist(), "nested": {"v": got.tolist()}}, ok, [(o, float(g)) for o, g in
                                                                                      zip(ok, got)]
    return attack_with, judge, calls


def test_ensemble_runs_each_member_only_on_unspoofed_inputs_and_keeps_the_worst_case():
    ms = [Member("a"), Member("b", schedule=2), Member("c", schedule=4)]
    need = torch.tensor([0.5, 1.5, 2.5, 9.0])
    attack_with, judge, calls = _toy({"a": 1.0, "b": 2.0, "c": 3.0}, need)
    out = run_ensemble(ms, attack_with, judge, 4)
    assert calls == [("a", [0, 1, 2, 3]), ("b", [1, 2, 3]), ("c", [2, 3])]
    assert out["spoofed_by"] == [0, 1, 2, -1]
    # input 3 is never spoofed: the best-ranked attempt (the strongest) is what is recorded
    assert out["member"] == [0, 1, 2, 2] and out["record"]["nested"]["v"] == [1.0, 2.0, 3.0, 3.0]
    assert out["x_adv"][:, 0].tolist() == [1.0, 2.0, 3.0, 3.0] and out["ran"] == [4, 3, 2]


def test_members_cheapest_first_and_detector_only_rows():
    std = members("standard", has_detector=False, random_map=True)
    assert [m.cost(True) for m in std] == sorted(m.cost(True) for m in std)
    assert not any(m.detector_only for m in std) and any(m.detector_only for m in members("standard", True, False))
    assert members("quick", True, True) == [LEVELS["quick"][0]]
    with pytest.raises(AttackError, match="attack strength must be one of"):
        members("huge", False, False)


def _ens(spoofed_by, costs):
    return {"count": [len(costs)], "names": [f"m{j}" for j in range(len(costs))], "costs": costs,
            "seconds": [0.0] * len(costs), "ran": [len(spoofed_by)] * len(costs), "spoofed_by": spoofed_by}


def test_convergence_status():
    n = 40
    # the ×4 member still spoofs 12 more inputs than everything cheaper: not converged
    c = convergence(_ens([0] * 10 + [2] * 12 + [-1] * 18, [1, 2, 4]), n)
    assert c["status"] == "not converged" and c["curve"][-1]["spoofed"]["k"] == 22
    # one more input at ×4: inside the cheaper members' interval
    c = convergence(_ens([0] * 10 + [1] * 5 + [2] + [-1] * 24, [1, 2, 4]), n)
    assert c["status"] == "converged" and c["worst_member"] == "m0"
    assert convergence(_ens([0] * 3 + [-1] * 37, [1]), n)["status"] == "unchecked"
    assert convergence(None, n)["status"] == "unchecked"


def _summary(base_k, d_k, n, status):
    conv = {"status": status, "reason": "test"}
    return {"spoofability": rate(base_k, n), "adv2": {"asr": rate(n, n)}, "convergence": conv,
            "spoofability_squeeze": rate(d_k, n),
            "defense_info": {"squeeze": {"asr": rate(n, n), "fpr_heldout": 0.05, "convergence": conv,
                                         "fpr_heldout_rate": rate(10, 200)}}}


def test_verdict_credits_only_converged_rows():
    v = compare(_summary(90, 10, 100, "converged"), ["squeeze"], 0.05)["verdict"]
    assert v["best"] == "squeeze" and v["helps"] and v["credited"]
    for status, words in (("not converged", "NOT CONVERGED"), ("unchecked", "attack strength quick")):
        v = compare(_summary(90, 10, 100, status), ["squeeze"], 0.05)["verdict"]
        assert v["best"] is None and not v["credited"] and words in v["text"], v["text"]


def test_a_short_attack_is_found_out_by_the_ensemble(tmp_path: Path):
    """A deliberately tiny schedule (÷80) leaves undefended GRAD looking hard to spoof under the quick attack;
    the standard ensemble (longer schedules, other steps) finds far more, and marks that row NOT CONVERGED
    (its ×4 member still gains); the quick run credits nothing."""
    from underfire.audit.aggregate import headline
    from underfire.audit.config import AuditConfig, Target
    from underfire.audit.runner import run_audit

    out = {}
    for strength in ("quick", "standard"):
        t = Target(model="fmnist_resnet", interpreters=["grad"], n=8, shorten=80, defenses=["squeeze"],
                   attack_strength=strength)
        r = run_audit(AuditConfig(name=strength, targets=[t], batch_size=8, bootstrap=50, examples=1),
                      tmp_path / strength)
        out[strength] = r
    a_q, a_s = (out[s]["targets"]["fmnist_resnet@fashion-mnist"]["summary"]["interpreters"]["grad"]
                for s in ("quick", "standard"))
    assert a_s["spoofability"]["k"] > a_q["spoofability"]["k"] + 2, (a_q["spoofability"], a_s["spoofability"])
    assert a_s["convergence"]["status"] == "not converged", a_s["convergence"]
    assert all(r["convergence"]["status"] == "unchecked" for r in a_q["comparison"]["rows"])
    assert not a_q["comparison"]["verdict"]["credited"]
    # the not-converged undefended row is a lower bound: no gate may pass on it
    assert any("NOT CONVERGED" in x for x in headline(out["standard"]["targets"])["lower_bound"])
    # every spoofed input is credited to the member that first spoofed it, and the merged record agrees
    ens = out["standard"]["targets"]["fmnist_resnet@fashion-mnist"]["records"]["interpreters"]["grad"]["adv2"]["ensemble"]
    assert sum(s >= 0 for s in ens["spoofed_by"]) == a_s["spoofability_by"]["adv2"]["k"]
