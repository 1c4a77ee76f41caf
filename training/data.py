"""Datasets: Fashion-MNIST (Debian package or torchvision download), the bundled real photos, ImageFolder trees.

Every loader returns images as float tensors in [0, 1], shape (C, H, W); the model owns normalisation.
"""

from __future__ import annotations

import gzip
import logging
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, TensorDataset
from underfire.guard.errors import UnderfireError

log = logging.getLogger(__name__)

FMNIST_DIRS = (Path("/usr/share/datasets/fashion-mnist"),)
PHOTO_DIR = Path(__file__).resolve().parent / "photos"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


class DataError(UnderfireError):
    """A dataset cannot be found or read; the message names the problem and the fix."""


# --------------------------------------------------------------------------------------------------------
# Fashion-MNIST
# --------------------------------------------------------------------------------------------------------
def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzipped) as a numpy array (the format Fashion-MNIST ships in)."""
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise DataError(f"{path} is truncated: header says {dims}, found {arr.size} bytes")
    return arr.reshape(dims)


def _fmnist_from_dir(root: Path, split: str) -> tuple[np.ndarray, np.ndarray] | None:
    prefix = "train" if split == "train" else "t10k"
    img, lab = root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"
    if img.is_file() and lab.is_file():
        return _read_idx(img), _read_idx(lab)
    return None


def _fmnist_from_torchvision(split: str) -> tuple[np.ndarray, np.ndarray]:
    from torchvision.datasets import FashionMNIST

    cache = Path(os.environ.get("UNDERFIRE_DATA", Path.home() / ".cache" / "underfire"))
    ds = FashionMNIST(str(cache), train=split == "train", download=True)
    return ds.data.numpy(), ds.targets.numpy()


def fashion_mnist(split: str = "test", limit: int | None = None) -> TensorDataset:
    """The real Fashion-MNIST set: (N, 1, 28, 28) float32 in [0, 1] and int64 labels.

    Looks in ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``), then
    ``$UNDERFIRE_FMNIST_DIR``, then tries torchvision's download.

    Args:
        split: "train" (60k) or "test" (10k).
        limit: keep only the first ``limit`` images.
    """
    if split not in ("train", "test"):
        raise DataError(f"Fashion-MNIST split must be 'train' or 'test', not {split!r}")
    dirs = list(FMNIST_DIRS)
    if os.environ.get("UNDERFIRE_FMNIST_DIR"):
        dirs.insert(0, Path(os.environ["UNDERFIRE_FMNIST_DIR"]))
    found = next((r for r in (_fmnist_from_dir(d, split) for d in dirs) if r is not None), None)
    if found is None:
        try:
            log.warning("Fashion-MNIST not found in %s; trying torchvision's download", [str(d) for d in dirs])
            found = _fmnist_from_torchvision(split)
        except Exception as exc:
            raise DataError(
                "Fashion-MNIST is not available. Either install Debian's package "
                "(apt-get install dataset-fashion-mnist, files land in /usr/share/datasets/fashion-mnist) "
                f"or allow torchvision's download (it failed: {type(exc).__name__}: {exc})"
            ) from exc
    images, labels = found
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    x = torch.from_numpy(images.copy()).float().div_(255).unsqueeze(1)  # (N, 1, 28, 28)
    y = torch.from_numpy(labels.astype(np.int64))
    return TensorDataset(x, y)


# --------------------------------------------------------------------------------------------------------
# Image files: the bundled photos and ImageFolder trees
# --------------------------------------------------------------------------------------------------------
# Pillow modes whose samples are wider than 8 bits, with their full scale (PNG / TIFF 16-bit greyscale opens as
# I;16*, or as the 32-bit "I" mode, which here always carries 16-bit samples).
WIDE_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535}


def _eight_bit(im: Image.Image, path: Path) -> Image.Image:
    """``im`` as 8-bit "RGB" or "L" by its real range: 16-bit samples scaled (not clipped: Pillow's own
    ``convert("L")`` turns every value above 255 white), transparency flattened onto white, palette / CMYK /
    YCbCr through Pillow's conversions. Float images have no stated range and are refused."""
    if im.mode in WIDE_MODES:
        a = np.asarray(im).astype(np.float64)
        if a.size and (a.min() < 0 or a.max() > WIDE_MODES[im.mode]):
            raise DataError(f"image {path} holds {im.mode}-mode samples outside 0–{WIDE_MODES[im.mode]}: save it "
                            f"as an 8- or 16-bit image")
        return Image.fromarray(np.round(a * (255 / WIDE_MODES[im.mode])).astype(np.uint8), "L")
    if im.mode == "F":
        raise DataError(f"image {path} holds 32-bit float samples, whose range is not stated in the file: save "
                        f"it as an 8- or 16-bit image")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        flat.alpha_composite(rgba)
        return flat.convert("RGB")
    return im if im.mode in ("RGB", "L") else im.convert("RGB")


