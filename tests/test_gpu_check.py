"""benchmarks/gpu_check.sh runs on the GPU machine when one is lent; its --dry mode runs the same steps, tiny,
on the CPU here, so the script cannot rot between GPU sessions."""

from __future__ import annotations

import json
import subprocess

from tests.helpers import ENV, ROOT


def test_the_gpu_check_runs_dry_on_the_cpu(tmp_path):
    r = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry"], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env={**ENV, "OUT": str(tmp_path)})
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    for heading in ("gpu-marked tests", "step ratios: fmnist_resnet", "paper's CAM-ADV² schedule", "done"):
        assert f"=== {heading}" in r.stdout
    assert "| CAM-ADV² |" in r.stdout and "| squeeze-torch |" in r.stdout and "| cam | 20 |" in r.stdout
    rec = json.loads((tmp_path / "gpu_check_dry.json").read_text())
    assert rec["dry"] and rec["audit"]["verdicts_differing"] == 0 and rec["paper_cam_schedule"]["images"] == 4
    steps = json.loads((tmp_path / "gpu_check_step_cost_fmnist_resnet.json").read_text())
    assert {"pgd", "cam"} <= set(steps["rows"]) and steps["detectors"] and steps["blackbox"]
