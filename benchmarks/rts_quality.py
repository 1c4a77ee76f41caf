"""RTS quality per Fashion-MNIST class, kept as a record (docs/models.md quotes it through benchmarks/docs.py).

    .venv/bin/python benchmarks/rts_quality.py --model fmnist_resnet

Runs training.rts.rts_quality with per_class=True on the 10k test images with the bundled RTS of the model:
per class the mean mask area and the accuracy on the wholly blurred image (what a mask can at most destroy).
Writes benchmarks/results/rts_quality_<model>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from underfire.guard.registry import build_interpreter  # noqa: E402
from underfire.guard.models import FMNIST_CLASSES, load_model  # noqa: E402
from underfire.training.data import fashion_mnist  # noqa: E402
from underfire.training.rts import rts_quality  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="fmnist_resnet")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    interp = build_interpreter("rts", load_model(a.model))
    with torch.no_grad():
        q = rts_quality(interp, fashion_mnist("test"), per_class=True)
    for c, v in q["per_class"].items():
        v["name"] = FMNIST_CLASSES[int(c)]
    out = ROOT / "benchmarks" / "results" / f"rts_quality_{a.model}.json"
    out.write_text(json.dumps({"kind": "rts_quality", "model": a.model, **q,
                               "machine": f"cpu ({platform.machine()}), {a.threads} thread(s)",
                               "torch": torch.__version__, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
                               "command": f"python benchmarks/rts_quality.py --model {a.model}"}, indent=1) + "\n")
    for c, v in q["per_class"].items():
        print(f"{v['name']:12s} area {v['area']:.2f}  blurred acc {v['blurred_acc']:.0%}")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
