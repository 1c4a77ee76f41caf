"""Progress of an audit: tqdm bars on a terminal (per target over batches, per attack over steps with ASR),
timestamped lines off it."""

from __future__ import annotations

import io
import re

from underfire.audit.progress import Progress
from underfire.audit.config import AuditConfig, Target
from underfire.audit.runner import run_audit


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _audit(tmp_path, progress):
    cfg = AuditConfig(name="p", batch_size=2, bootstrap=10, examples=0, targets=[
        Target("fmnist_resnet", interpreters=["cam"], n=4, attacks=["pgd", "adv2"], defenses=[], shorten=50)])
    return run_audit(cfg, tmp_path, progress=progress)


def test_bars_on_a_terminal_and_lines_elsewhere(tmp_path):
    term = _Terminal()
    p = Progress(term)
    assert p.bars and p.steps is not None
    _audit(tmp_path / "a", p)
    out = term.getvalue()
    assert re.search(r"fmnist_resnet@fashion-mnist: +100%\|.*\| 2/2 \[", out)  # the target's bar over its batches
    assert re.search(r"ADV²-CAM: .*\d+/\d+ \[.*ASR \d+%", out)  # an attack's bar with its steps and current ASR
    assert not re.search(r"^\[\d\d:\d\d:\d\d\]", out, re.M)  # no timestamped lines among the bars

    log = io.StringIO()  # a pipe or a file: lines, and the attacks read nothing back for progress
    p = Progress(log)
    assert not p.bars and p.steps is None
    _audit(tmp_path / "b", p)
    lines = log.getvalue().splitlines()
    assert lines and all(re.match(r"\[\d\d:\d\d:\d\d\] ", ln) for ln in lines)
    assert any("batch 2/2: ADV²-CAM" in ln for ln in lines) and "|" not in log.getvalue()
