"""benchmarks/results holds records, not a notebook: small, no pictures, every file read by a page, a script or
a test, and a slimmed record still renders and re-aggregates."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import ROOT

RESULTS = ROOT / "benchmarks" / "results"
READERS = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "benchmarks").glob("*.py"),
           *(ROOT / "benchmarks").glob("*.sh"), *(ROOT / "benchmarks" / "configs").glob("*.toml"),
           *(ROOT / "tests").glob("*.py"), ROOT / "dev"]


def _committed() -> list:
    out = subprocess.run(["git", "ls-files", "benchmarks/results"], cwd=ROOT, capture_output=True, text=True).stdout
    return [ROOT / p for p in out.split()]


def test_results_are_small_and_every_file_is_read():
    files = [f for f in _committed() if f.is_file()]
    assert sum(f.stat().st_size for f in files) < 10 * 2 ** 20
    text = "\n".join(p.read_text(errors="replace") for p in READERS if p.is_file())
    # a run's journal is read by --resume of its config; every other record by name
    unread = [str(f.relative_to(ROOT)) for f in files if "/journal/" not in f.as_posix()
              and f.name not in text and f.stem not in text and f.parent.name not in text]
    assert not unread, f"records nothing reads (move them to benchmarks/archive/): {unread}"


def test_committed_records_carry_no_pictures():
    r = subprocess.run([sys.executable, "benchmarks/slim.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_slimmed_record_still_renders_and_reaggregates():
    from underfire.audit.aggregate import reaggregate
    from underfire.audit.html import render_html

    report = json.loads((RESULTS / "defenses_fmnist_resnet_report.json").read_text())
    page = render_html(report)
    assert "pictures left out of the committed record" in page
    again = reaggregate(json.loads(json.dumps(report)))
    (key,) = report["targets"]
    assert again["targets"][key]["summary"]["interpreters"]["grad"]["spoofability"] == \
        report["targets"][key]["summary"]["interpreters"]["grad"]["spoofability"]
