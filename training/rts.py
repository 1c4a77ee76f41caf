"""Training the RTS interpreter (Dabkowski & Gal 2017) for a classifier, and measuring its quality.

Per image with class c and mask M (upsampled to the input), perturbation blur(x):

    preserved = x ⊙ M + blur(x) ⊙ (1 − M)          destroyed = x ⊙ (1 − M) + blur(x) ⊙ M
    loss = λ_d · p(c | destroyed) + λ_a · mean(M)^0.3 + λ_s · TV(M) + λ_p · CE(f(preserved), c)

With probability ``fake_prob`` the class fed to the selector is a wrong one; then only the area and
smoothness terms apply (the mask for a class that is not there should be empty), which teaches the
selector to matter. Two phases: the class selector alone, then selector + upsampler; the encoder (the
classifier) stays frozen throughout.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from underfire.guard.interpreters.mask import default_blur_sigma, gaussian_blur
from underfire.guard.interpreters.base import preserved_state
from underfire.guard.interpreters.rts import RTS
from underfire.training.loop import TrainConfig, run


@dataclass
class RTSConfig(TrainConfig):
    epochs: int = 3  # phase 2 (selector + upsampler)
    phase1_epochs: int = 1  # selector only
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    area: float = 1.0
    area_power: float = 0.3
    smooth: float = 0.5
    preserve: float = 0.3
    destroy: float = 1.0  # weight of p(c | destroyed)
    fake_prob: float = 0.3
    width: int = 64
    limit: int | None = None  # training images used (None: all); recorded with the checkpoint


def _tv(m: torch.Tensor) -> torch.Tensor:
    """Per-image mean squared total variation. m: (B, 1, h, w) -> (B,)."""
    return ((m[..., 1:, :] - m[..., :-1, :]) ** 2).flatten(1).mean(1) + \
        ((m[..., :, 1:] - m[..., :, :-1]) ** 2).flatten(1).mean(1)


def perturb(x: torch.Tensor, mask: torch.Tensor, keep: bool) -> torch.Tensor:
    """Keep x where the (upsampled) mask is on and blur elsewhere (keep=True), or the reverse."""
    m = F.interpolate(mask, size=x.shape[-2:], mode="bilinear", align_corners=False)  # (B, 1, H, W)
    xb = gaussian_blur(x, default_blur_sigma(x.shape[-2]))
    return x * m + xb * (1 - m) if keep else x * (1 - m) + xb * m


def rts_loss(interp: RTS, x: torch.Tensor, y: torch.Tensor, cfg: RTSConfig,
             gen: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
    """The RTS training objective on a batch (mean over images) and its parts for logging."""
    k = interp.model.num_classes
    fake = torch.rand(len(y), generator=gen) < cfg.fake_prob
    shift = torch.randint(1, k, (len(y),), generator=gen)
    c = torch.where(fake, (y.cpu() + shift) % k, y.cpu()).to(y.device)
    fake = fake.to(y.device)
    with torch.set_grad_enabled(interp.encoder_trains()):  # own encoder: trained
        taps, _ = interp.encode(x)
    mask = interp.net(taps, c)  # (B, 1, h, w)
    area = mask.flatten(1).mean(1)
    reg = cfg.area * (area + 5e-4).pow(cfg.area_power) + cfg.smooth * _tv(mask)
    p_destroy = interp.model(perturb(x, mask, keep=False)).softmax(1).gather(1, c[:, None]).squeeze(1)
    ce_keep = F.cross_entropy(interp.model(perturb(x, mask, keep=True)), c, reduction="none")
    real = cfg.destroy * p_destroy + cfg.preserve * ce_keep
    loss = (reg + torch.where(fake, torch.zeros_like(real), real)).mean()
    logs = {"area": area[~fake].mean().detach(), "p_destroy": p_destroy[~fake].mean().detach(),
            "ce_keep": ce_keep[~fake].mean().detach()}
    return loss, logs


def train_rts(model, dataset: TensorDataset, cfg: RTSConfig, device: str = "cpu",
              progress: Callable[[dict], None] | None = None, interp: RTS | None = None,
              loss: Callable = rts_loss) -> tuple[RTS, dict]:
    """Train an RTS saliency network for ``model`` (frozen) on ``dataset``; returns it and a checkpoint dict.

    ``interp`` continues training an existing RTS (fine-tuning); ``loss(interp, x, y, cfg, gen)`` replaces
    the objective (RTS^A in training/rts_adv.py adds its robustness term this way).
    """
    torch.manual_seed(cfg.seed)
    interp = interp or RTS.untrained(model, cfg.width)
    interp.to(device)
    with preserved_state(model):  # the encoder is frozen for training and given back as it came
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        seconds = _fit(interp, dataset, cfg, device, progress, loss)
    net = interp.net
    ck = {
        "kind": "rts", "model": model.name, "tap_channels": net.tap_channels, "num_classes": net.num_classes,
        "width": net.width, "balance": net.balance, "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "config": cfg.to_dict(),
        **({} if interp.encoder is None else
           {"encoder_state_dict": {k: v.detach().cpu() for k, v in interp.encoder.net.state_dict().items()}}),
        "metrics": {"train_seconds": round(seconds, 1), "threads": torch.get_num_threads(),
                    "machine": platform.machine(), "torch": str(torch.__version__)},
    }
    return interp, ck


def _fit(interp: RTS, dataset, cfg: RTSConfig, device, progress, loss: Callable = rts_loss) -> float:
    """The two phases: class selector alone, then selector + upsampler. Returns training seconds."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    net = interp.net
    net.train()

    def step(_module, batch):
        return loss(interp, batch[0], batch[1], cfg, gen)

    seconds = 0.0
    phases = [(cfg.phase1_epochs, list(net.selector.parameters())),
              (cfg.epochs, list(net.parameters()) + interp.encoder_params())]  # + an own encoder (RTS^A)
    for epochs, params in phases:
        if epochs <= 0:
            continue
        pcfg = TrainConfig(epochs=epochs, batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay,
                           seed=cfg.seed, log_every=cfg.log_every, threads=cfg.threads)
        seconds += run(net, params, step, dataset, pcfg, device=device, progress=progress)["seconds"]
    net.eval()
    return seconds


