"""One target's deployment: its model, interpreters, audited inputs, calibration data, map defenses and
detectors, and the batch size that fits its device."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from underfire.attacks.adv2 import PGD, make_adv2
from underfire.attacks.targets import benign_maps, target_classes
from underfire.audit.checks import check_faithful, check_outputs, check_trained, exclude_opaque, preflight
from underfire.audit.config import AuditConfig, AuditError, Target, adaptive_names, adv2_names
from underfire.audit.defenses import MAPS, TABLE, map_defense_name, parts
from underfire.guard.adapters import Adapter, Opaque, Transfer
from underfire.guard.interpreters.base import Interpreter
from underfire.guard.registry import build_interpreter, twin_of
from underfire.guard.interpreters.base import InterpreterError
from underfire.guard.models import load_model, provided_interpreters
from underfire.training.data import (
    DataError,
    ImageFolderDataset,
    fashion_mnist,
    folder_kind,
    load_images,
    photos,
    stack,
)


@dataclass
class Deployment:
    model: torch.nn.Module
    interpreters: dict
    eps: float
    x: torch.Tensor  # audited inputs (N, C, H, W), correctly classified
    y: torch.Tensor
    y_t: torch.Tensor
    x_cal: torch.Tensor | None  # benign calibration set for the detectors
    x_heldout: torch.Tensor | None
    warnings: list[str]
    pool: tuple[torch.Tensor, torch.Tensor] | None = None  # labelled images not audited ("other" target maps)
    precision: str = "fp32"
    compile: bool = False
    defended: dict = field(default_factory=dict)  # map defense → {interpreter: its defended interpreter}
    transfer: dict = field(default_factory=dict)  # adapter name → the native twin its attacks optimise
    opaque: set = field(default_factory=set)  # interpreters without a gradient to the input: attacked by queries
    views: dict = field(default_factory=dict)  # name → the attacker's sampled view of its map (attack_samples)
    # a team's maps whose gradient disagrees with their finite differences: {name: why} (lower bounds)
    unfaithful: dict = field(default_factory=dict)
    # above quick strength: every input's map-noise draws, measured before the attacks so that the ensemble
    # knows τ (and so which inputs are already spoofed) while it runs; {name or "d/name": (N, draws) lists}
    noise: dict | None = None
    tau: dict | None = None

    @property
    def attack_kw(self) -> dict:
        """How every attack of this deployment runs: autocast precision and torch.compile."""
        return {"precision": self.precision, "compile": self.compile}


SUPPLIED = "python:"  # a target's model or data handed over as Python objects (audit()): "python:<name>"


@dataclass
class Supplied:
    """What a target's ``python:`` names stand for: objects handed to :func:`underfire.audit.audit`."""

    model: torch.nn.Module | None = None  # an ImageClassifier
    interpreters: dict = field(default_factory=dict)  # name → Interpreter or callable (x, target) -> map
    data: tuple[torch.Tensor, torch.Tensor | None] | None = None  # (x, y or None)

    @property
    def used(self) -> bool:
        return self.model is not None or bool(self.interpreters) or self.data is not None


def _split(x: torch.Tensor, y: torch.Tensor | None, t: Target):
    """Labelled data: the first 2n images are the audit's pool, the rest half calibration, half held out.
    Unlabelled: the first n are audited; the detectors' benign data are crops and flips of the rest, held-out
    other crops of the same images (its FPR is an optimistic estimate)."""
    if y is None:
        if len(x) <= t.n:
            return x, None, None, None
        rest = x[t.n:]
        return x, None, _augment(rest, t.calibration_n, 1), _augment(rest, t.calibration_n, 2)
    rest = x[2 * t.n:]
    half = len(rest) // 2
    return x, y, (rest[:half] if half else None), (rest[half:] if half else None)


