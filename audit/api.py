"""underfire as a library: audit the objects a team holds, get a report object back.

    from underfire.audit import audit
    report = audit(model, ["grad", my_map], (x, y), n=32, eps=8)   # any nn.Module, maps, tensors
    print(report.headline)                                         # worst spoofability, its interval
    report.write_html("audit.html")

``audit`` runs the same audit as ``underfire audit`` (the CLI is a thin layer over :func:`run_in_folder`): the
same pre-flight checks refuse an untrained or probability-output model (:class:`AuditRefused`), the same
settings with the same checks, the same report. Objects are described in the report's config as
``python:<name>``; their weights and data are fingerprinted in the journal like any other.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import fields
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from underfire.audit.config import AuditConfig, AuditError, Target
from underfire.audit.deployment import SUPPLIED, Supplied
from underfire.audit.journal import config_diff
from underfire.audit.html import write_report
from underfire.audit.result import AuditReport
from underfire.audit.rundir import RunFolder, check_writable
from underfire.audit.runner import run_audit
from underfire.guard.interpreters.base import Interpreter
from underfire.guard.models import ImageClassifier
from underfire.training.data import stack
from underfire.training.loop import distributed_setup

RUN_SETTINGS = {f.name for f in fields(AuditConfig)} - {"targets"}
TARGET_SETTINGS = {f.name for f in fields(Target)} - {"model", "interpreters", "data"}


def audit(model: nn.Module | str, interpreters: Sequence | dict | str = ("grad", "cam"),
          data: str | os.PathLike | tuple | Dataset = "fashion-mnist", *, out: str | os.PathLike | None = None,
          resume: bool = False, overwrite: bool = False, progress: Callable[[str], None] | None = None,
          mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
          input_size: tuple[int, int, int] | None = None, categories: Sequence[str] | None = None,
          **settings) -> AuditReport:
    """Audit a deployment given as objects or names; returns the :class:`AuditReport`.

    Args:
        model: an ``ImageClassifier`` (takes [0, 1] images, normalises them itself), any ``nn.Module`` returning
            logits with its normalisation stated (``mean``, ``std``; ``mean=(0,), std=(1,)`` when it takes
            [0, 1] images as they are) and ``input_size`` unless ``data`` is tensors, or any name the CLI
            takes (bundled name, ``torchvision:<arch>`` with ``weights=``, ``file.pt``, ``module:function``).
        interpreters: registry names (``"grad"``, ``"smooth:cam"``, ...), ``Interpreter`` objects of this model,
            callables ``(x, target) -> map`` (B, 1, h, w) or (B, h, w), or a dict {name: any of these}.
        data: a name (``fashion-mnist``, ``photos``), a folder, an ``(x, y)`` pair of tensors (x (N, C, H, W)
            in [0, 1]; y (N,) class indices, or None: the model's predictions are the classes), or a torch
            ``Dataset`` of (image, label) pairs.
        out: a folder to keep the run in (``out/<name>``: journal, report.json, report.html; ``resume`` picks
            an interrupted run up); None: a temporary folder, removed afterwards.
        settings: the config's own keys — run settings (``batch_size``, ``seed``, ``fpr``, ``device``,
            ``name``, ...) and target settings (``n``, ``eps``, ``attacks``, ``defenses``, ``attack_strength``,
            ``weights``, ``outputs``, ...); see ``underfire audit --help`` and docs/audit.md.

    Raises:
        AuditError: a setting, model, interpreter or dataset the audit cannot use (the message says which);
        AuditRefused (an AuditError, exit_code 4): a deployment it cannot measure (untrained, probabilities,
        no gradient).
    """
    unknown = set(settings) - RUN_SETTINGS - TARGET_SETTINGS
    if unknown:
        raise AuditError(f"unknown audit settings {sorted(unknown)}; run settings: {sorted(RUN_SETTINGS)}; "
                         f"target settings: {sorted(TARGET_SETTINGS)}")
    supplied = Supplied()
    data_spec = _data(data, supplied)
    model_spec = _model(model, supplied, mean, std, input_size, categories)
    names = _interpreters(interpreters, supplied)
    target = {"model": model_spec, "interpreters": names, "data": data_spec,
              **{k: v for k, v in settings.items() if k in TARGET_SETTINGS}}
    run = {k: v for k, v in settings.items() if k in RUN_SETTINGS}
    run.setdefault("name", "audit")
    cfg = AuditConfig.from_dict({**run, "targets": [target]})
    cfg.validate()
    key = cfg.targets[0].key()
    objects = {key: supplied} if supplied.used else None
    if out is None:
        with tempfile.TemporaryDirectory(prefix="underfire-") as tmp:
            report = run_audit(cfg, Path(tmp) / cfg.name, progress=progress, supplied=objects)
    else:
        report = run_in_folder(cfg, Path(out) / cfg.name, resume, overwrite, progress, objects)
    if report is None:  # a rank > 0 of a torchrun job: rank 0 holds the report
        return None
    return AuditReport(report)


def run_in_folder(cfg: AuditConfig, run_dir: Path, resume: bool = False, overwrite: bool = False,
                  progress: Callable[[str], None] | None = None, supplied: dict | None = None) -> dict | None:
    """Run an audit in ``run_dir`` (locked; ``overwrite`` swaps the new run in only once it has finished;
    ``resume`` refuses another configuration's folder) and write report.json / report.html there. Returns
    the report dict on rank 0, None on the other ranks of a torchrun job."""
    check_writable(run_dir.parent)
    rank, _ = distributed_setup()  # the process group's rank, never a bare RANK variable's
    resolved = cfg.to_dict()
    with RunFolder(run_dir, resume, overwrite, lock=rank == 0) as rf:
        cfg_file = rf.work / "config.json"
        if rank == 0:
            if resume:
                saved = json.loads(cfg_file.read_text())
                if diff := config_diff(_flat(saved), _flat(resolved)):
                    raise AuditError(f"{run_dir} was started with another configuration ({'; '.join(diff)}): resume it "
                                     f"with the same settings, or --overwrite")
            tmp = cfg_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(resolved, indent=1))
            os.replace(tmp, cfg_file)
        else:
            for _ in range(600):  # wait for rank 0 to set the folder up
                if cfg_file.is_file():
                    break
                time.sleep(0.1)
        report = run_audit(cfg, rf.work, resume=resume, progress=progress, supplied=supplied)
        if report is None:
            return None
        write_report(report, rf.work)
        rf.commit()
    return report


def _flat(c: dict) -> dict:
    """A config as flat 'key' / 'targets[i].key' settings, for comparing a resumed run's (device and compile
    may change between sessions)."""
    return {**{k: v for k, v in c.items() if k not in ("targets", "device", "compile")},
            **{f"targets[{i}].{k}": v for i, t in enumerate(c["targets"]) for k, v in t.items()}}


def _model(model, supplied: Supplied, mean, std, input_size, categories) -> str:
    if isinstance(model, (str, os.PathLike)):
        if any(v is not None for v in (mean, std, input_size, categories)):
            raise AuditError("mean, std, input_size and categories describe an nn.Module; a model given by name "
                             "carries its own")
        return str(model)
    if isinstance(model, ImageClassifier):
        supplied.model = model
    elif isinstance(model, nn.Module):
        if mean is None or std is None:
            raise AuditError(f"state how {type(model).__name__} normalises its input: audit(model, ..., mean=..., "
                             f"std=...) per channel (mean=(0,), std=(1,) when it takes [0, 1] images as they are), "
                             f"or hand over an underfire.guard.ImageClassifier")
        size = input_size or (tuple(supplied.data[0].shape[1:]) if supplied.data is not None else None)
        if size is None:
            raise AuditError(f"state the input size of {type(model).__name__}: audit(..., input_size=(C, H, W)) "
                             f"(it is taken from the data when the data are tensors)")
        supplied.model = ImageClassifier(model, mean, std, name=type(model).__name__, input_size=tuple(size),
                                         categories=categories)
    else:
        raise AuditError(f"model must be an nn.Module or a model name, not {type(model).__name__}")
    return f"{SUPPLIED}{supplied.model.name}"


def _interpreters(interpreters, supplied: Supplied) -> list[str]:
    if isinstance(interpreters, str):
        interpreters = [n.strip() for n in interpreters.split(",") if n.strip()]
    items = list(interpreters.items()) if isinstance(interpreters, dict) else [(None, it) for it in interpreters]
    names = []
    for name, it in items:
        if isinstance(it, str) and name is None:
            names.append(it)
            continue
        if not (isinstance(it, Interpreter) or callable(it)):
            raise AuditError(f"an interpreter is a name, an Interpreter or a callable (x, target) -> map, not "
                             f"{type(it).__name__}")
        name = name or (it.name if isinstance(it, Interpreter) else getattr(it, "__name__", None))
        if not name or name == "<lambda>":
            raise AuditError("name this interpreter: pass a dict {name: interpreter} (a lambda has no name)")
        supplied.interpreters[name] = it
        names.append(name)
    if len(set(names)) != len(names):
        raise AuditError(f"interpreter names must differ, got {names}")
    if not names:
        raise AuditError("no interpreters to audit")
    return names


def _data(data, supplied: Supplied) -> str:
    if isinstance(data, (str, os.PathLike)):
        return str(data)
    if isinstance(data, Dataset):
        x, y = stack(data)
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = data
    else:
        raise AuditError(f"data must be a name, a folder, an (x, y) pair of tensors or a torch Dataset, not "
                         f"{type(data).__name__}")
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
        raise AuditError(f"data x must be a float tensor (N, C, H, W) of images in [0, 1], got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    if not torch.isfinite(x).all() or float(x.min()) < 0 or float(x.max()) > 1:
        raise AuditError("data x must be images in [0, 1] (the model normalises them itself), finite")
    if y is not None:
        y = torch.as_tensor(y)
        if y.shape != (len(x),) or y.is_floating_point():
            raise AuditError(f"data y must hold one class index per image, shape ({len(x)},), got "
                             f"{tuple(y.shape)} {y.dtype}")
        y = y.long()
    supplied.data = (x.detach().float(), y)
    return f"{SUPPLIED}tensors"
