"""The ``underfire`` command line: thin commands over the library.

Every known failure (unknown model, missing weights, corrupt checkpoint, undecodable image, empty folder,
bad tensor) ends as one ``Error: ...`` line and exit status 1; nothing half-written is left behind.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import click
import torch
from underfire.guard.interpreters.base import InterpreterError
from underfire.guard.errors import ModelError
from underfire.guard.models import list_models, load_model
from underfire.guard.weights import load_torch_file
from underfire.training.data import DataError

from underfire.audit.cli_common import EXIT_CODES, friendly
from underfire.audit.cli_train import train


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log the library's info messages.")
def main(verbose: bool) -> None:
    """underfire: audit interpretable models (classifier + interpreter) against ADV² and harden them."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


main.add_command(train)


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
@click.option("--json", "as_json", is_flag=True, help="Print a JSON record (model, machine, date, top-k per image).")
@friendly
def predict(images: tuple[Path, ...], model_name: str, weights: str | None, top: int, as_json: bool) -> None:
    """Print the top-k classes of IMAGES (files or folders; default: the bundled real photos, or 8 Fashion-MNIST
    test images for a 28×28 grey-scale model)."""
    from underfire.training.data import fashion_mnist, load_images, photos, stack

    model = load_model(model_name, weights)
    c, h, _ = model.input_size
    if images:
        x, names = load_images(images, size=h, channels=c)
    elif c == 1:
        x, y = stack(fashion_mnist("test"), limit=8)
        names = [f"Fashion-MNIST test #{i} ({model.categories[int(t)] if model.categories else int(t)})"
                 for i, t in enumerate(y)]
    else:
        x, names = photos(size=h)
    with torch.no_grad():
        probs = model(x).softmax(1)
    if not torch.isfinite(probs).all():
        raise ModelError(f"model {model.name} produced NaN/inf outputs")
    cats = model.categories or [str(i) for i in range(probs.shape[1])]
    p, idx = probs.topk(min(top, probs.shape[1]), dim=1)
    if as_json:
        from underfire.audit.runner import environment

        click.echo(json.dumps({"kind": "predictions", "model": model.name, "weights": weights,
                               "environment": environment(torch.device("cpu")),
                               "images": [{"name": n, "top": [[cats[iv], round(pv, 4)] for pv, iv in
                                                              zip(pi.tolist(), ii.tolist())]}
                                          for n, pi, ii in zip(names, p, idx)]}, indent=1))
        return
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
    from underfire.audit.report import overlay_grid
    from underfire.guard.registry import build_interpreter, traits_of
    from underfire.training.data import fashion_mnist, load_images, photos, stack

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
        try:  # an iterative interpreter (MASK) takes its solver's step count
            kwargs = {"steps": mask_steps} if traits_of(name).iterative else {}
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


TARGET_FLAGS = ("model", "weights", "interpreters", "data", "n", "eps", "attacks", "defenses", "schedule", "shorten",
                "queries", "threat_model", "attack_samples", "attack_strength",
                "outputs")


def _csv(v: str | None) -> list[str] | None:
    return None if v is None else [p.strip() for p in v.split(",") if p.strip()]