@torch.no_grad()
def rts_quality(interp, dataset: TensorDataset, batch_size: int = 250, limit: int | None = None,
                per_class: bool = False) -> dict:
    """Clean accuracy, accuracy on the preserved and on the destroyed input, and mean mask area; with
    ``per_class`` also, per true class, the mean mask area and the accuracy on the wholly blurred input (what
    a mask can at most destroy).

    Works for any interpreter whose saliency says where the evidence is (higher = keep).
    """
    x_all, y_all = dataset.tensors
    if limit is not None:
        x_all, y_all = x_all[:limit], y_all[:limit]
    dev = next(interp.model.parameters()).device
    n = clean = kept = destroyed = 0
    area = 0.0
    classes: dict[int, list[float]] = {}  # class → [count, area sum, correct on the blurred input]
    for i in range(0, len(x_all), batch_size):
        x, y = x_all[i:i + batch_size].to(dev), y_all[i:i + batch_size].to(dev)
        e = interp(x, y)
        m = e.saliency
        clean += int((e.logits.argmax(1) == y).sum())
        kept += int((interp.model(perturb(x, m, keep=True)).argmax(1) == y).sum())
        destroyed += int((interp.model(perturb(x, m, keep=False)).argmax(1) == y).sum())
        areas = F.interpolate(m, size=x.shape[-2:], mode="bilinear", align_corners=False).mean((1, 2, 3))
        area += float(areas.sum())
        n += len(y)
        if per_class:
            blurred = interp.model(perturb(x, torch.zeros_like(m), keep=True)).argmax(1) == y
            for c in y.unique().tolist():
                sel = y == c
                acc = classes.setdefault(int(c), [0, 0.0, 0])
                acc[0] += int(sel.sum())
                acc[1] += float(areas[sel].sum())
                acc[2] += int(blurred[sel].sum())
    out = {"n": n, "clean_acc": clean / n, "preserved_acc": kept / n, "destroyed_acc": destroyed / n,
           "area": area / n}
    if per_class:
        out["per_class"] = {str(c): {"n": k, "area": a / k, "blurred_acc": b / k}
                            for c, (k, a, b) in sorted(classes.items())}
    return out
