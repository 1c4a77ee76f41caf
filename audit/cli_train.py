"""``underfire train``: the bundled classifiers and the RTS / RTS^A saliency nets, from the command line."""

from __future__ import annotations

import time
from pathlib import Path

import click
import torch
from underfire.guard.models import load_model
from underfire.guard.weights import save_checkpoint
from underfire.training.data import DataError

from underfire.audit.cli_common import _echo_progress, friendly


@click.group()
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
    from underfire.training.classifier import ClassifierConfig, train_classifier

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
@click.option("--destroy", default=1.0, show_default=True, help="Weight of p(class | destroyed input).")
@click.option("--fake-prob", default=0.3, show_default=True,
              help="Share of images whose selector gets a wrong class (their mask should be empty).")
@click.option("--limit", default=None, type=int, help="Train on the first N training images only.")
@click.option("--adversarial", is_flag=True,
              help="Train RTS^A: fine-tune an RTS with attacked inputs (PGD / ADV²-RTS) made on the fly.")
@click.option("--start", "start", default=None, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="RTS checkpoint to start from (--adversarial; default: the bundled RTS of the model).")
@click.option("--eps", default=24 / 255, show_default="24/255", help="Attack budget for --adversarial.")
@click.option("--repel-weight", default=0.0, show_default=True,
              help="--adversarial: weight of the term that keeps the attacked map away from the attacker's target.")
@click.option("--repel-margin", default=0.5, show_default=True, help="--adversarial: that term's margin (mean L1).")
@click.option("--adv-weight", default=2.0, show_default=True,
              help="--adversarial: weight of the term keeping attacked maps at the benign maps.")
@click.option("--own-encoder", is_flag=True,
              help="--adversarial: fine-tune a copy of the classifier as RTS^A's own encoder (saved in the checkpoint).")
@click.option("--attack-steps", default="5,10", show_default=True,
              help="--adversarial: PGD warm-start steps, ADV²-RTS joint steps of the attacks made during training.")
@click.option("--polish-epochs", default=0, show_default=True,
              help="--adversarial: then this many epochs of the plain RTS loss on the saliency net alone "
                   "(own encoder frozen).")
@click.option("--area-match", default=None, type=click.FloatRange(min=0, min_open=True),
              help="--adversarial: after training, calibrate the mask balance so the mean mask area on 2000 "
                   "training images is this multiple of the starting RTS's (e.g. 1.05).")
@click.option("--seed", default=0, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Checkpoint file to write (.pt).")
@click.option("--device", default="cuda" if torch.cuda.is_available() else "cpu", show_default=True)
@friendly
def train_rts_cmd(model_name, data, epochs, phase1_epochs, batch_size, lr, area, destroy, fake_prob, limit, adversarial,
                  start, eps, repel_weight, repel_margin, adv_weight, own_encoder, attack_steps, polish_epochs, area_match,
                  seed, out, device) -> None:
    """Train an RTS saliency network (or RTS^A) for a classifier and report its quality on held-out data."""
    from torch.utils.data import TensorDataset
    from underfire.guard.interpreters.rts import RTS
    from underfire.training.data import ImageFolderDataset, fashion_mnist, stack
    from underfire.training.rts import RTSConfig, rts_quality, train_rts
    from underfire.training.rts_adv import RTSAdvConfig, train_rts_adv

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
    if adversarial and limit is None:
        limit = RTSAdvConfig.limit  # every RTS^A batch runs an attack: a subset by default
    if limit is not None:
        train_set = TensorDataset(*(t[:limit] for t in train_set.tensors))
    common = dict(limit=limit, epochs=epochs, batch_size=batch_size, lr=lr, area=area, destroy=destroy,
                  fake_prob=fake_prob, seed=seed)
    if adversarial:
        try:
            warm_steps, joint_steps = (int(v) for v in attack_steps.split(","))
        except ValueError:
            raise click.BadParameter(f"expected WARM,JOINT (two integers), not {attack_steps!r}",
                                     param_hint="--attack-steps") from None
        cfg = RTSAdvConfig(**common, phase1_epochs=0, eps=eps, repel_weight=repel_weight, repel_margin=repel_margin,
                           adv_weight=adv_weight, own_encoder=own_encoder, warm_steps=warm_steps,
                           joint_steps=joint_steps, polish_epochs=polish_epochs, area_match=area_match)
        base = RTS.for_model(model, start)
        click.echo(f"training RTS^A for {model.name} from {start or 'the bundled RTS'} on {data} "
                   f"({len(train_set)} images, ε = {eps * 255:.0f}/255) on {device}", err=True)
        interp, ck = train_rts_adv(model, train_set, cfg, device=device, progress=_echo_progress, start=base)
    else:
        cfg = RTSConfig(**common, phase1_epochs=phase1_epochs)
        click.echo(f"training RTS for {model.name} on {data} ({len(train_set)} images) on {device}", err=True)
        interp, ck = train_rts(model, train_set, cfg, device=device, progress=_echo_progress)
    q = rts_quality(interp, test_set)
    ck["metrics"]["quality"] = q
    ck["metrics"]["data"] = data
    save_checkpoint(ck, out)
    click.echo(f"clean acc {q['clean_acc']:.2%}, preserved {q['preserved_acc']:.2%}, destroyed "
               f"{q['destroyed_acc']:.2%}, mean mask area {q['area']:.3f} on {q['n']} held-out images; "
               f"trained in {ck['metrics']['train_seconds']:.0f}s; wrote {out}")


# ------------------------------------------------------------------------------------------------------------
# audit, reproduce, detect
# ------------------------------------------------------------------------------------------------------------