def load_image(path: str | os.PathLike, size: int | None = 224, channels: int = 3) -> torch.Tensor:
    """One image file as (C, size, size) in [0, 1]: converted to 8 bits by its real range (16-bit samples scaled,
    transparency flattened onto white), then the short side resized and the centre cropped.

    Raises:
        DataError: the file is missing, cannot be decoded as an image, is over Pillow's decompression-bomb
            limit, or holds samples whose range is not defined (float images).
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            im = _eight_bit(im, path).convert("RGB" if channels == 3 else "L")
            if size is not None:
                w, h = im.size
                s = size / min(w, h)
                im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BILINEAR)
                w, h = im.size
                left, top = (w - size) // 2, (h - size) // 2
                im = im.crop((left, top, left + size, top + size))
            arr = np.asarray(im, dtype=np.uint8)
    except FileNotFoundError as exc:
        raise DataError(f"image not found: {path}") from exc
    except Image.DecompressionBombError as exc:
        got = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(got[1]):,} pixels" if got else "too many pixels"
        raise DataError(f"image {path} has {size}, over Pillow's decompression-bomb limit of "
                        f"{2 * (Image.MAX_IMAGE_PIXELS or 0):,}: downscale it first") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"cannot decode image {path}: {exc}") from exc
    t = torch.from_numpy(arr.copy()).float().div_(255)
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)


def _image_files(folder: Path) -> list[Path]:
    """The image files directly in ``folder``, sorted; hidden entries (``.thumbnails``, ``._x.jpg``) skipped."""
    return sorted(p for p in folder.iterdir()
                  if not p.name.startswith(".") and p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def folder_kind(root: Path) -> str:
    """"plain" (images directly in ``root``, unlabelled) or "classes" (an ImageFolder tree: ``root/<class>/``).

    Hidden entries are skipped. A folder holding both images and subfolders is refused, naming both, and so is a
    folder named like an image (``x.png/``): which one the user meant cannot be guessed."""
    entries = [e for e in sorted(root.iterdir()) if not e.name.startswith(".")]
    odd = [e for e in entries if e.is_dir() and e.suffix.lower() in IMAGE_SUFFIXES]
    if odd:
        raise DataError(f"{odd[0]} is a folder named like an image file: rename it, or point --data at the images "
                        f"themselves")
    images = [e for e in entries if e.is_file() and e.suffix.lower() in IMAGE_SUFFIXES]
    dirs = [e for e in entries if e.is_dir()]
    if images and dirs:
        raise DataError(f"{root} holds both images ({images[0].name}{', ...' if len(images) > 1 else ''}) and "
                        f"subfolders ({', '.join(d.name + ('/ (a link)' if d.is_symlink() else '/') for d in dirs[:3])}"
                        f"{', ...' if len(dirs) > 3 else ''}): point --data at a folder of images or at an "
                        f"ImageFolder tree (root/<class>/<image>), not a mix")
    return "classes" if dirs else "plain"


def load_images(paths: Sequence[str | os.PathLike], size: int = 224, channels: int = 3) -> tuple[torch.Tensor, list[str]]:
    """Files and/or folders of images -> (N, C, size, size) in [0, 1] and their names."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = _image_files(p)
            if not found:
                raise DataError(f"folder {p} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
            files += found
        else:
            files.append(p)
    if not files:
        raise DataError("no images given")
    return torch.stack([load_image(f, size, channels) for f in files]), [f.stem for f in files]


def photos(size: int = 224) -> tuple[torch.Tensor, list[str]]:
    """The bundled real photos (see training/photos/SOURCES.md): (16, 3, size, size) in [0, 1]."""
    return load_images([PHOTO_DIR], size=size)


class ImageFolderDataset(Dataset):
    """An ImageFolder tree (root/<class>/<image>) yielding ((C, size, size) in [0, 1], label).

    Classes are the sorted subfolder names, as in torchvision's ImageFolder. Files are decoded lazily; a
    file that cannot be decoded raises :class:`DataError` naming it.
    """

    def __init__(self, root: str | os.PathLike, size: int = 224, channels: int = 3) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"ImageFolder root {self.root} is not a directory")
        self.classes = sorted(d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not self.classes:
            raise DataError(f"ImageFolder root {self.root} has no class subfolders (expected root/<class>/<image>)")
        self.samples = [(f, i) for i, c in enumerate(self.classes) for f in _image_files(self.root / c)]
        if not self.samples:
            raise DataError(f"ImageFolder root {self.root} has class folders but no image files")
        self.size, self.channels = size, channels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        return load_image(path, self.size, self.channels), label


def stack(ds: Dataset, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Materialise a (small) dataset as tensors (N, C, H, W), (N,)."""
    n = len(ds) if limit is None else min(limit, len(ds))
    if n == 0:
        raise DataError("the dataset is empty")
    if isinstance(ds, TensorDataset):
        return ds.tensors[0][:n], ds.tensors[1][:n]
    xs, ys = zip(*(ds[i] for i in range(n)))
    return torch.stack(xs), torch.as_tensor(ys)
