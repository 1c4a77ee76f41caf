"""The ``underfire`` command line: thin commands over the library.

Every known failure (unknown model, missing weights, corrupt checkpoint, undecodable image, empty folder,
bad tensor) ends as one ``Error: ...`` line and exit status 1; nothing half-written is left behind.
"""

from __future__ import annotations

import functools
import logging
import sys
import time
from pathlib import Path

import click
import torch

from guard.interpreters.base import InterpreterError
from guard.models import ModelError, list_models, load_model, save_checkpoint
from training.data import DataError

KNOWN_ERRORS = (ModelError, DataError, InterpreterError, ValueError, FileNotFoundError)


def friendly(fn):
    """Turn the library's known errors into one clear line and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KNOWN_ERRORS as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper


def _echo_progress(p: dict) -> None:
    eta = p["elapsed"] / p["step"] * (p["steps"] - p["step"])
    extra = " ".join(f"{k}={v:.3f}" for k, v in p.get("logs", {}).items())
    click.echo(f"  epoch {p['epoch']}/{p['epochs']} step {p['step']}/{p['steps']} loss {p['loss']:.4f} {extra}"
               f" [{p['elapsed']:.0f}s, eta {eta:.0f}s]", err=True)


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log the library's info messages.")
def main(verbose: bool) -> None:
    """underfire: audit interpretable models (classifier + interpreter) against ADV² and harden them."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@main.command("models")
def models_cmd() -> None:
    """List the bundled models."""
    for name, desc in list_models().items():
        click.echo(f"{name:20s} {desc}")


@main.command()
@click.argument("images", nargs=-1, type=click.Path(path_type=Path))
@click.option("--model", "model_name", default="mobilenet_v2", show_default=True,
              help="Bundled name, torchvision:<arch>, a .pt checkpoint, or module:function.")
@click.option("--weights", default=None, help="With torchvision:<arch>: weights enum name or a state_dict file.")
@click.option("-k", "--top", default=5, show_default=True, help="How many classes to print.")
@friendly
def predict(images: tuple[Path, ...], model_name: str, weights: str | None, top: int) -> None:
    """Print the top-k classes of IMAGES (files or folders; default: the bundled real photos)."""
    from training.data import load_images, photos

    model = load_model(model_name, weights)
    c, h, _ = model.input_size
    x, names = load_images(images, size=h, channels=c) if images else photos(size=h)
    with torch.no_grad():
        probs = model(x).softmax(1)
    if not torch.isfinite(probs).all():
        raise ModelError(f"model {model.name} produced NaN/inf outputs")
    cats = model.categories or [str(i) for i in range(probs.shape[1])]
    p, idx = probs.topk(min(top, probs.shape[1]), dim=1)
    for n, pi, ii in zip(names, p, idx):
        click.echo(f"{n}:")
        for pv, iv in zip(pi.tolist(), ii.tolist()):
            click.echo(f"  {pv:6.1%}  {cats[iv]}")


@main.command()
@click.argument("images", nargs=-1, type=click.Path(path_type=Path))
@click.option("--model", "model_name", default="mobilenet_v2", show_default=True,
              help="Bundled name, torchvision:<arch>, a .pt checkpoint, or module:function.")
@click.option("--interpreters", "names", default="grad,cam,mask,rts", show_default=True,
              help="Comma-separated registry names; ones the model cannot support are skipped with a note.")
@click.option("-n", "--count", default=8, show_default=True, help="Fashion-MNIST test images (28x28 models).")
@click.option("--mask-steps", default=300, show_default=True, help="MASK optimisation steps (paper: 300).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/explain"), show_default=True)
@friendly
def explain(images, model_name, names, count, mask_steps, out) -> None:
    """Write PNG overlays of each interpreter's map on IMAGES (default: bundled photos or Fashion-MNIST)."""
    from audit.report import overlay_grid
    from guard.interpreters import build_interpreter
    from training.data import fashion_mnist, load_images, photos, stack

    model = load_model(model_name)
    c, h, _ = model.input_size
    if images:
        x, labels = load_images(images, size=h, channels=c)
    elif h == 28:
        x, y = stack(fashion_mnist("test"), limit=count)
        labels = [f"#{i} {model.categories[int(t)]}" for i, t in enumerate(y)]
    else:
        x, labels = photos(size=h)
    maps = {}
    for name in [n.strip() for n in names.split(",") if n.strip()]:
        kwargs = {"steps": mask_steps} if name == "mask" else {}
        try:
            interp = build_interpreter(name, model, **kwargs)
        except InterpreterError as exc:
            click.echo(f"skipping {name}: {exc}", err=True)
            continue
        click.echo(f"{name}: explaining {len(x)} images", err=True)
        t0 = time.time()
        e = interp(x)
        maps[name] = e.saliency
        click.echo(f"  {name} done in {time.time() - t0:.1f}s", err=True)
    if not maps:
        raise InterpreterError("no interpreter could explain this model")
    with torch.no_grad():
        probs = model(x).softmax(1)
    cats = model.categories or [str(i) for i in range(probs.shape[1])]
    titles = [f"{lab}\n-> {cats[int(k)]} {float(p):.0%}" for lab, p, k in zip(labels, *probs.max(1))]
    path = overlay_grid(x, maps, out / f"{model.name}.png", titles)
    click.echo(f"wrote {path}")


