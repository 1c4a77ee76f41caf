"""One readable training loop, used for the classifiers and the RTS interpreters.

The loop knows nothing about what it trains: a ``step(batch) -> (loss, logs)`` closure computes the loss.
It is DDP-ready: launched under ``torchrun`` (RANK/WORLD_SIZE set) it initialises torch.distributed
(NCCL on GPU, gloo on CPU), wraps the trainable module in DistributedDataParallel and shards the data
with a DistributedSampler; rank 0 logs.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from underfire.guard.errors import UnderfireError
from underfire.training.data import DataError

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    epochs: int = 5
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 5e-4
    seed: int = 0
    log_every: int = 100
    threads: int | None = None  # torch.set_num_threads; None keeps torch's default

    def to_dict(self) -> dict:
        return asdict(self)


LAUNCH_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class LaunchError(UnderfireError):
    """The environment claims a distributed run (torchrun's variables) that cannot be joined."""


def distributed_setup() -> tuple[int, int]:
    """Initialise torch.distributed when launched by torchrun; returns (rank, world_size) of the process group.

    A process is distributed only when a group forms: variables that claim a distributed run without what
    torchrun sets with them (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, a rank below the world size), or a group
    that cannot be joined, raise :class:`LaunchError`, so that no stray ``RANK`` in an environment makes a
    process act as a worker of a job that does not exist (unlocked, in a folder it did not set up)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    claimed = [v for v in (*LAUNCH_VARS, "LOCAL_RANK") if v in os.environ]
    if not claimed:
        return 0, 1
    missing = [v for v in LAUNCH_VARS if not os.environ.get(v)]
    fix = "launch it with torchrun, or unset them"
    if missing:
        raise LaunchError(f"the environment claims a distributed run ({', '.join(claimed)} set) but lacks "
                          f"{', '.join(missing)}: {fix}")
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except ValueError:
        raise LaunchError(f"RANK and WORLD_SIZE must be integers, got {os.environ['RANK']!r} and "
                          f"{os.environ['WORLD_SIZE']!r}: {fix}") from None
    if not 0 <= rank < world:
        raise LaunchError(f"RANK {rank} is not below WORLD_SIZE {world}: {fix}")
    from datetime import timedelta

    timeout = timedelta(seconds=float(os.environ.get("UNDERFIRE_DIST_TIMEOUT", 600)))
    try:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timeout)
    except Exception as exc:  # noqa: BLE001 (rendezvous errors come in many types)
        raise LaunchError(f"could not join the distributed run that RANK={rank} WORLD_SIZE={world} MASTER_ADDR="
                          f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} claim ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:200] if str(exc) else ''}): {fix}") from None
    return dist.get_rank(), dist.get_world_size()


def run(
    module: nn.Module,
    params: Iterable[nn.Parameter],
    step: Callable[[nn.Module, tuple], tuple[torch.Tensor, dict]],
    dataset: Dataset,
    cfg: TrainConfig,
    device: torch.device | str = "cpu",
    progress: Callable[[dict], None] | None = None,
) -> dict:
    """Train ``module`` for ``cfg.epochs`` with AdamW + a one-cycle schedule.

    Args:
        module: what is trained (its trainable parameters are ``params``); moved to ``device``.
        step: ``step(module_or_ddp, batch) -> (loss, logs)``; batch tensors are already on ``device``.
        dataset: yields tuples of tensors.
        progress: called with a dict (epoch, step, loss, logs, elapsed) every ``cfg.log_every`` steps.

    Returns:
        {"seconds": ..., "steps": ..., "final_loss": ...}
    """
    if len(dataset) == 0:
        raise DataError("training dataset is empty")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rank, world = distributed_setup()
    module.to(device)
    model: nn.Module = module
    if world > 1:
        model = nn.parallel.DistributedDataParallel(module, device_ids=None if str(device) == "cpu" else [device])
    sampler = DistributedSampler(dataset, shuffle=True, seed=cfg.seed) if world > 1 else None
    gen = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler,
                        generator=gen, drop_last=True)
    params = [p for p in params if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = cfg.epochs * len(loader)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(total, 1), pct_start=0.15)
    t0, it, loss = time.time(), 0, torch.tensor(math.nan)
    for epoch in range(cfg.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        for batch in loader:
            batch = tuple(b.to(device, non_blocking=True) for b in batch)
            loss, logs = step(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            it += 1
            if progress is not None and rank == 0 and (it % cfg.log_every == 0 or it == total):
                progress({"epoch": epoch + 1, "epochs": cfg.epochs, "step": it, "steps": total,
                          "loss": float(loss.detach()), "logs": {k: float(v) for k, v in logs.items()},
                          "elapsed": time.time() - t0})
    return {"seconds": time.time() - t0, "steps": it, "final_loss": float(loss.detach()), "world_size": world}