def resolve_config(config: Path | None, preset_name: str | None, flags: dict):
    """Preset or TOML file, then flags. ``--model`` swaps the model of a one-target configuration (keeping its
    other settings: ``reproduce table4 --model fmnist_densenet``) and makes a one-target audit of a
    multi-target one; other target flags apply to every target of the configuration."""
    import dataclasses
    import tomllib

    from underfire.audit.defenses import NEEDS_TWO
    from underfire.audit.presets import preset
    from underfire.audit.config import AuditConfig, AuditError, Target, ensemble_names

    if config is not None:
        try:
            raw = tomllib.loads(Path(config).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise AuditError(f"cannot read config {config}: {exc}") from exc
        cfg = AuditConfig.from_dict(raw)
    else:
        cfg = preset(preset_name or "default")
    tflags = {k: v for k, v in flags.items() if k in TARGET_FLAGS and v is not None}
    for k in ("interpreters", "attacks", "defenses"):
        if k in tflags:
            tflags[k] = _csv(tflags[k])
    if "model" in tflags and len(cfg.targets) == 1:
        cfg.targets = [dataclasses.replace(cfg.targets[0], **{"weights": None, **tflags})]
    elif "model" in tflags:
        cfg.targets = [Target(**tflags)]
    else:
        cfg.targets = [dataclasses.replace(t, **tflags) for t in cfg.targets]
    if "interpreters" in tflags:  # --interpreters narrows a preset: its sub-lists keep only the named ones
        for t in cfg.targets:
            for k in ("adv2_interpreters", "adaptive_interpreters", "ensemble_members", "stability_members"):
                if isinstance(getattr(t, k), list):
                    setattr(t, k, [n for n in getattr(t, k) if n in t.interpreters])
            if "defenses" not in tflags and t.defenses and len(ensemble_names(t)) < 2:  # a preset's ensemble cannot apply
                dropped = [d for d in t.defenses if d.rpartition("+")[2] in NEEDS_TWO]  # alone or combined
                if dropped:
                    t.defenses = [d for d in t.defenses if d not in dropped]
                    click.echo(f"note: {', '.join(dropped)} dropped from {t.key()}'s defenses: an ensemble needs "
                               f"two interpreters", err=True)
    for k in ("name", "batch_size", "seed", "fpr", "device", "precision", "channels_last", "compile", "min_pgd_asr"):
        if flags.get(k) is not None:
            setattr(cfg, k, flags[k])
    cfg.validate()
    return cfg


def _check_gate(fail_above: float | None) -> None:
    from underfire.audit.config import AuditError

    if fail_above is not None and not 0 <= fail_above <= 1:
        raise AuditError(f"--fail-above is a spoofability in [0, 1] (0.2 means 20%), got {fail_above:g}")


def _execute(cfg, out: Path, resume: bool, overwrite: bool, as_json: bool, fail_above: float | None,
             name_given: bool = True) -> None:
    """Run an audit into ``out/<name>`` (locked; ``--overwrite`` swaps the new run in only once it has finished)
    and exit with the documented status: 0 measured and within --fail-above, 3 above it, 4 inconclusive."""
    import json

    from underfire.audit.api import run_in_folder
    from underfire.audit.progress import Progress
    from underfire.audit.report import summary_rows, summary_text
    from underfire.audit.result import AuditReport
    from underfire.audit.rundir import check_writable
    from underfire.training.loop import distributed_setup

    check_writable(out)
    run_dir = out / cfg.name
    rank, world = distributed_setup()  # the process group's rank, never a bare RANK variable's
    if not (name_given or resume or overwrite) and world == 1 and (run_dir / "report.json").is_file():
        cfg.name = f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"  # keep the finished run, start a new one
        click.echo(f"{run_dir} holds a finished report; this run goes to {out / cfg.name}", err=True)
        run_dir = out / cfg.name
    progress = Progress(enabled=rank == 0)  # tqdm bars on a terminal, timestamped lines otherwise
    report = run_in_folder(cfg, run_dir, resume, overwrite, progress)
    if report is None:
        return
    js, page = run_dir / "report.json", run_dir / "report.html"
    if as_json:
        click.echo(json.dumps({"headline": report["headline"], "report": str(js), "html": str(page),
                               "rows": summary_rows(report)}, indent=1))
    else:
        click.echo(summary_text(report))
        click.echo(f"\nreport: {page}\nrecord: {js}")
    gate = AuditReport(report).gate(fail_above)
    for line in gate.messages:
        click.echo(line, err=True)
    if gate.exit_code:
        sys.exit(gate.exit_code)


def _audit_options(fn):
    from underfire.attacks.strength import STRENGTHS
    from underfire.audit.config import ATTACKS
    from underfire.audit.defenses import DEFENSES
    from underfire.guard.registry import known_names

    opts = [
        click.option("--config", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="TOML file with audit settings and [[targets]] (flags override it)."),
        click.option("--model", help="Audit one deployment: bundled name, torchvision:<arch>, file.pt or module:function."),
        click.option("--weights", help="Weights for torchvision:<arch>: enum name, state_dict file, or 'random' "
                                       "(an untrained net, on purpose; without --weights the audit refuses)."),
        click.option("--outputs", type=click.Choice(["logits", "probs"]),
                     help="What the model returns; 'probs' (softmax probabilities) makes the audit take their log. "
                          "Default logits (a model returning probabilities is refused)."),
        click.option("--interpreters", help="Comma list of " + ", ".join(known_names()) + "."),
        click.option("--data", help="fashion-mnist, photos, or an ImageFolder root."),
        click.option("--n", type=int, help="Inputs to audit per target."),
        click.option("--eps", type=float, help="L∞ budget in 1/255 units (default 24 for 28×28, 8 otherwise)."),
        click.option("--attacks", help=f"Comma list of {','.join(ATTACKS)} (blackbox: ADV² by queries of the map, "
                                       f"also run by itself on interpreters without a gradient)."),
        click.option("--queries", type=int, help="Query budget per image of black-box ADV² (default 2000)."),
        click.option("--attack-samples", type=int,
                     help="ADV² against ig / smoothgrad optimises an estimate from this many of its path points / "
                          "noisy copies, fresh every step (fewer: cheaper; more, for smoothgrad: finer; judged by the "
                          "deployed map). Default: the deployment's own count."),
        click.option("--attack-strength", type=click.Choice(list(STRENGTHS)),
                     help="quick (default): one preset attack per row, no convergence evidence, no defense credited; "
                          "standard: an attack ensemble (other step sizes and λ, momentum, detector hinges, schedule "
                          "and EOT ×2 and ×4), worst case per input, with a convergence check; thorough: standard "
                          "plus random restarts."),
        click.option("--threat-model", type=click.Choice(["graybox", "blackbox"]),
                     help="Black-box ADV²: graybox (classifier gradients, map by queries; default) or blackbox."),
        click.option("--defenses", help=f"Comma list of {', '.join(DEFENSES)}, a map defense with a detector "
                                        f"(smooth+squeeze), or all (empty string: none)."),
        click.option("--schedule", type=click.Choice(["short", "paper"])),
        click.option("--shorten", type=int, help="Divide every attack schedule by this (schedule short)."),
        click.option("--batch-size", help="Inputs per attack batch, or 'auto' (fill the GPU; 32 on CPU)."),
        click.option("--seed", type=int),
        click.option("--fpr", type=float, help="Detector false-positive rate (default 0.05)."),
        click.option("--device", help="auto (default), cpu, cuda, cuda:1 ..."),
        click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]),
                     help="Attack objectives under autocast (GPU speed; judging stays fp32). Default fp32."),
        click.option("--channels-last", is_flag=True, default=None, help="Model and inputs in channels-last memory format."),
        click.option("--compile", is_flag=True, default=None,
                     help="torch.compile the attacks' model / map calls (GPU speed; first steps pay the compilation)."),
        click.option("--name", help="Run name: the report goes to <out>/<name>/."),
        click.option("--out", type=click.Path(path_type=Path), default=Path("runs"), show_default=True),
        click.option("--resume", is_flag=True, help="Continue a killed run from its per-batch journal."),
        click.option("--overwrite", is_flag=True, help="Replace an existing run folder."),
        click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout."),
        click.option("--fail-above", type=float,
                     help="Exit with status 3 when the headline spoofability exceeds this (in [0, 1])."),
        click.option("--min-pgd-asr", type=float,
                     help="A target whose plain PGD reaches fewer of its inputs is INCONCLUSIVE (default 0.5)."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


@main.command("audit", epilog=EXIT_CODES)
@_audit_options
@friendly
def audit_cmd(config, out, resume, overwrite, as_json, fail_above, **flags) -> None:
    """Score how far a deployment (model + interpreters + defenses) can be spoofed; write runs/<name>/report.*.

    With no options: the bundled default (Fashion-MNIST ResNet with GRAD, CAM, RTS and Grad-CAM; squeezing,
    smoothing and the two together compared on GRAD; MobileNetV2 on the bundled photos with Grad-CAM), under 2
    minutes on 2 CPU cores.
    Under ``torchrun --nproc_per_node=N`` the inputs are sharded across processes.
    """
    _check_gate(fail_above)
    cfg = resolve_config(config, None, flags)
    _execute(cfg, out, resume, overwrite, as_json, fail_above, name_given=flags.get("name") is not None)


@main.command("reproduce", epilog=EXIT_CODES)
@click.argument("experiment", type=click.Choice(["table3", "table4", "table6_8", "table9", "rtsa"]))
@_audit_options
@friendly
def reproduce_cmd(experiment, config, out, resume, overwrite, as_json, fail_above, **flags) -> None:
    """Run one of the paper's experiments as a preset audit and print the paper's numbers beside ours."""
    from underfire.audit.presets import PAPER

    _check_gate(fail_above)
    name_given = flags.get("name") is not None
    flags["name"] = flags.get("name") or experiment
    cfg = resolve_config(config, experiment, flags)
    click.echo(f"paper: {PAPER[experiment]}", err=True)
    _execute(cfg, out, resume, overwrite, as_json, fail_above, name_given=name_given)
    click.echo(f"\npaper ({experiment}): {PAPER[experiment]}")


@main.command("detect")
@click.argument("inputs", nargs=-1, type=click.Path(exists=True, path_type=Path))
@click.option("--model", "model_name", default="fmnist_resnet", show_default=True)
@click.option("--calibrate", "calibrate_n", type=int, default=None,
              help="Calibrate on this many benign inputs of --data first and save the thresholds.")
@click.option("--data", default="fashion-mnist", show_default=True, help="Benign data for --calibrate.")
@click.option("--fpr", default=0.05, show_default=True)
@click.option("--thresholds", type=click.Path(path_type=Path), required=True,
              help="Threshold file: written by --calibrate, read otherwise.")
@friendly
def detect_cmd(inputs, model_name, calibrate_n, data, fpr, thresholds) -> None:
    """Feature-squeezing detection: calibrate thresholds, and/or score images, folders or a saved .pt batch."""
    from underfire.guard.interpreters.base import check_input
    from underfire.guard.squeeze import SqueezeDetector
    from underfire.training.data import load_images

    model = load_model(model_name)
    det = SqueezeDetector(model)
    if calibrate_n is not None:
        if data == "fashion-mnist":
            from underfire.training.data import fashion_mnist

            xs = fashion_mnist("test").tensors[0]
            cal, held = xs[5000:5000 + calibrate_n], xs[7000:7000 + calibrate_n]
        else:
            from underfire.training.data import ImageFolderDataset, stack

            x, _ = stack(ImageFolderDataset(data, size=model.input_size[1], channels=model.input_size[0]))
            cal, held = x[: len(x) // 2], x[len(x) // 2:]
        c = det.calibrate(cal, fpr, heldout=held)
        det.save(thresholds)
        click.echo(f"calibrated on {c['n']} benign inputs at FPR {fpr:.0%}; held-out FPR " + ", ".join(
            f"{k} {v:.1%}" for k, v in c.get("fpr_heldout", {}).items()) + f"; wrote {thresholds}")
    else:
        det = SqueezeDetector.load(thresholds, model)
    if not inputs:
        return
    tensors, names = [], []
    for p in inputs:
        if p.suffix == ".pt":
            obj = load_torch_file(p, "image batch", DataError)
            if isinstance(obj, dict) and "x_adv" not in obj:
                raise DataError(f"{p} holds a dict without the key 'x_adv' (its keys: "
                                f"{', '.join(map(str, list(obj)[:8])) or 'none'}); save the images as a (B, C, H, W) "
                                f"tensor or as {{'x_adv': tensor}}")
            x = obj["x_adv"] if isinstance(obj, dict) else obj
            if not isinstance(x, torch.Tensor) or x.ndim != 4:
                raise DataError(f"{p} must hold a (B, C, H, W) tensor or a dict with 'x_adv'")
            if not x.is_floating_point():
                raise DataError(f"{p} holds a {x.dtype} tensor; expected float images in [0, 1]")
            x = x.float()
            try:
                check_input(x, model)  # shape, channels, finite, range: what cannot be scored is never "benign"
            except InterpreterError as exc:
                raise DataError(f"{p}: {exc}") from None
            if tuple(x.shape[-2:]) != tuple(model.input_size[1:]):
                raise DataError(f"{p}: images are {x.shape[-2]}×{x.shape[-1]}, model {model.name} takes "
                                f"{model.input_size[1]}×{model.input_size[2]}")
            tensors.append(x)
            names += [f"{p.name}[{i}]" for i in range(len(x))]
        else:
            x, n = load_images([p], size=model.input_size[1], channels=model.input_size[0])
            tensors.append(x)
            names += n
    x = torch.cat(tensors)
    flags = det.flags(x)
    with torch.no_grad():
        scores = det.scores(x)
    for i, n in enumerate(names):
        click.echo(f"{n}: {'ADVERSARIAL' if flags['joint'][i] else 'benign'} (joint score "
                   f"{float(scores['joint'][i]):.3f} vs threshold {det.thresholds['joint']:.3f})")
    click.echo(f"flagged {int(flags['joint'].sum())}/{len(names)}")


if __name__ == "__main__":
    sys.exit(main())