def _load_data(t: Target, model, supplied: Supplied | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(pool x, pool y or None when unlabelled, calibration x, held-out x)."""
    c, h, _ = model.input_size
    if t.data.startswith(SUPPLIED):
        if supplied is None or supplied.data is None:
            raise AuditError(f"data {t.data!r} names tensors handed to audit() in Python; none were handed over "
                             f"(the CLI takes fashion-mnist, photos or a folder)")
        x, y = supplied.data
        if tuple(x.shape[1:]) != tuple(model.input_size):
            raise AuditError(f"the data are {tuple(x.shape[1:])} images; model {model.name} takes "
                             f"{tuple(model.input_size)}")
        if y is not None and int(y.max()) >= model.num_classes:
            raise DataError(f"data y holds class {int(y.max())} but model {model.name} has {model.num_classes} "
                            f"classes")
        return _split(x, y, t)
    if t.data == "fashion-mnist":
        if (c, h) != (1, 28):
            raise AuditError(f"fashion-mnist holds 1×28×28 images; model {model.name} takes {c}×{h}×{h}")
        xs, ys = fashion_mnist("test").tensors
        cal = xs[5000:5000 + t.calibration_n]
        held = xs[7000:7000 + t.calibration_n]
        return xs[:5000], ys[:5000], cal, held
    root = Path(t.data)
    plain = t.data != "photos" and root.is_dir() and folder_kind(root) == "plain"
    if t.data == "photos" or plain:  # unlabelled: the model's predictions are the classes
        if plain:
            x, _ = load_images([root], size=h, channels=c)
        else:
            x, _ = photos(size=h)
            if c != 3:
                raise AuditError(f"the bundled photos are colour; model {model.name} takes {c} channels")
        return _split(x, None, t)
    if not root.is_dir():
        raise AuditError(f"data {t.data!r} is neither fashion-mnist, photos, a folder of images nor an ImageFolder "
                         f"directory")
    ds = ImageFolderDataset(root, size=h, channels=c)
    if len(ds.classes) > model.num_classes:
        raise DataError(f"{root} has {len(ds.classes)} class folders but model {model.name} has "
                        f"{model.num_classes} classes (folders must be in the model's class order)")
    x, y = stack(ds)
    return _split(x, y, t)


def _augment(x: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """``count`` random resized crops (60–100% of the side) with random horizontal flips of images ``x``."""
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(seed)
    h, w = x.shape[-2:]
    out = []
    for i in range(count):
        img = x[int(torch.randint(len(x), (1,), generator=gen))]
        side = 0.6 + 0.4 * float(torch.rand((), generator=gen))
        ch, cw = max(1, round(h * side)), max(1, round(w * side))
        top = int(torch.randint(h - ch + 1, (1,), generator=gen))
        left = int(torch.randint(w - cw + 1, (1,), generator=gen))
        crop = F.interpolate(img[None, :, top:top + ch, left:left + cw], size=(h, w), mode="bilinear",
                             align_corners=False)[0]
        if float(torch.rand((), generator=gen)) < 0.5:
            crop = crop.flip(-1)
        out.append((crop.clamp(0, 1) * 255).round() / 255)
    return torch.stack(out)


def _load_model(t: Target, supplied: Supplied | None):
    """The target's model and the interpreters handed over with it (by a module:function entry point or to
    audit() in Python), as Interpreter objects of that model."""
    if not t.model.startswith(SUPPLIED):
        model = load_model(t.model, t.weights)
        return model, getattr(model, "provided_interpreters", {})
    if supplied is None or supplied.model is None:
        raise AuditError(f"model {t.model!r} names an nn.Module handed to audit() in Python; none was handed over "
                         f"(the CLI takes a bundled name, torchvision:<arch>, file.pt or module:function)")
    model = supplied.model
    return model, provided_interpreters(t.model, model, model, supplied.interpreters)


def build_deployment(t: Target, seed: int, device: torch.device, precision: str = "fp32",
                     channels_last: bool = False, compile: bool = False,
                     supplied: Supplied | None = None) -> Deployment:
    """Load, check (outputs, training, gradients: :class:`AuditRefused` when the audit cannot measure it) and
    select the audited inputs of one target (``supplied``: the objects its ``python:`` names stand for)."""
    from underfire.guard.models import from_probabilities

    model, provided = _load_model(t, supplied)
    model = model.to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    pool_x, pool_y, x_cal, x_held = _load_data(t, model, supplied)
    pool_x = pool_x.to(device)
    check_outputs(t, model, pool_x)
    if t.outputs == "probs":
        model = from_probabilities(model)
    interps = {n: provided[n] if n in provided else build_interpreter(n, model) for n in t.interpreters}
    warnings, transfer, opaque = [], {}, set()
    for n, it in list(interps.items()):  # adapters (captum:, gradcam:) compute without a gradient
        if isinstance(it, Adapter):
            twin = twin_of(it, model)
            if twin is None:
                opaque.add(n)  # attacked with queries (black-box ADV²) instead
                continue
            interps[n], transfer[n] = Transfer(twin, it), twin.name
            how = ("is served as a black box" if isinstance(it, Opaque) else "computes its map without a gradient")
            warnings.append(f"TRANSFER: {n} {how}; its attacks optimise the "
                            f"{'surrogate' if isinstance(it, Opaque) else 'native twin'} {twin.name} and every "
                            f"iterate is judged by {n}'s own map (a transfer result: a white-box attacker with "
                            f"{n}'s gradient could do at least as well)")
    for it in interps.values():
        it.to(device)
    with torch.no_grad():
        z = torch.cat([model(pool_x[i:i + 256]) for i in range(0, len(pool_x), 256)])
    pred = z.argmax(1)
    if t.weights == "random":
        warnings.append("UNTRAINED: random weights, asked for with weights = 'random'; this audits no deployment")
    else:
        check_trained(t, model, pred, None if pool_y is None else pool_y.to(device), z.softmax(1))
    y = pred if pool_y is None else pool_y.to(device)  # unlabelled photos: the model's prediction is "y"
    ok = (pred == y).nonzero().squeeze(1)[: t.n]
    if len(ok) == 0:
        raise AuditError(f"model {model.name} classifies none of the {len(pool_x)} inputs of {t.data} correctly")
    x, y = pool_x[ok], y[ok]
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y_t = target_classes(y.cpu(), model.num_classes, torch.Generator().manual_seed(seed)).to(device)
    warnings += preflight(t, model, interps, x, y, opaque)
    unfaithful = check_faithful(interps, [n for n in interps if n in provided], x, y, opaque)
    for n, why in unfaithful.items():
        warnings.append(f"UNFAITHFUL GRADIENT: {n}: {why}; its spoofability is a lower bound")
    for n in (n for n in interps if n in provided and interps[n].traits is Interpreter.traits):
        warnings.append(f"PRESET: {n} declares no ADV² preset (Interpreter.traits); it is attacked with CAM's "
                        f"settings, which may not be the strongest for this map: its spoofability may be understated")
    exclude_opaque(t, opaque, warnings)
    if len(x) < t.n:
        warnings.append(f"only {len(x)} correctly classified inputs available (asked for {t.n})")
    eps = (t.eps if t.eps is not None else (24 if model.input_size[1] == 28 else 8)) / 255
    pool = None
    if pool_y is not None and len(pool_x) > int(ok[-1]) + 1:
        pool = (pool_x[int(ok[-1]) + 1:], pool_y[int(ok[-1]) + 1:].to(device))
    defended = {}
    wanted = {parts(d)[0] for d in t.defenses}  # map defenses, alone or combined with a detector
    for d in MAPS if "adaptive" in t.attacks else ():
        if d in wanted:
            kw = TABLE[d].settings(asdict(t))
            defended[d] = {}
            for n in adaptive_names(t):
                if map_defense_name(d, n):
                    try:
                        defended[d][n] = build_interpreter(map_defense_name(d, n), model, **kw).to(device)
                    except InterpreterError as exc:  # e.g. no RTS^A checkpoint for this model
                        warnings.append(f"the {d} defense of {n} is not available: {exc}")
            if not defended[d]:
                warnings.append(f"the {d} defense applies to none of the adaptively attacked interpreters "
                                f"({', '.join(adaptive_names(t))}); it has no row")
    views = {}
    for n, it in interps.items() if t.attack_samples else ():
        view = it.sampled(t.attack_samples)
        if view is not None:
            views[n] = Transfer(view, it)  # differentiable calls: the estimate; judgements: the deployed map
            warnings.append(f"SAMPLED: ADV² against {n} optimises a {t.attack_samples}-sample estimate of its map, "
                            f"drawn afresh every step (attack_samples); every iterate is judged by the deployed map")
    return Deployment(model, interps, eps, x, y, y_t, None if x_cal is None else x_cal.to(device),
                      None if x_held is None else x_held.to(device), warnings, pool, precision, compile, defended,
                      transfer, opaque, views, unfaithful=unfaithful)


AUTO_CPU_BATCH = 32  # CPU throughput is flat beyond ~32 (step_cost.py: CAM-ADV² 1379 / 1642 / 1327 img·steps/s
#                     at batch 8 / 32 / 128 on 1 thread)


def fit_batch(per_sample_bytes: float, free_bytes: float, n: int, budget: float = 0.7, cap: int = 1024) -> int:
    """The largest power of two b ≤ min(n, cap) with b · per_sample_bytes ≤ budget · free_bytes (at least 1)."""
    limit = min(n, cap, int(budget * free_bytes / max(per_sample_bytes, 1.0)))
    return 1 if limit < 1 else 2 ** int(math.log2(limit))


def auto_batch_size(t: Target, dep: Deployment, probe: int = 8) -> int:
    """batch_size "auto": on CUDA, one step of each of the target's attacks at a probe batch gives the peak
    memory per input, and the batch fills 70% of the free memory; on CPU, ``AUTO_CPU_BATCH``."""
    n = len(dep.x)
    if dep.x.device.type != "cuda":
        return min(n, AUTO_CPU_BATCH)
    b0 = min(probe, n)
    x, y_t = dep.x[:b0], dep.y_t[:b0]
    worst = 0
    probes = [("pgd", None)] + [(nm, make_adv2(dep.interpreters[nm], dep.eps, steps=(0, 1), check_every=1,
                                                          **dep.attack_kw))
                                 for nm in adv2_names(t) if nm in dep.interpreters]
    for nm, atk in probes:
        it = dep.interpreters[nm] if atk is not None else next(iter(dep.interpreters.values()))
        torch.cuda.synchronize(dep.x.device)
        base = torch.cuda.memory_allocated(dep.x.device)
        torch.cuda.reset_peak_memory_stats(dep.x.device)
        if atk is None:
            PGD(dep.eps, steps=1, **dep.attack_kw)(it, x, y_t)
        else:
            atk(it, x, y_t, benign_maps(it, x))
        worst = max(worst, torch.cuda.max_memory_allocated(dep.x.device) - base)
    free, _ = torch.cuda.mem_get_info(dep.x.device)
    return fit_batch(worst / b0, free, n)


def resolve_batch_size(cfg: AuditConfig, t: Target, dep: Deployment, journal, resume: bool,
                       rank: int = 0, world: int = 1) -> int:
    """The batch size of this target's run, fixed in its journal: a resumed run must cut the same batches."""
    saved = journal.dir / "batch_size"
    if resume and saved.is_file():
        text = saved.read_text().strip()
        if not text.isdigit() or int(text) < 1:
            raise AuditError(f"{saved} should hold the run's batch size (a whole number ≥ 1) but holds {text[:40]!r}: "
                             f"the journal was damaged; start again with --overwrite")
        b = int(text)
        if cfg.batch_size not in ("auto", b):
            raise AuditError(f"this run of {t.key()} was journaled with batch size {b}, not {cfg.batch_size}: "
                             f"resume with --batch-size {b} (or auto), or start again with --overwrite")
        return b
    b = auto_batch_size(t, dep) if cfg.batch_size == "auto" else int(cfg.batch_size)
    if world > 1:  # every rank must cut the same batches: take the smallest choice
        bt = torch.tensor([b], device=dep.x.device)
        torch.distributed.all_reduce(bt, op=torch.distributed.ReduceOp.MIN)
        b = int(bt)
    if rank == 0:
        saved.write_text(str(b))
    return b
