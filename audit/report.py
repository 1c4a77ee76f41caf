"""Views: PNG figures rendered from tensors already computed (no model calls here)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def _img(x: torch.Tensor):
    x = x.detach().cpu().clamp(0, 1)
    return x[0].numpy() if x.shape[0] == 1 else x.permute(1, 2, 0).numpy()


def overlay_grid(
    images: torch.Tensor,
    maps: dict[str, torch.Tensor],
    path: str | os.PathLike,
    titles: Sequence[str] | None = None,
    cell: float = 2.0,
) -> Path:
    """One row per image: the image, then each interpreter's map (upsampled) over it.

    Args:
        images: (N, C, H, W) in [0, 1].
        maps: interpreter name -> saliency (N, 1, h, w) in [0, 1].
        path: PNG to write (written to a temporary name first, then moved into place).
        titles: a label per row (e.g. "chelsea: Egyptian cat 79%").
    """
    n = images.shape[0]
    names = list(maps)
    fig, axes = plt.subplots(n, 1 + len(names), figsize=(cell * (1 + len(names)), cell * n), squeeze=False)
    gray = images.shape[1] == 1
    for i in range(n):
        base = _img(images[i])
        axes[i, 0].imshow(base, cmap="gray" if gray else None, vmin=0, vmax=1)
        axes[i, 0].set_title(titles[i] if titles else "input", fontsize=7)
        for j, name in enumerate(names, 1):
            m = F.interpolate(maps[name][i:i + 1].detach().cpu().float(), size=images.shape[-2:],
                              mode="bilinear", align_corners=False)[0, 0].clamp(0, 1).numpy()
            axes[i, j].imshow(base, cmap="gray" if gray else None, vmin=0, vmax=1)
            axes[i, j].imshow(m, cmap="jet", alpha=0.5, vmin=0, vmax=1)
            if i == 0:
                axes[i, j].set_title(name.upper(), fontsize=9)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path