@main.group()
def train() -> None:
    """Train the small Fashion-MNIST classifiers and the RTS interpreters."""


@train.command("classifier")
@click.option("--arch", type=click.Choice(["small_resnet", "small_densenet"]), default="small_resnet", show_default=True)
@click.option("--epochs", default=6, show_default=True)
@click.option("--batch-size", default=128, show_default=True)
@click.option("--lr", default=3e-3, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Checkpoint file to write (.pt).")
@click.option("--device", default="cuda" if torch.cuda.is_available() else "cpu", show_default=True)
@friendly
def train_classifier_cmd(arch: str, epochs: int, batch_size: int, lr: float, seed: int, out: Path, device: str) -> None:
    """Train a 28×28 classifier on the real Fashion-MNIST training set and report test accuracy."""
    from training.classifier import ClassifierConfig, train_classifier

    cfg = ClassifierConfig(arch=arch, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
    click.echo(f"training {arch} on Fashion-MNIST (60k) for {epochs} epochs on {device}, "
               f"{torch.get_num_threads()} threads", err=True)
    t0 = time.time()
    _, ck = train_classifier(cfg, device=device, progress=_echo_progress)
    ck.save(out)
    click.echo(f"test top-1 {ck.metrics['test_top1']:.2%}; trained in {ck.metrics['train_seconds']:.0f}s "
               f"({time.time() - t0:.0f}s total); wrote {out}")


@train.command("rts")
@click.option("--model", "model_name", default="fmnist_resnet", show_default=True,
              help="Classifier to explain (its features are the frozen encoder).")
@click.option("--data", default="fashion-mnist", show_default=True,
              help="fashion-mnist, or an ImageFolder root (root/<class>/<image>) of the model's classes.")
@click.option("--epochs", default=3, show_default=True, help="Phase-2 epochs (selector + upsampler).")
@click.option("--phase1-epochs", default=1, show_default=True, help="Phase-1 epochs (class selector only).")
@click.option("--batch-size", default=64, show_default=True)
@click.option("--lr", default=2e-3, show_default=True)
@click.option("--area", default=1.0, show_default=True, help="Weight of the area term mean(M)^0.3.")
@click.option("--limit", default=None, type=int, help="Train on the first N training images only.")
@click.option("--seed", default=0, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Checkpoint file to write (.pt).")
@click.option("--device", default="cuda" if torch.cuda.is_available() else "cpu", show_default=True)
@friendly
def train_rts_cmd(model_name, data, epochs, phase1_epochs, batch_size, lr, area, limit, seed, out, device) -> None:
    """Train an RTS saliency network for a classifier and report its quality on held-out data."""
    from training.data import ImageFolderDataset, fashion_mnist, stack
    from training.rts import RTSConfig, rts_quality, train_rts
    from torch.utils.data import TensorDataset

    model = load_model(model_name)
    if data == "fashion-mnist":
        train_set, test_set = fashion_mnist("train"), fashion_mnist("test")
    else:
        full = ImageFolderDataset(data, size=model.input_size[1], channels=model.input_size[0])
        if len(full.classes) > model.num_classes:
            raise DataError(f"{data} has {len(full.classes)} class folders but model {model.name} has "
                            f"{model.num_classes} classes (folders must be in the model's class order)")
        x, y = stack(full)
        cut = max(1, len(y) // 10)
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
        test_set, train_set = TensorDataset(x[perm[:cut]], y[perm[:cut]]), TensorDataset(x[perm[cut:]], y[perm[cut:]])
    if limit is not None:
        train_set = TensorDataset(*(t[:limit] for t in train_set.tensors))
    cfg = RTSConfig(limit=limit, epochs=epochs, phase1_epochs=phase1_epochs, batch_size=batch_size, lr=lr, area=area, seed=seed)
    click.echo(f"training RTS for {model.name} on {data} ({len(train_set)} images) on {device}", err=True)
    interp, ck = train_rts(model, train_set, cfg, device=device, progress=_echo_progress)
    q = rts_quality(interp, test_set)
    ck["metrics"]["quality"] = q
    ck["metrics"]["data"] = data
    save_checkpoint(ck, out)
    click.echo(f"clean acc {q['clean_acc']:.2%}, preserved {q['preserved_acc']:.2%}, destroyed "
               f"{q['destroyed_acc']:.2%}, mean mask area {q['area']:.3f} on {q['n']} held-out images; "
               f"trained in {ck['metrics']['train_seconds']:.0f}s; wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
