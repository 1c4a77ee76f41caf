"""The audit: how far can a deployment (classifier + interpreters + defenses) be spoofed?

    report = run_audit(AuditConfig(targets=[Target("fmnist_resnet")]), run_dir=Path("runs/x"))

For each target (a deployment and its data) the runner
1. builds the model, its interpreters and data, and runs the pre-flight checks of EVERY target before any
   attack: finite (B, K) outputs; logits, not probabilities (unless declared, ``outputs = "probs"``: the log is
   taken); a model better than chance on its own audit data (one-sided binomial test on labelled data;
   on unlabelled data not near-uniform and not one class for everything), unless random weights were asked
   for; a gradient of the logits and of every attacked map w.r.t. the input. A failed check raises
   :class:`AuditRefused` (exit status 4): the audit never reports a deployment it cannot measure as safe;
2. takes the first ``n`` correctly classified inputs, draws target classes c_t = (y + randint(1, K)) mod K,
   calibrates the detectors on disjoint benign data at the configured FPR;
3. per batch: PGD (always: it checks that attacks work here), ADV² per interpreter, optionally stAdv-ADV²
   (CAM), adaptive ADV² against each defense, the transfer of each ADV² to the other interpreters, and the
   map noise behind τ (``noise_draws`` uniform-noise draws per input, the benign class fixed) — every metric
   per sample, journaled per batch with the fingerprints of weights, data and settings, so ``resume`` never
   redoes a batch and never mixes in one of another run;
4. aggregates once (rates with exact Clopper–Pearson intervals; means with a bootstrap) and scores
   spoofability; a target whose plain PGD reaches fewer than ``min_pgd_asr`` of its inputs is INCONCLUSIVE,
   and so is the headline.

Spoofability of an interpreter (the headline; higher = worse for the deployment): the fraction of audited
inputs on which ADV² reaches its target class on the 8-bit image while the interpreter's map stays within
the benign noise level τ — L1(adversarial map, benign map) ≤ τ, with τ the 95th percentile of
L1(map of x, map of x + uniform noise in [−a, a]), both for the benign class, pooled over inputs × draws,
a = ε/2 by default. Under a defense, the adaptive attack must also go undetected. The report carries these
definitions.

Under ``torchrun`` the batches are sharded by rank (batch i on rank i mod world); rank 0 merges the
journals into one report, identical to a single-process run with the same seed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch

from underfire.attacks.adaptive import adaptive
from underfire.attacks.adv2 import PGD, make_adv2
from underfire.attacks.blackbox import THREATS, Counted, QueryAdv2, transfer_start
from underfire.attacks.pgd import PRECISIONS
from underfire.attacks.stadv import StAdv2
from underfire.attacks.strength import LEVELS, STRENGTHS, Member, members, run_ensemble
from underfire.attacks.targets import benign_maps, other_class_maps, random_shapes, target_classes
from underfire.audit.defenses import (DEFENSES, DETECTORS, MAPS, NEEDS_TWO, combined_cost, combo, compare, convergence,
                            detector_cost, map_cost,
                            map_defense_name, parts)
from underfire.audit.metrics import K_GRID, confidence, iou_curve, l1, rate
from underfire.audit.report import SCHEMA_VERSION
from underfire.guard.adapters import Adapter, Opaque, Transfer, build_twin
from underfire.guard.calibration import roc_auc
from underfire.guard.ensemble import DisagreementDetector, InterpreterEnsemble, NormalisedDisagreementDetector
from underfire.guard.learned import LearnedDetector
from underfire.guard.interpreters import build_interpreter
from underfire.guard.interpreters.base import InterpreterError, check_name
from underfire.guard.models import load_model
from underfire.guard.smoothing import RADII, Smoothed, linf_as_l2
from underfire.guard.squeeze import SqueezeDetector
from underfire.guard.stability import StabilityDetector
from underfire.training.data import DataError, ImageFolderDataset, fashion_mnist, folder_kind, load_images, photos, stack
from underfire.training.loop import distributed_setup
from underfire.guard.errors import UnderfireError

log = logging.getLogger(__name__)
ATTACKS = ("pgd", "adv2", "stadv2", "adaptive", "blackbox")
TARGET_MAPS = ("benign", "shapes", "other")
Progress = Callable[[str], None]
# The adaptive attacks' hinge pulls against the map term; λ ×3 restores most of the map fidelity
# (Fashion-MNIST ResNet, CAM, 30 images: L1 to benign 0.154 → 0.130 at the same ASR 100%).
ADAPTIVE_LAM = 3.0
# Certificates of smoothed interpreters (smooth:<name>): noisy copies per input and the top-k fraction certified
CERT_SAMPLES, CERT_K = 100, 0.2


class AuditError(UnderfireError):
    """A deployment, dataset, setting or run folder the audit cannot use; the message says which and why.

    The CLI turns it into one ``Error:`` line and ``exit_code``."""

    exit_code = 1


class AuditRefused(AuditError):
    """The audit cannot measure this deployment (untrained weights, probability outputs, no gradient where a
    gradient attack is planned): it refuses rather than report an unmeasured deployment as safe."""

    exit_code = 4


SPOOF_DEFINITION = (
    "spoofability(g) = fraction of audited inputs where some attack on the undefended map of g (ADV², ADV² by "
    "queries, or an adaptive ADV² built against a detector, since a detector leaves the map unchanged) reaches "
    "c_t (argmax on the 8-bit image) and L1(g(x_adv), g(x)) <= tau_g; tau_g = 95th percentile of L1(g(x | y), g(x + u | y)), the map of the "
    "benign class y for both, pooled over the audited inputs and noise_draws draws per input of "
    "u ~ U[-a, a] quantised to 8 bits, a = eps/2 unless set (random noise of half the attack's budget); its "
    "stability is a bootstrap interval over inputs. Under a defense the adaptive ADV² must also not be detected. "
    "pgd_within_tau (PGD's maps within the same tau) is the reference: a tau that lets PGD count as spoofing is "
    "too lenient for this data. Rates carry exact Clopper-Pearson 95% intervals. "
    "Headline = max over targets and interpreters of the undefended spoofability; it is INCONCLUSIVE when a "
    "target's plain PGD reaches fewer than min_pgd_asr of its inputs (the attacks did not work there).")


@dataclass
class Target:
    """One deployment to audit and the data to audit it on."""

    model: str = "fmnist_resnet"
    weights: str | None = None  # torchvision:<arch>: enum name, state_dict file, or "random" (asked for)
    interpreters: list[str] = field(default_factory=lambda: ["grad", "cam", "rts", "mask"])
    data: str = "fashion-mnist"  # fashion-mnist | photos | an ImageFolder root
    n: int = 16
    eps: float | None = None  # in 1/255; None: 24 for 28×28 inputs, 8 otherwise
    attacks: list[str] = field(default_factory=lambda: ["pgd", "adv2", "adaptive"])
    # None: squeezing, and the ensemble where there are two interpreters to compare; "all": every one that applies
    defenses: list[str] | None = None
    adv2_interpreters: list[str] | None = None  # interpreters ADV² attacks; None: all (the others only read)
    adaptive_interpreters: list[str] | None = None  # None: every differentiable-at-low-cost one (not mask)
    ensemble_members: list[str] | None = None  # the disagreement detector's members; None: all but mask
    stability_members: list[str] | None = None  # the stability detector's members; None: all but mask
    learned_n: int = 32  # calibration images attacked (PGD + each adaptive ADV²) to train the learned detector
    smooth_sigma: float = 0.1  # the smooth defense: Gaussian noise σ on [0, 1] images
    smooth_samples: int = 8  # ... and noisy copies per map
    beta: float = 3.0  # the beta defense: softplus-β in GRAD's backward pass
    schedule: str = "short"
    shorten: int = 8
    calibration_n: int = 256
    noise: float | None = None  # in 1/255: uniform-noise amplitude that sets the noise level τ; None: ε/2
    noise_draws: int = 4  # noise draws per audited input behind τ
    target_maps: list[str] = field(default_factory=lambda: ["benign"])  # + "shapes", "other" (Tables 6, 8)
    outputs: str = "logits"  # what the model returns: logits, or probs (the audit then takes their log)
    queries: int = 2000  # the query budget per image of black-box ADV² (attacks/blackbox.py), transfer included
    threat_model: str = "graybox"  # of black-box ADV²: graybox (classifier white-box) or blackbox (queries only)
    label: str | None = None  # the target's name in the report; None: model@data
    # keyword options of every ADV² of this target (attacks/adv2.py Adv2 / MaskAdv2), e.g. {lam_scale = 10}:
    # tuning runs (benchmarks/adv2_tables.py --adv2 key=value); None: the paper's preset for each interpreter
    adv2_options: dict | None = None
    # ADV² and adaptive ADV² against an interpreter that averages over samples (ig's path points, smoothgrad's
    # noisy copies) optimise an estimate from this many of them, drawn afresh every step (as EOT does); every
    # iterate is still judged by the deployed map. None: the attacker differentiates the whole map.
    attack_samples: int | None = None
    # how hard the attacker tries (attacks/strength.py): quick = the one preset attack (no convergence
    # evidence: no defense is credited from it); standard = the attack ensemble, cheapest first, worst case per
    # input, with a convergence check; thorough = the ensemble plus random restarts
    attack_strength: str = "quick"

    def key(self) -> str:
        if self.label:
            return self.label
        return f"{self.model}@{Path(self.data).name if os.sep in self.data else self.data}"


@dataclass
class AuditConfig:
    name: str = "default"
    targets: list[Target] = field(default_factory=lambda: [Target()])
    batch_size: int | str = 16  # or "auto": fill the GPU (a probe measures one step's memory); 32 on CPU
    seed: int = 0
    fpr: float = 0.05
    device: str = "auto"
    precision: str = "fp32"  # the attacks' objective under autocast: fp32 | bf16 | fp16 (judging stays fp32)
    channels_last: bool = False  # model and inputs in channels-last memory format (faster convolutions on GPU)
    compile: bool = False  # torch.compile the attacks' classifier / map calls (not GRAD's double backward)
    examples: int = 3
    bootstrap: int = 1000
    min_pgd_asr: float = 0.5  # a target whose plain PGD reaches fewer of its inputs is INCONCLUSIVE

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "AuditConfig":
        """From a TOML / JSON dict; unknown keys and values of the wrong type are refused, naming the key."""
        if not isinstance(d, dict):
            raise AuditError(f"an audit config is a table of settings, not {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        bad = set(d) - known - {"targets"}
        if bad:
            raise AuditError(f"unknown audit settings {sorted(bad)}; known: {sorted(known)}")
        raw_targets = d.get("targets", [{}])
        if not isinstance(raw_targets, list) or not all(isinstance(t, dict) for t in raw_targets):
            raise AuditError("targets must be a list of tables ([[targets]] in TOML)")
        targets = []
        tknown = {f.name for f in fields(Target)}
        for i, t in enumerate(raw_targets):
            tb = set(t) - tknown
            if tb:
                raise AuditError(f"unknown target settings {sorted(tb)}; known: {sorted(tknown)}")
            _check_types(t, Target, f"targets[{i}].")
            targets.append(Target(**t))
        top = {k: v for k, v in d.items() if k != "targets"}
        _check_types(top, cls, "")
        return cls(**top, targets=targets)

    def validate(self) -> None:
        """Types and ranges of every setting, before any model or data is loaded; AuditError names the key."""
        if not isinstance(self.targets, list) or not self.targets:
            raise AuditError("the audit has no targets")
        if isinstance(self.batch_size, str) and self.batch_size.isdigit():
            self.batch_size = int(self.batch_size)
        _check_types(asdict(self), type(self), "")
        if self.batch_size != "auto" and (isinstance(self.batch_size, str) or self.batch_size < 1):
            raise AuditError(f"batch_size must be an integer ≥ 1 or 'auto', got {self.batch_size!r}")
        if not self.name or self.name.startswith(".") or any(c in self.name for c in "/\\"):
            raise AuditError(f"name must be a plain folder name (no '/', not starting with '.'), got {self.name!r}")
        if not 0 < self.fpr < 1:
            raise AuditError(f"fpr must be in (0, 1), got {self.fpr}")
        if not 0 <= self.min_pgd_asr <= 1:
            raise AuditError(f"min_pgd_asr must be in [0, 1], got {self.min_pgd_asr}")
        for k in ("examples", "bootstrap"):
            if getattr(self, k) < 0:
                raise AuditError(f"{k} must be ≥ 0, got {getattr(self, k)}")
        if not 0 <= self.seed < 2 ** 31:  # seeds offset by sample indices must stay valid for every generator
            raise AuditError(f"seed must be an integer in [0, 2**31), got {self.seed}")
        if self.precision not in PRECISIONS:
            raise AuditError(f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        check_device(self.device)
        seen: dict[str, int] = {}
        folders: dict[str, int] = {}
        for i, t in enumerate(self.targets):
            _check_types(asdict(t), Target, f"targets[{i}].")
            _validate_target(t)
            if t.key() in seen:
                raise AuditError(f"targets[{i}] and targets[{seen[t.key()]}] are both {t.key()!r}: give one a "
                                 f"label (label = \"...\") to tell them apart in the report")
            seen[t.key()] = i
            folder = journal_folder(t.key())
            if folder in folders:
                j = folders[folder]
                raise AuditError(f"targets[{i}] ({t.key()!r}) and targets[{j}] ({self.targets[j].key()!r}) would share "
                                 f"the journal folder {folder!r}: give them labels that differ in letters or digits")
            folders[folder] = i


def _validate_target(t: Target) -> None:
    where = f"target {t.key()}"
    for k in ("n", "shorten", "calibration_n", "noise_draws", "learned_n", "smooth_samples", "queries"):
        if getattr(t, k) < 1:
            raise AuditError(f"{where}: {k} must be an integer ≥ 1, got {getattr(t, k)}")
    for k in ("eps", "noise"):
        v = getattr(t, k)
        if v is not None and not 0.5 <= v <= 255:
            raise AuditError(f"{where}: {k} is in 1/255 units (8 means 8/255) and must be in [0.5, 255], got {v}")
    if t.threat_model not in THREATS:
        raise AuditError(f"{where}: threat_model must be one of {', '.join(THREATS)}, not {t.threat_model!r}")
    if t.outputs not in ("logits", "probs"):
        raise AuditError(f"{where}: outputs must be 'logits' or 'probs', not {t.outputs!r}")
    if "pgd" not in t.attacks:  # PGD is the audit's check that attacks work on this deployment: always run
        t.attacks = ["pgd", *t.attacks]
    if unknown := set(t.attacks) - set(ATTACKS):
        raise AuditError(f"unknown attacks {sorted(unknown)}; known: {', '.join(ATTACKS)}")
    if not t.interpreters:
        raise AuditError(f"{where} has no interpreters")
    if not _entry_point(t.model):  # an entry point may hand over maps of its own names: checked once it loads
        for name in t.interpreters:
            try:
                check_name(name)
            except InterpreterError as exc:
                raise AuditError(f"{where}: {exc}") from None
    if t.defenses is None:  # the default: what applies here (an ensemble needs two interpreters)
        t.defenses = ["squeeze"] + (["ensemble"] if len(_ensemble_names(t)) >= 2 else [])
    if "all" in t.defenses:  # every defense that applies here (the ensembles need two interpreters)
        t.defenses = [d for d in DEFENSES if d not in NEEDS_TWO or len(_ensemble_names(t)) >= 2]
    if unknown := {d for d in t.defenses if d not in DEFENSES and "+" not in d}:
        raise AuditError(f"unknown defenses {sorted(unknown)}; known: {', '.join(DEFENSES)}, a combination "
                         f"<map defense>+<detector> such as smooth+squeeze, or all")
    for d in t.defenses:
        try:
            combo(d)
        except ValueError as exc:
            raise AuditError(f"{where}: {exc}") from None
    for d in NEEDS_TWO:
        if any(parts(x)[1] == d for x in t.defenses) and len(_ensemble_names(t)) < 2:
            raise AuditError(f"{where}: the {d} defense needs at least two interpreters "
                             f"(MASK counts only when named in ensemble_members)")
    if not 0 < t.smooth_sigma <= 1:
        raise AuditError(f"{where}: smooth_sigma is a noise σ on [0, 1] images, in (0, 1], got {t.smooth_sigma}")
    if t.attack_samples is not None and t.attack_samples < 1:
        raise AuditError(f"{where}: attack_samples must be at least 1 (or unset), got {t.attack_samples}")
    if t.attack_strength not in STRENGTHS:
        raise AuditError(f"{where}: attack_strength must be one of {', '.join(STRENGTHS)}, not {t.attack_strength!r}")
    if not 0 < t.beta <= 100:
        raise AuditError(f"{where}: beta (softplus-β) must be in (0, 100], got {t.beta}")
    for group in (t.ensemble_members or [], t.adaptive_interpreters or [], t.adv2_interpreters or [],
                  t.stability_members or []):
        if unknown := set(group) - set(t.interpreters):
            raise AuditError(f"{where}: {sorted(unknown)} are not among its interpreters")
    if unknown := set(t.target_maps) - set(TARGET_MAPS):
        raise AuditError(f"unknown target maps {sorted(unknown)}; known: {', '.join(TARGET_MAPS)}")
    if "other" in t.target_maps and t.data == "photos":
        raise AuditError("'other' target maps need labelled data (fashion-mnist or an ImageFolder)")
    if t.schedule not in ("paper", "short"):
        raise AuditError(f"schedule must be 'paper' or 'short', not {t.schedule!r}")
    for kind in {"mask" if n == "mask" else "grad" for n in _adv2_names(t)} if t.adv2_options else ():
        try:  # constructing an attack is cheap and names a bad option the way the attack's signature does
            make_adv2(kind, 8 / 255, t.schedule, shorten=t.shorten, **t.adv2_options)
        except (TypeError, ValueError) as exc:
            raise AuditError(f"{where}: adv2_options {t.adv2_options} do not fit ADV²-{kind}: {exc}") from None
    if t.weights == "random" and not t.model.startswith("torchvision:"):
        raise AuditError(f"{where}: weights 'random' applies to torchvision:<arch> models only")
    if t.model.startswith("torchvision:") and t.weights is None:
        raise AuditRefused(f"{where}: torchvision:<arch> without weights is an untrained network and cannot be "
                           f"audited as a deployment; pass --weights IMAGENET1K_V1 (or a state_dict file), or "
                           f"--weights random to audit random weights on purpose (labelled so in the report)")


def _entry_point(model: str) -> bool:
    """A ``module:function`` model spec (its function may hand over interpreters of its own names)."""
    return ":" in model and not model.startswith("torchvision:") and not model.endswith((".pt", ".pth"))


def _type_ok(v, hint) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(v, h) for h in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(v, list) and all(_type_ok(x, item) for x in v)
    if hint is type(None):
        return v is None
    if hint is bool:
        return isinstance(v, bool)
    if hint is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if hint is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return isinstance(v, hint)


def _type_name(hint) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(hint)[0]).split(' ', 1)[1]}s"
    return {type(None): "absent", bool: "a boolean (true / false)", int: "an integer", float: "a number",
            str: "a string"}.get(hint, getattr(hint, "__name__", str(hint)))


def _check_types(values: dict, cls: type, where: str) -> None:
    """Each value of ``values`` against the annotation of the field of ``cls`` with its name."""
    hints = typing.get_type_hints(cls)
    for k, v in values.items():
        if k != "targets" and k in hints and not _type_ok(v, hints[k]):
            raise AuditError(f"setting {where}{k} must be {_type_name(hints[k])}, got {v!r}")


def check_device(device: str) -> None:
    """Refuse a device string that names no device of this machine (before anything is loaded)."""
    if device == "auto":
        return
    try:
        d = torch.device(device)
    except (RuntimeError, ValueError):
        raise AuditError(f"device {device!r} is not a device name; use auto, cpu, cuda or cuda:N") from None
    if d.type == "cpu":
        return
    if d.type != "cuda":
        raise AuditError(f"device {device!r} is not supported by the audit; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise AuditError(f"device {device!r} was asked for but this machine has no usable CUDA GPU; "
                         f"use --device cpu (or auto)")
    if d.index is not None and d.index >= torch.cuda.device_count():
        raise AuditError(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")


# ------------------------------------------------------------------------------------------------------------
# Deployment and data
# ------------------------------------------------------------------------------------------------------------
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


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _load_data(t: Target, model) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(pool x, pool y or None when unlabelled, calibration x, held-out x)."""
    c, h, _ = model.input_size
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
        if len(x) <= t.n:
            return x, None, None, None
        # benign data for the detectors: crops and flips of the images that are not audited (the first n
        # are); held-out = other crops of the same images, so its FPR is an optimistic estimate
        rest = x[t.n:]
        return x, None, _augment(rest, t.calibration_n, 1), _augment(rest, t.calibration_n, 2)
    if not root.is_dir():
        raise AuditError(f"data {t.data!r} is neither fashion-mnist, photos, a folder of images nor an ImageFolder "
                         f"directory")
    ds = ImageFolderDataset(root, size=h, channels=c)
    if len(ds.classes) > model.num_classes:
        raise DataError(f"{root} has {len(ds.classes)} class folders but model {model.name} has "
                        f"{model.num_classes} classes (folders must be in the model's class order)")
    x, y = stack(ds)
    rest = x[2 * t.n:]
    half = len(rest) // 2
    return x, y, (rest[:half] if half else None), (rest[half:] if half else None)


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


def _looks_like_probabilities(z: torch.Tensor) -> bool:
    """(B, K) outputs that are non-negative and sum to 1 per row: softmax probabilities, not logits."""
    return bool((z >= 0).all()) and torch.allclose(z.sum(1), torch.ones_like(z[:, 0]), atol=1e-3)


def _check_outputs(t: Target, model, x: torch.Tensor) -> None:
    """Finite (B, K) outputs, and logits unless the target declares probabilities."""
    with torch.no_grad():
        z = model(x[:8])
    if not torch.isfinite(z).all():
        raise AuditError(f"model {model.name} returns NaN or inf on the audit data")
    if z.ndim != 2 or z.shape[1] != model.num_classes:
        raise AuditError(f"model {model.name} must return logits (B, {model.num_classes}), got {tuple(z.shape)}")
    probs = _looks_like_probabilities(z)
    if probs and t.outputs == "logits":
        raise AuditRefused(f"model {model.name} returns probabilities (non-negative, each row sums to 1), not "
                           f"logits: the attacks' losses assume logits and would under-report. Declare it with "
                           f"--outputs probs (outputs = \"probs\") and the audit takes their log")
    if not probs and t.outputs == "probs":
        raise AuditError(f"outputs = 'probs' was declared, but model {model.name}'s outputs are not probabilities "
                         f"(negative values, or rows that do not sum to 1); drop --outputs probs")


# the one-sided binomial test behind "at chance": a model whose accuracy cannot be told from 1/K at this level
CHANCE_P = 0.01


def _check_trained(t: Target, model, pred: torch.Tensor, labels: torch.Tensor | None, probs: torch.Tensor) -> None:
    """Refuse a model that is at chance on its own audit data (labelled), or whose predictions on unlabelled
    data are near-uniform or one class for everything: an untrained net, wrong weights, a wrong class order."""
    from scipy.stats import binomtest

    k_cls = model.num_classes
    hint = ("untrained weights, the wrong weights file, or data in another class order? Check with "
            "`underfire predict`; for torchvision:<arch>, --weights random audits random weights on purpose")
    if labels is not None:
        k, n = int((pred == labels).sum()), len(pred)
        p = binomtest(k, n, 1 / k_cls, alternative="greater").pvalue
        if p > CHANCE_P:
            raise AuditRefused(f"model {model.name} is at chance on {t.data}: {k}/{n} correct ({k / n:.1%}; chance "
                               f"{1 / k_cls:.1%}, one-sided binomial p = {p:.2g}) — {hint}")
        return
    top = probs.amax(1)
    floor = 1 / k_cls + 0.05 * (1 - 1 / k_cls)
    if len(pred) >= 4 and len(set(pred.tolist())) == 1:
        raise AuditRefused(f"model {model.name} predicts class {int(pred[0])} for every one of the {len(pred)} "
                           f"inputs of {t.data} — {hint}")
    if float(top.median()) < floor:
        raise AuditRefused(f"model {model.name} is near-uniform on {t.data}: median top-1 probability "
                           f"{float(top.median()):.3f} (uniform {1 / k_cls:.3f}) — {hint}")


def _gradient_names(t: Target) -> set[str]:
    """Interpreters a gradient attack of this target optimises through."""
    names = set()
    if "adv2" in t.attacks:
        names |= set(_adv2_names(t))
    if "stadv2" in t.attacks and "cam" in t.interpreters:
        names.add("cam")
    if "adaptive" in t.attacks and t.defenses:
        names |= set(_adaptive_names(t))
        detectors = {parts(d)[1] for d in t.defenses}
        if {"ensemble", "ensemble-norm", "learned"} & detectors:
            names |= set(_ensemble_names(t))
        if {"stability", "learned"} & detectors:
            names |= set(_stability_names(t))
    return names


def _preflight(t: Target, model, interps: dict, x: torch.Tensor, y: torch.Tensor, opaque: set) -> list[str]:
    """Gradient checks: PGD needs the logits' gradient (a missing one refuses the audit: it would report a
    deployment it could not attack as safe); a map without a gradient is added to ``opaque`` and attacked with
    queries instead (black-box ADV²). Returns warnings."""
    warnings = []
    if model.training:
        model.eval()
        warnings.append("model was in training mode; the audit put it in eval mode")
    xg = x[:2].clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(xg).gather(1, y[:2, None]).sum(), xg, allow_unused=True)
    if g is None or not torch.isfinite(g).all() or float(g.abs().sum()) == 0:
        raise AuditRefused(f"model {model.name}'s logits have no gradient w.r.t. the input (masked or "
                           f"non-differentiable preprocessing): PGD and ADV² cannot attack it, and an audit would "
                           f"report it safe. Audit the differentiable model behind the preprocessing")
    for name, it in interps.items():
        if name == "mask" or name in opaque:
            continue  # MASK's gradient flows through its unrolled inner steps; checked by the test suite
        xg = x[:2].clone().requires_grad_(True)
        e = it(xg)
        g = None
        if e.saliency.requires_grad:
            (g,) = torch.autograd.grad(e.saliency.sum(), xg, allow_unused=True)
        if g is None or not torch.isfinite(g).all() or float(g.abs().sum()) == 0:
            opaque.add(name)
    return warnings


def gradient_agreement(it, x: torch.Tensor, y: torch.Tensor, directions: int = 6, h: float = 1e-3,
                       seed: int = 0) -> dict:
    """How well a map's autograd gradient predicts its change: along ``directions`` random ±1 directions v, the
    directional derivative ∇⟨w, g(x)⟩·v against the central difference (⟨w, g(x + hv)⟩ − ⟨w, g(x − hv)⟩) / 2h,
    for a fixed random projection w; the RNG is reseeded for every call (a random map compares like with like).
    Returns the cosine between the two vectors and the ratio of their norms. A gradient attack can only follow a
    map whose gradient agrees (cosine ≳ 0.9 for CAM and Grad-CAM on the bundled ResNet); a map detached from its
    input plus a tiny term in x gives cosine ≈ 0 and ratio ≈ 0."""
    gen = torch.Generator().manual_seed(seed)
    x = x.detach().clamp(h, 1 - h)

    def proj(xx: torch.Tensor, w: torch.Tensor | None = None):
        with torch.random.fork_rng(devices=[xx.device] if xx.device.type == "cuda" else []):
            torch.manual_seed(seed)
            m = it(xx, y).saliency
        return m if w is None else (m * w).sum()

    xg = x.clone().requires_grad_(True)
    m = proj(xg)
    w = (torch.randn(m.shape, generator=gen) / m[0].numel() ** 0.5).to(m)
    g = torch.autograd.grad((m * w).sum(), xg, allow_unused=True)[0] if m.requires_grad else None
    g = torch.zeros_like(x) if g is None else g.detach()
    ad, fd = [], []
    for _ in range(directions):
        v = (torch.randint(0, 2, x.shape, generator=gen) * 2 - 1).to(x)
        ad.append(float((g * v).sum()))
        fd.append(float(proj(x + h * v, w).detach() - proj(x - h * v, w).detach()) / (2 * h))
    a, f = torch.tensor(ad), torch.tensor(fd)
    if max(float(a.norm()), float(f.norm())) < 1e-8:
        return {"cosine": 1.0, "ratio": 1.0}  # a flat map: nothing to disagree about
    cos = float(a @ f / (a.norm() * f.norm()).clamp_min(1e-12))
    return {"cosine": round(cos, 3), "ratio": round(float(a.norm() / f.norm().clamp_min(1e-12)), 3)}


def _check_faithful(interps: dict, names: list[str], x: torch.Tensor, y: torch.Tensor, opaque: set) -> dict:
    """A team's maps whose gradient disagrees with their finite differences (cosine < 0.5, or a norm ratio off by
    10×): {name: why}. Their gradient attacks follow another function, so their spoofability is a lower bound."""
    out = {}
    for name in names:
        if name in opaque:
            continue
        ag = gradient_agreement(interps[name], x[:2], y[:2])
        if ag["cosine"] < 0.5 or not 0.1 <= ag["ratio"] <= 10:
            out[name] = (f"its gradient disagrees with its finite differences (cosine {ag['cosine']:.2f}, norm ratio "
                         f"{ag['ratio']:.2f} along random directions): the gradient attack followed another function")
    return out


def _exclude_opaque(t: Target, opaque: set, warnings: list[str]) -> None:
    """Interpreters without a gradient (and no native twin) leave every gradient attack: ADV² becomes black-box
    ADV², and defaults that would optimise through them (the members of the ensemble and stability detectors,
    the adaptive attacks) leave them out, with a note. Named explicitly there, the audit is refused: an
    adaptive attack blind to a member would overstate the defense."""
    for name in sorted(opaque):
        warnings.append(f"BLACK BOX: the {name} map has no gradient w.r.t. the input and no native twin; ADV² "
                        f"attacks it with queries ({THREATS[t.threat_model]}; ≤ {t.queries} queries per image). "
                        f"Its spoofability is a lower bound: a white-box attacker could do at least as well")
    if not opaque:
        return
    for group in ("ensemble_members", "stability_members", "adaptive_interpreters"):
        named = getattr(t, group)
        if named is not None and (bad := opaque & set(named)):
            raise AuditRefused(f"{sorted(bad)} in {group} have no gradient: an adaptive attack cannot optimise "
                               f"through them and would overstate the defense. Leave them out of {group}")
        if named is None:
            default = {"ensemble_members": _ensemble_names, "stability_members": _stability_names,
                       "adaptive_interpreters": _adaptive_names}[group](t)
            setattr(t, group, [n for n in default if n not in opaque])
    for d in NEEDS_TWO:
        if any(parts(x)[1] == d for x in t.defenses) and len(t.ensemble_members) < 2:
            t.defenses = [x for x in t.defenses if parts(x)[1] != d]
            warnings.append(f"note: the {d} defense is dropped: fewer than two interpreters with a gradient to "
                            f"compare once {', '.join(sorted(opaque))} left its members")
    if not t.stability_members:
        for d in ("stability", "learned"):
            if any(parts(x)[1] == d for x in t.defenses):
                t.defenses = [x for x in t.defenses if parts(x)[1] != d]
                warnings.append(f"note: the {d} defense is dropped: no interpreter with a gradient to watch")


def build_deployment(t: Target, seed: int, device: torch.device, precision: str = "fp32",
                     channels_last: bool = False, compile: bool = False) -> Deployment:
    """Load, check (outputs, training, gradients: :class:`AuditRefused` when the audit cannot measure it) and
    select the audited inputs of one target."""
    from underfire.guard.models import from_probabilities

    model = load_model(t.model, t.weights).to(device).eval()
    provided = getattr(model, "provided_interpreters", {})  # handed over by a module:function entry point
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    pool_x, pool_y, x_cal, x_held = _load_data(t, model)
    pool_x = pool_x.to(device)
    _check_outputs(t, model, pool_x)
    if t.outputs == "probs":
        model = from_probabilities(model)
    interps = {n: provided[n] if n in provided else build_interpreter(n, model) for n in t.interpreters}
    warnings, transfer, opaque = [], {}, set()
    for n, it in list(interps.items()):  # adapters (captum:, gradcam:) compute without a gradient
        if isinstance(it, Adapter):
            twin = build_twin(it, model)
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
        _check_trained(t, model, pred, None if pool_y is None else pool_y.to(device), z.softmax(1))
    y = pred if pool_y is None else pool_y.to(device)  # unlabelled photos: the model's prediction is "y"
    ok = (pred == y).nonzero().squeeze(1)[: t.n]
    if len(ok) == 0:
        raise AuditError(f"model {model.name} classifies none of the {len(pool_x)} inputs of {t.data} correctly")
    x, y = pool_x[ok], y[ok]
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y_t = target_classes(y.cpu(), model.num_classes, torch.Generator().manual_seed(seed)).to(device)
    warnings += _preflight(t, model, interps, x, y, opaque)
    unfaithful = _check_faithful(interps, [n for n in interps if n in provided], x, y, opaque)
    for n, why in unfaithful.items():
        warnings.append(f"UNFAITHFUL GRADIENT: {n}: {why}; its spoofability is a lower bound")
    _exclude_opaque(t, opaque, warnings)
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
            kw = {"smooth": {"sigma": t.smooth_sigma, "samples": t.smooth_samples}, "beta": {"beta": t.beta}}.get(d, {})
            defended[d] = {}
            for n in _adaptive_names(t):
                if map_defense_name(d, n):
                    try:
                        defended[d][n] = build_interpreter(map_defense_name(d, n), model, **kw).to(device)
                    except InterpreterError as exc:  # e.g. no RTS^A checkpoint for this model
                        warnings.append(f"the {d} defense of {n} is not available: {exc}")
            if not defended[d]:
                warnings.append(f"the {d} defense applies to none of the adaptively attacked interpreters "
                                f"({', '.join(_adaptive_names(t))}); it has no row")
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


TORCH_SQUEEZERS = ("bits-2", "bits-3", "median-2", "median-3")


def _make_detector(t: Target, dep: Deployment, d: str):
    members = [dep.interpreters[n] for n in _ensemble_names(t)]
    if d == "squeeze":
        return SqueezeDetector(dep.model)
    if d == "ensemble":
        return DisagreementDetector(members)
    if d == "ensemble-norm":
        return NormalisedDisagreementDetector(members)
    if d == "stability":
        return StabilityDetector([dep.interpreters[n] for n in _stability_names(t)])
    # the learned detector's squeezing part keeps the torch squeezers: OpenCV's non-local means runs per image on
    # the CPU and would dominate every step of its adaptive attack (it is in the squeeze defense itself)
    parts = [SqueezeDetector(dep.model, TORCH_SQUEEZERS)]
    if len(members) >= 2:
        parts.append(NormalisedDisagreementDetector(members))
    parts.append(StabilityDetector([dep.interpreters[n] for n in _stability_names(t)]))
    return LearnedDetector(parts)


def _train_learned(t: Target, dep: Deployment, det: LearnedDetector, progress: Progress) -> torch.Tensor:
    """Train on the first half of the calibration set: benign, and PGD + each adaptive interpreter's ADV² of its
    first ``learned_n`` images (their own predictions as classes). Returns the other half, for the threshold."""
    half = len(dep.x_cal) // 2
    if half < 2:
        raise AuditError(f"the learned defense needs at least 4 benign calibration inputs; {t.data} has "
                         f"{len(dep.x_cal)}")
    x_fit, x_thr = dep.x_cal[:half], dep.x_cal[half:]
    xa = x_fit[: t.learned_n]
    with torch.no_grad():
        y = dep.model(xa).argmax(1)
    y_t = target_classes(y.cpu(), dep.model.num_classes, torch.Generator().manual_seed(1)).to(y.device)
    progress(f"{t.key()}: learned detector: attacking {len(xa)} calibration inputs (PGD, ADV² "
             f"{', '.join(_adaptive_names(t))})")
    attacked = [_pgd(t, dep)(next(iter(dep.interpreters.values())), xa, y_t).x_adv]
    for n in _adaptive_names(t):
        it = dep.interpreters[n]
        attacked.append(_adv2(t, dep, n)(it, xa, y_t, benign_maps(it, xa)).x_adv)
    det.train(x_fit, torch.cat(attacked))
    return x_thr


def build_detectors(t: Target, dep: Deployment, fpr: float, progress: Progress) -> dict:
    dets = {}
    for d in dict.fromkeys(parts(x)[1] for x in t.defenses):  # detectors, alone or combined with a map defense
        if d not in DETECTORS:
            continue
        if dep.x_cal is None or len(dep.x_cal) == 0:
            raise AuditError(f"the {d} defense needs benign calibration data; {t.data} has none to spare")
        det = _make_detector(t, dep, d)
        x_thr = _train_learned(t, dep, det, progress) if d == "learned" else dep.x_cal
        progress(f"{t.key()}: calibrating {d} at FPR {fpr:.0%} on {len(x_thr)} benign inputs")
        det.calibrate(x_thr, fpr, heldout=dep.x_heldout)
        dets[d] = det
    return dets


# ------------------------------------------------------------------------------------------------------------
# One batch: every attack, every metric, per sample
# ------------------------------------------------------------------------------------------------------------
def _detect(dets: dict, x_adv: torch.Tensor) -> dict:
    """Every detector's per-score flags, and its decision score, for a batch of adversarial images (they do not
    depend on the reader): {"flags": {d: {score: [bool]}}, "scores": {d: [float]}}."""
    from underfire.guard.interpreters.base import check_input

    out = {"flags": {}, "scores": {}}
    if dets:
        check_input(x_adv, next(iter(dets.values())).model)  # every detector watches the deployment's model
    for d, det in dets.items():
        with torch.no_grad():
            s = det.scores(x_adv)
        out["flags"][d] = {k: v.tolist() for k, v in det.flag_scores(s).items()}
        out["scores"][d] = s[det.decision].tolist()
    return out


def _record(it, x_adv: torch.Tensor, y_t: torch.Tensor, bm: torch.Tensor, dets: dict, keep: int,
            detected: dict | None = None) -> dict:
    """Per-sample metrics of one attack read by one interpreter; pictures of the first ``keep`` samples.

    ``detected``: the flags from :func:`_detect` when the same images are read by several interpreters."""
    from underfire.audit.report import png_b64

    with torch.no_grad():
        e = it(x_adv)
    rec = {"success": (e.logits.argmax(1) == y_t).tolist(), "confidence": confidence(e.logits).tolist(),
           "l1": l1(e.saliency, bm).tolist(), "iou_curve": iou_curve(e.saliency, bm).tolist(),
           "predicted": e.logits.argmax(1).tolist()}
    det = detected if detected is not None else _detect(dets, x_adv)
    rec["detected"], rec["detector_scores"] = det["flags"], det["scores"]
    rec.update(_pictures(it, x_adv[:keep], e.saliency[:keep]))
    return rec


def _attack_batch(t: Target, dep: Deployment, dets: dict, sl: slice, seed: int, keep: int,
                  progress: Progress) -> dict:
    x, y_t = dep.x[sl], dep.y_t[sl]
    keep = max(0, min(keep - sl.start, len(x)))  # samples of this batch shown in the report
    out: dict = {"index": list(range(sl.start, sl.stop)), "interpreters": {}}
    bms = {name: benign_maps(it, x) for name, it in dep.interpreters.items()}
    noise = ({n: dep.noise[n][sl] for n in dep.interpreters} if dep.noise is not None
             else _noise_l1(t, dep, sl, seed, bms))
    for name, d in noise.items():
        out["interpreters"][name] = {"noise_l1": d}
    for name, it in dep.interpreters.items():
        if isinstance(it, Smoothed):  # the certificate of its benign top-k map, per input
            progress(f"certifying {name}")
            cert = it.certify(x, dep.y[sl], samples=CERT_SAMPLES, k=CERT_K)
            out["interpreters"][name]["certified"] = cert["certified"].tolist()  # (B, len(RADII))
    adv_x, spent = {}, {}
    if "pgd" in t.attacks:
        progress("PGD")
        first = next(iter(dep.interpreters.values()))
        xp = _pgd(t, dep)(first, x, y_t, progress=_steps(progress)).x_adv
        flags = _detect(dets, xp)
        for name, it in dep.interpreters.items():
            out["interpreters"][name]["pgd"] = _record(it, xp, y_t, bms[name], dets, keep, flags)
    for name, it in dep.interpreters.items():
        if "adv2" in t.attacks and name in _adv2_names(t) and name not in dep.opaque:
            for kind in t.target_maps:
                progress(f"ADV²-{name.upper()}" + ("" if kind == "benign" else f" → {kind} target maps"))
                map_t = bms[name] if kind == "benign" else _target_maps(kind, it, dep, x, y_t, seed + sl.start)
                if kind == "benign" and isinstance(it, Transfer):  # its judgements read the real map: queries
                    r, spent[name] = _transfer(t, dep, name, it, x, y_t, map_t)
                elif kind == "benign" and _strong_rows(t):  # the attack ensemble, worst case per input
                    r = _strong(t, dep, f"ADV²-{name.upper()}", name, it, x, y_t, map_t, dep.tau[name], dets,
                                None, keep, progress)
                else:
                    r = _adv2(t, dep, name)(dep.views.get(name, it), x, y_t, map_t, progress=_steps(progress))
                rec = r.record if hasattr(r, "record") else _record(it, r.x_adv, y_t, map_t, dets, keep)
                if kind == "benign":
                    adv_x[name] = r.x_adv
                    if name in spent:
                        rec["queries"] = spent[name].tolist()
                    out["interpreters"][name]["adv2"] = rec
                else:
                    rec["benign_l1_to_target"] = l1(bms[name], map_t).tolist()
                    out["interpreters"][name][f"adv2-{kind}"] = rec
        if name in _blackbox_names(t, dep):
            if isinstance(it, Transfer) and name not in spent:  # the transfer result is the start
                r, spent[name] = _transfer(t, dep, name, it, x, y_t, bms[name])
                adv_x[name] = r.x_adv
            progress(f"black-box ADV²-{name} ({t.threat_model}, ≤ {t.queries} queries per image"
                     + (", from the transfer result)" if name in spent else ")"))
            r = _blackbox(t, dep, sl.start)(Counted(it), x, y_t, bms[name], start=adv_x.get(name) if name in spent
                                            else None, spent=spent.get(name, 0), progress=_steps(progress))
            rec = _record(it, r.x_adv, y_t, bms[name], dets, keep)
            rec["queries"], rec["trace"] = r.history["queries"], r.history["trace"]
            out["interpreters"][name]["blackbox"] = rec
        if "adaptive" in t.attacks and name in _adaptive_names(t):
            for d in t.defenses:
                if d in DETECTORS and d != "ensemble":  # the ensemble's attack goes through all members, below
                    progress(f"adaptive ADV²-{name.upper()} vs {d}")
                    if _strong_rows(t):
                        r = _strong(t, dep, f"adaptive ADV²-{name.upper()} vs {d}", name, it, x, y_t, bms[name],
                                    dep.tau[name], dets, d, keep, progress, ADAPTIVE_LAM)
                        out["interpreters"][name][f"adaptive-{d}"] = r.record
                        continue
                    a = adaptive(_adv2(t, dep, name, lam_scale=ADAPTIVE_LAM), dets[d])
                    r = a(dep.views.get(name, it), x, y_t, bms[name], progress=_steps(progress))
                    out["interpreters"][name][f"adaptive-{d}"] = _record(it, r.x_adv, y_t, bms[name], dets, keep)
                elif name in dep.defended.get(parts(d)[0], {}):
                    out["interpreters"][name][f"defense-{d}"] = _map_defense(t, dep, d, name, sl, seed, keep,
                                                                              bms[name], progress, dets)
    if "adaptive" in t.attacks and "ensemble" in t.defenses:
        members = [dep.interpreters[n] for n in _ensemble_names(t)]  # the loss covers every member at once
        if len(members) >= 2:
            ens = InterpreterEnsemble(members)
            progress(f"adaptive ADV² vs the ensemble ({ens.name})")
            a = adaptive(_adv2(t, dep, "ensemble", lam_scale=ADAPTIVE_LAM),
                         dets["ensemble"])
            xe = a(ens, x, y_t, benign_maps(ens, x), progress=_steps(progress)).x_adv
            flags = _detect(dets, xe)
            for name, it in dep.interpreters.items():
                out["interpreters"][name]["adaptive-ensemble"] = _record(it, xe, y_t, bms[name], dets, keep, flags)
    if "stadv2" in t.attacks and "cam" in dep.interpreters:
        progress("stAdv-ADV²-CAM")
        it = dep.interpreters["cam"]
        s = 1 if t.schedule == "paper" else t.shorten
        r = StAdv2(steps=(max(1, 200 // s), max(1, 600 // s)), **dep.attack_kw)(it, x, y_t, bms["cam"])
        out["interpreters"]["cam"]["stadv2"] = _record(it, r.x_adv, y_t, bms["cam"], dets, keep)
    out["transfer"] = {a: {b: l1(benign_maps(dep.interpreters[b], xa), bms[b]).tolist() for b in dep.interpreters}
                       for a, xa in adv_x.items()}
    return out


def _map_defense(t: Target, dep: Deployment, d: str, name: str, sl: slice, seed: int, keep: int,
                 plain_bm: torch.Tensor, progress: Progress, dets: dict) -> dict:
    """A map defense of interpreter ``name`` (alone, or with a detector: ``smooth+squeeze``): its own noise
    level, ADV² against the defended map itself (for smoothing an EOT attack: every step's map averages fresh
    noise; with a detector, its hinge added), the fidelity cost L1(defended benign map, plain benign map), and for
    smoothing the certificate."""
    m, det = parts(d)
    it = dep.defended[m][name]
    x, y, y_t = dep.x[sl], dep.y[sl], dep.y_t[sl]
    bm = benign_maps(it, x)
    progress(f"ADV²-{name.upper()} vs its {d} defense ({it.name}" + (f" + {det} detector)" if det else ")"))
    judged = {det: dets[det]} if det else {}
    if _strong_rows(t):
        rec = _strong(t, dep, f"ADV²-{name.upper()} vs {d}", it.name, it, x, y_t, bm, dep.tau[f"{d}/{name}"],
                      judged, det, keep, progress, ADAPTIVE_LAM if det else 1.0).record
        rec["noise_l1"] = dep.noise[f"{d}/{name}"][sl]
    else:
        atk = adaptive(_adv2(t, dep, it.name, lam_scale=ADAPTIVE_LAM), dets[det]) if det else _adv2(t, dep, it.name)
        r = atk(it, x, y_t, bm)
        rec = _record(it, r.x_adv, y_t, bm, judged, keep)
        rec["noise_l1"] = _noise_l1(t, dep, sl, seed, {it.name: bm}, {it.name: it})[it.name]
    rec["fidelity_l1"] = l1(bm, plain_bm).tolist()
    if isinstance(it, Smoothed):
        rec["certified"] = it.certify(x, y, samples=CERT_SAMPLES, k=CERT_K)["certified"].tolist()
    return rec


# ------------------------------------------------------------------------------------------------------------
# Attack strength: the ensemble of attack settings per row (attacks/strength.py)
# ------------------------------------------------------------------------------------------------------------
def _strong_rows(t: Target) -> bool:
    """Whether the rows run the attack ensemble (every strength above quick)."""
    return t.attack_strength != "quick"


def measure_noise(t: Target, dep: Deployment, index: list[list[int]], seed: int) -> None:
    """Above quick strength: every input's map-noise draws (per batch slice, as the batches would draw them)
    for each interpreter and each map defense, and τ from all of them, before any attack — the ensemble needs
    τ while it runs to know which inputs are spoofed. The batch records carry these same draws, so the
    aggregate's τ is this one."""
    if not _strong_rows(t):
        return
    noise: dict = {}
    map_rows = [(d, n, it) for d in t.defenses if parts(d)[0] and "adaptive" in t.attacks
                for n, it in dep.defended.get(parts(d)[0], {}).items() if n in _adaptive_names(t)]
    for ix in index:
        sl = slice(ix[0], ix[-1] + 1)
        with torch.random.fork_rng(devices=[dep.x.device] if dep.x.device.type == "cuda" else []):
            torch.manual_seed(seed + sl.start + 104729)
            x = dep.x[sl]
            bms = {n: benign_maps(it, x) for n, it in dep.interpreters.items()}
            for n, v in _noise_l1(t, dep, sl, seed, bms).items():
                noise.setdefault(n, []).extend(v)
            for d, n, it in map_rows:
                v = _noise_l1(t, dep, sl, seed, {it.name: benign_maps(it, x)}, {it.name: it})[it.name]
                noise.setdefault(f"{d}/{n}", []).extend(v)
    dep.noise = noise
    dep.tau = {k: noise_level(v, 0, 0)["tau"] for k, v in noise.items()}


def _eot_view(t: Target, it, factor: int):
    """The attacker's view of a random map from ``factor`` × its copies (Transfer: judged by the real map), or
    None where the map is not random or the factor is 1."""
    base = t.attack_samples or getattr(it, "samples", None)
    if factor <= 1 or not isinstance(base, int) or not hasattr(it, "sampled"):
        return None
    view = it.sampled(base * factor)
    return None if view is None else Transfer(view, it)


def _member_attack(t: Target, dep: Deployment, name: str, m: Member, det, lam_scale: float):
    """The row's attack with member ``m``'s settings: ADV² overrides, longer schedule, random restart, and the
    detector's hinge (its weight / margin / first stage as ``m`` says)."""
    kw = dict(m.adv2)
    base = lam_scale if lam_scale != 1.0 else (t.adv2_options or {}).get("lam_scale", 1.0)
    ls = base * kw.pop("lam_scale", 1.0)
    atk = _adv2(t, dep, name, lam_scale=ls, **kw)
    if m.schedule > 1:
        atk = _adv2(t, dep, name, lam_scale=ls, steps=tuple(s.steps * m.schedule for s in atk.stages), **kw)
    if m.restart:
        atk.threat.random_start, atk.seed = True, m.restart
    if det is not None:
        atk = adaptive(atk, det, **m.hinge)
    return atk


def _strong(t: Target, dep: Deployment, label: str, name: str, it, x: torch.Tensor, y_t: torch.Tensor,
            bm: torch.Tensor, tau: float, judged: dict, det: str | None, keep: int, progress: Progress,
            lam_scale: float = 1.0) -> types.SimpleNamespace:
    """One row at the target's attack strength: the members cheapest first, each on the inputs no earlier one
    spoofed (c_t on the 8-bit image, the map within ``tau``, and undetected by ``det`` where the row has one).
    Returns x_adv (per input the spoofing member's image, else the best one) and the merged record with its
    "ensemble" part (which member each input's record came from, which first spoofed it)."""
    view0 = dep.views.get(name, it)
    random_map = _eot_view(t, it, 2) is not None
    tunable = dep.transfer.get(name, name).removeprefix("smooth:").removeprefix("beta:") != "mask"
    ms = [m for m in members(t.attack_strength, det is not None, random_map) if tunable or not m.adv2]

    def attack_with(m: Member, idx: torch.Tensor) -> torch.Tensor:
        progress(f"{label} [{m.name}: {len(idx)} inputs left]")
        view = (_eot_view(t, it, m.eot) or view0) if m.eot > 1 else view0
        atk = _member_attack(t, dep, name, m, judged[det] if det else None, lam_scale)
        return atk(view, x[idx], y_t[idx], bm[idx], progress=_steps(progress)).x_adv

    def judge(xa: torch.Tensor, idx: torch.Tensor):
        rec = _record(it, xa, y_t[idx], bm[idx], judged, 0)
        rec.pop("images"), rec.pop("maps")
        ok, dist = rec["success"], rec["l1"]
        flag = rec["detected"][det][judged[det].decision] if det else [False] * len(ok)
        spoofed = [bool(s) and v <= tau and not f for s, v, f in zip(ok, dist, flag)]
        keys = [(sp, bool(s) and not f, bool(s), -v) for sp, s, f, v in zip(spoofed, ok, flag, dist)]
        return rec, spoofed, keys

    out = run_ensemble(ms, attack_with, judge, len(x))
    rec = out["record"]
    rec.update(_pictures(it, out["x_adv"][:keep]))
    rec["ensemble"] = {"member": out["member"], "spoofed_by": out["spoofed_by"],
                       # per batch (merged batches concatenate them): the members, their cost, time and inputs
                       "count": [len(ms)], "names": [m.name for m in ms], "costs": [m.cost(random_map) for m in ms],
                       "seconds": out["seconds"], "ran": out["ran"]}
    return types.SimpleNamespace(x_adv=out["x_adv"], record=rec)


def _pictures(it, x_adv: torch.Tensor, maps: torch.Tensor | None = None) -> dict:
    """PNGs of adversarial images and their maps (``it``'s, unless given), for the report."""
    from underfire.audit.report import png_b64

    if maps is None and len(x_adv):
        with torch.no_grad():
            maps = it(x_adv).saliency
    return {"images": [png_b64(im) for im in x_adv],
            "maps": [png_b64(it.upsample(m[None], x_adv.shape[-2:])[0], cmap=True) for m in maps] if len(x_adv) else []}


def _noise_l1(t: Target, dep: Deployment, sl: slice, seed: int, bms: dict,
              interpreters: dict | None = None) -> dict[str, list[list[float]]]:
    """Per interpreter and input, ``noise_draws`` values of L1(g(x + u | y), g(x | y)): map noise only, the
    benign class y fixed (a draw that flips the prediction does not swap in another class's map)."""
    x, y = dep.x[sl], dep.y[sl]
    interpreters = dep.interpreters if interpreters is None else interpreters
    gen = torch.Generator().manual_seed(seed + sl.start)
    amplitude = dep.eps / 2 if t.noise is None else t.noise / 255
    per = {name: [] for name in interpreters}
    for _ in range(t.noise_draws):
        u = (torch.rand(x.shape, generator=gen, dtype=x.dtype).to(x.device) * 2 - 1) * amplitude
        x_noise = torch.round((x + u).clamp(0, 1) * 255) / 255
        for name, it in interpreters.items():
            per[name].append(l1(benign_maps(it, x_noise, y), bms[name]))  # (B,)
    return {name: torch.stack(d, 1).tolist() for name, d in per.items()}  # (B, draws)


def _target_maps(kind: str, it, dep: Deployment, x: torch.Tensor, y_t: torch.Tensor, seed: int) -> torch.Tensor:
    """Random shapes, or the benign map of another (not audited) image of class c_t (Tables 6 and 8)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "shapes":
        return random_shapes(len(x), it.native_size(tuple(x.shape[-2:])), gen).to(x)
    if dep.pool is None:
        raise AuditError("'other' target maps need labelled images beyond the audited ones")
    return other_class_maps(it, y_t, dep.pool[0], dep.pool[1], gen).to(x)


def _pgd(t: Target, dep: Deployment) -> PGD:
    return PGD(dep.eps, steps=1000 // (t.shorten if t.schedule == "short" else 1), **dep.attack_kw)


def _adv2(t: Target, dep: Deployment, name: str, **kw):
    """The ADV² of the paper for interpreter ``name`` with this target's schedule, the run's precision and
    compile setting."""
    name = dep.transfer.get(name, name)  # an adapter is attacked through its twin, with the twin's preset
    return make_adv2(name, dep.eps, t.schedule, shorten=t.shorten, **{**(t.adv2_options or {}), **dep.attack_kw, **kw})


def _steps(progress):
    """The attack loop's step callback carried by the runner's message function, if any (bars on a terminal)."""
    return getattr(progress, "steps", None)


def _transfer(t: Target, dep: Deployment, name: str, it: Transfer, x, y_t, map_t):
    """ADV² against an adapter's native twin, judged by the adapter's map; (result, queries per image)."""
    counted = Counted(it)
    return transfer_start(_adv2(t, dep, name), Transfer(it.twin, counted), x, y_t, map_t, counted)


def _blackbox(t: Target, dep: Deployment, seed: int) -> QueryAdv2:
    return QueryAdv2(dep.eps, t.queries, t.threat_model, seed=seed)


def _blackbox_names(t: Target, dep: Deployment) -> list[str]:
    """Interpreters black-box ADV² attacks: those without a gradient whenever ADV² runs, every ADV² target with
    ``blackbox`` among the attacks."""
    names = _adv2_names(t)
    return [n for n in names if ("adv2" in t.attacks and n in dep.opaque) or "blackbox" in t.attacks]


def _adv2_names(t: Target) -> list[str]:
    return list(t.interpreters) if t.adv2_interpreters is None else list(t.adv2_interpreters)


def _ensemble_names(t: Target) -> list[str]:
    """Members of the disagreement detector. MASK is left out by default for time: the detector solves it
    (300 optimisation steps) for every calibration and judged input, and the adaptive attacker tracks it at
    every step (with MASK the table9 run takes 38 min instead of 11 on one CPU core; README, ensembles)."""
    if t.ensemble_members is not None:
        return list(t.ensemble_members)
    return [n for n in t.interpreters if n != "mask"]


def _stability_names(t: Target) -> list[str]:
    """Members of the stability detector: like the ensemble's, all interpreters but MASK unless named."""
    if t.stability_members is not None:
        return list(t.stability_members)
    return [n for n in t.interpreters if n != "mask"]


def _adaptive_names(t: Target) -> list[str]:
    if t.adaptive_interpreters is not None:
        return list(t.adaptive_interpreters)
    return [n for n in t.interpreters if n != "mask"]


# ------------------------------------------------------------------------------------------------------------
# Merge, aggregate, score
# ------------------------------------------------------------------------------------------------------------
def merge_batches(batches: list[dict]) -> dict:
    """Concatenate per-sample lists of batch records (in batch order) into one record of the same shape."""
    def cat(items):
        if isinstance(items[0], dict):
            return {k: cat([it[k] for it in items]) for k in items[0]}
        return [v for it in items for v in it]
    return cat(batches)


def _ci(values: list[float], n_boot: int, seed: int) -> dict:
    t = torch.tensor(values, dtype=torch.float64)
    if t.numel() == 0:
        return {"mean": None, "std": None, "ci95": None, "n": 0}
    if t.numel() == 1 or n_boot <= 0:
        return {"mean": float(t.mean()), "std": 0.0, "ci95": [float(t.mean())] * 2, "n": int(t.numel())}
    idx = torch.randint(0, t.numel(), (n_boot, t.numel()), generator=torch.Generator().manual_seed(seed))
    means = t[idx].mean(1)
    return {"mean": float(t.mean()), "std": float(t.std()), "n": int(t.numel()),
            "ci95": [float(means.quantile(0.025)), float(means.quantile(0.975))]}


def noise_level(per_input: list[list[float]], n_boot: int, seed: int) -> dict:
    """τ = the 95th percentile of the map-noise L1 pooled over inputs × draws, and its stability: the
    percentile-bootstrap 95% interval of that quantile when the inputs (with all their draws) are resampled."""
    d = torch.tensor(per_input, dtype=torch.float64)  # (N, draws)
    if d.numel() == 0:
        return {"tau": math.nan, "estimate": "none: no noise measurements"}
    tau = float(d.flatten().quantile(0.95))
    out = {"tau": tau, "estimate": "pooled over inputs x draws", "inputs": int(d.shape[0]), "draws": int(d.shape[1]),
           "ci95": [tau, tau]}
    if d.shape[0] > 1 and n_boot > 0:
        idx = torch.randint(0, d.shape[0], (n_boot, d.shape[0]), generator=torch.Generator().manual_seed(seed))
        qs = d[idx].flatten(1).quantile(0.95, dim=1)
        out["ci95"] = [float(qs.quantile(0.025)), float(qs.quantile(0.975))]
    return out


def aggregate(records: dict, decisions: dict, n_boot: int, seed: int, detectors: dict | None = None,
              defenses: list[str] | None = None, fpr: float = 0.05, smooth_samples: int = 8) -> dict:
    """Per interpreter and attack: ASR, MC, L1/IoU over successes, detection rates; spoofability, undefended
    and under each defense's adaptive attack, and the defense comparison (:func:`audit.defenses.compare`).

    Rates (ASR, detection, spoofability) carry exact Clopper–Pearson intervals (:func:`audit.metrics.rate`);
    means of continuous scores (MC, L1, IoU) a percentile bootstrap. ``detectors``: per detector defense its
    decision's held-out FPR, held-out benign decision scores (ROC AUC's benign side) and cost."""
    detectors = detectors or {}
    agg = {}
    for name, per in records["interpreters"].items():
        noise = noise_level(per["noise_l1"], n_boot, seed)
        tau = noise["tau"]
        a_int = {"noise_l1": _ci([v for row in per["noise_l1"] for v in row], n_boot, seed), "tau": tau,
                 "tau_estimate": noise}
        if "certified" in per:
            c = torch.tensor(per["certified"], dtype=torch.float64)  # (N, len(RADII))
            a_int["certified"] = {"radii": list(RADII), "mean": c.mean(0).tolist(), "k": CERT_K,
                                  "samples": CERT_SAMPLES, "alpha": 0.05}
        spoofed = spoofed_inputs(per, tau)
        for atk, rec in per.items():
            if atk in ("noise_l1", "certified"):
                continue
            ok = rec["success"]
            succ = [i for i, s in enumerate(ok) if s]
            row = {"asr": rate(len(succ), len(ok)),
                   "mc": _ci([rec["confidence"][i] for i in succ], n_boot, seed),
                   "l1": _ci([rec["l1"][i] for i in succ], n_boot, seed),
                   "iou": _ci([sum(rec["iou_curve"][i]) / len(K_GRID) for i in succ], n_boot, seed),
                   "iou_curve": [sum(rec["iou_curve"][i][k] for i in succ) / max(len(succ), 1)
                                 for k in range(len(K_GRID))],
                   "detection": {d: {k: rate(sum(v[i] for i in succ), len(succ)) for k, v in flags.items()}
                                 for d, flags in rec["detected"].items()}}
            if "benign_l1_to_target" in rec:  # other target maps: how far the benign map is from the target
                row["benign_l1_to_target"] = _ci(rec["benign_l1_to_target"], n_boot, seed)
            close = [bool(s) and d <= tau for s, d in zip(ok, rec["l1"])]
            if "queries" in rec:  # transfer and black-box ADV²: what the attacker spent reading the real map
                row["queries"] = query_stats(rec, close, tau)
            if "ensemble" in rec:  # the attack ensemble of this row: its convergence check
                row["convergence"] = convergence(rec["ensemble"], len(ok))
                if atk == "adv2":
                    a_int["convergence"] = row["convergence"]
            if atk == "pgd":  # (ADV² and query ADV² need no branch: spoofed_inputs counts them)
                a_int["pgd_within_tau"] = rate(sum(close), len(ok))
            elif atk.startswith("adaptive-"):
                d = atk.split("-", 1)[1]
                undetected = [not f for f in rec["detected"][d][decisions[d]]]
                a_int[f"spoofability_{d}"] = rate(sum(c and u for c, u in zip(close, undetected)), len(ok))
                info = detectors.get(d, {})
                benign = info.get("heldout_scores", [])
                plain = per.get("adv2", {})
                a_int.setdefault("defense_info", {})[d] = {
                    "asr": row["asr"], "cost": info.get("cost"), **_detector_stats(info, rec, d, succ),
                    "convergence": row.get("convergence"),
                    "auc_plain": roc_auc(benign, [plain["detector_scores"][d][i] for i, s in enumerate(plain["success"])
                                                  if s]) if plain else None}
            elif atk.startswith("defense-"):  # a map defense: its own τ, the ADV² against the defended map
                d = atk.split("-", 1)[1]
                m, det = parts(d)
                noise_d = noise_level(rec["noise_l1"], n_boot, seed)
                close = [bool(s) and v <= noise_d["tau"] for s, v in zip(ok, rec["l1"])]
                if det:  # deployed with a detector: a spoof must also go undetected
                    close = [c and not f for c, f in zip(close, rec["detected"][det][decisions[det]])]
                a_int[f"spoofability_{d}"] = rate(sum(close), len(ok))
                a_int.setdefault("defense_info", {})[d] = {
                    "asr": row["asr"], "tau": noise_d["tau"], "tau_estimate": noise_d, "convergence": row.get("convergence"),
                    "fidelity_l1": _ci(rec["fidelity_l1"], n_boot, seed), "cost": map_cost(m, smooth_samples)}
                if det:
                    info = detectors.get(det, {})
                    a_int["defense_info"][d].update(
                        cost=combined_cost(map_cost(m, smooth_samples), info.get("cost")),
                        **_detector_stats(info, rec, det, succ))
                if "certified" in rec:
                    c = torch.tensor(rec["certified"], dtype=torch.float64)
                    a_int["defense_info"][d]["certified"] = {"radii": list(RADII), "mean": c.mean(0).tolist(),
                                                            "k": CERT_K, "samples": CERT_SAMPLES, "alpha": 0.05}
            a_int[atk] = row
        if spoofed:  # an input is spoofed when any attack on the undefended map (ADV², by queries, vs a detector) did
            a_int["spoofability"] = rate(sum(map(any, zip(*spoofed.values()))), len(next(iter(spoofed.values()))))
            if len(spoofed) > 1:
                a_int["spoofability_by"] = {atk: rate(sum(c), len(c)) for atk, c in spoofed.items()}
        for atk in UNDEFENDED:
            if "pgd" in a_int and atk in a_int and a_int["pgd"]["l1"]["mean"] and a_int[atk]["l1"]["mean"] is not None:
                a_int["l1_ratio" if atk == "adv2" else f"l1_ratio_{atk}"] = a_int[atk]["l1"]["mean"] / a_int["pgd"]["l1"]["mean"]
        if defenses and "spoofability" in a_int:
            a_int["comparison"] = compare(a_int, list(defenses), fpr)
        agg[name] = a_int
    transfer = {a: {b: sum(v) / len(v) for b, v in row.items()} for a, row in records.get("transfer", {}).items()}
    return {"interpreters": agg, "transfer": transfer}


UNDEFENDED = ("adv2", "blackbox")  # the plain attacks on the undefended map (adaptive-* ones count too)


def spoofed_inputs(per: dict, tau: float) -> dict[str, list[bool]]:
    """Per attack on the undefended map — ADV², ADV² by queries, and every adaptive ADV² against a detector (a
    detector leaves the map as it is) — which audited inputs it spoofed: c_t reached, map within ``tau``.
    An input is spoofed when any of them did (detection does not matter here: it is the undefended system)."""
    return {atk: [bool(s) and d <= tau for s, d in zip(rec["success"], rec["l1"])]
            for atk, rec in per.items() if atk in UNDEFENDED or atk.startswith("adaptive-")}


def _detector_stats(info: dict, rec: dict, d: str, succ: list[int]) -> dict:
    """A detector's held-out false-positive rate (with its exact interval) and the ROC AUC of held-out benign
    scores against the scores of an attack's successful inputs ``succ`` in record ``rec``."""
    f, n_held = info.get("fpr_heldout"), info.get("n_heldout", 0)
    return {"fpr_heldout": f,
            "fpr_heldout_rate": rate(round(f * n_held), n_held) if f is not None and n_held else None,
            "auc": roc_auc(info.get("heldout_scores", []), [rec["detector_scores"][d][i] for i in succ])}


def query_stats(rec: dict, spoofed: list[bool], tau: float) -> dict:
    """Queries spent per image, and per spoofed input the queries until the attack first held a spoof (the
    first trace point whose best L1 is within τ; a transfer result: all its queries): median and 90th pct."""
    import numpy as np

    per_success = []
    for i, s in enumerate(spoofed):
        if s:
            trace = rec.get("trace", [[]] * len(spoofed))[i]
            per_success.append(next((q for q, d in trace if d is not None and d <= tau), rec["queries"][i]))
    return {"spent_median": float(np.median(rec["queries"])), "spent_max": int(max(rec["queries"])),
            "per_success": {"n": len(per_success),
                            "median": float(np.median(per_success)) if per_success else None,
                            "p90": float(np.percentile(per_success, 90)) if per_success else None}}


def target_status(summary: dict, min_pgd_asr: float) -> dict:
    """Conclusive unless plain PGD failed (fewer than ``min_pgd_asr`` of the inputs reach c_t: the attacks did
    not work on this deployment) or a noise level τ could not be measured."""
    reasons = []
    ints = summary["interpreters"]
    pgd = next((a["pgd"]["asr"] for a in ints.values() if "pgd" in a), None)
    if pgd is None or pgd["mean"] is None:
        reasons.append("plain PGD did not run, so nothing shows that attacks work on this deployment")
    elif pgd["mean"] < min_pgd_asr:
        reasons.append(f"plain PGD reached the target class on only {pgd['k']}/{pgd['n']} inputs (below min_pgd_asr "
                       f"{min_pgd_asr:.0%}): the attacks did not work here (masked gradients, an ε too small for "
                       f"this model, a robust model?) and a low spoofability would mean nothing; raise --eps or "
                       f"check the deployment")
    for name, a in ints.items():
        if math.isnan(a["tau"]):
            reasons.append(f"no noise level τ was measured for {name}")
    return {"conclusive": not reasons, "reasons": reasons, "min_pgd_asr": min_pgd_asr}


def headline(targets: dict) -> dict:
    """The worst undefended spoofability over targets and interpreters, with its exact interval, and whether
    the run can be trusted as a gate: ``status`` is "inconclusive" when any target is, or when no ADV² ran.
    ``lower_bound`` lists the interpreters measured only by transfer or query attacks: their spoofability can
    prove a deployment spoofable, never safe (the CLI's gate passes no run with one below --fail-above)."""
    cands = [(a["spoofability"], f"{key} / {name}") for key, tg in targets.items()
             for name, a in tg["summary"]["interpreters"].items() if "spoofability" in a]
    reasons = [f"{key}: {r}" for key, tg in targets.items() for r in tg["status"]["reasons"]]
    if not cands:
        reasons.append("no ADV² attack ran: spoofability was not measured")
        return {"spoofability": None, "ci95": None, "where": None, "status": "inconclusive", "inconclusive": reasons}
    worst, where = max(cands, key=lambda c: c[0]["mean"])
    lower = [f"{key} / {name}: {a['lower_bound']}" for key, tg in targets.items()
             for name, a in tg["summary"]["interpreters"].items() if a.get("lower_bound")]
    # listed interpreters no attack measured: not even a lower bound; a gate cannot pass over them
    unmeasured = [f"{key} / {name}: {a['not_attacked']}" for key, tg in targets.items()
                  for name, a in tg["summary"]["interpreters"].items() if a.get("not_attacked")]
    # an undefended row whose attack ensemble still gained at its costliest members: a lower bound as well
    lower += [f"{key} / {name}: NOT CONVERGED under the attack ensemble ({a['convergence']['reason']})"
              for key, tg in targets.items() for name, a in tg["summary"]["interpreters"].items()
              if "spoofability" in a and (a.get("convergence") or {}).get("status") == "not converged"]
    return {"spoofability": worst["mean"], "ci95": worst["ci95"], "k": worst["k"], "n": worst["n"], "where": where,
            "interval": worst["interval"], "status": "inconclusive" if reasons else "measured",
            "inconclusive": reasons, "lower_bound": lower, "not_attacked": unmeasured,
            # random weights, asked for: a look at a network, no deployment's figure; it passes no gate
            "untrained": ", ".join(key for key, tg in targets.items()
                                   if (tg.get("target") or {}).get("weights") == "random") or None}


# ------------------------------------------------------------------------------------------------------------
# Examples for the report (small PNGs inside the JSON, so the HTML needs nothing else)
# ------------------------------------------------------------------------------------------------------------
def _examples(t: Target, dep: Deployment, k: int) -> dict:
    from underfire.audit.report import png_b64

    x = dep.x[:k]
    ex = {"images": [png_b64(im) for im in x], "classes": dep.y[:k].tolist(), "targets": dep.y_t[:k].tolist(),
          "categories": list(dep.model.categories), "maps": {}}
    for name, it in dep.interpreters.items():
        bm = benign_maps(it, x) if k else []
        ex["maps"][name] = [png_b64(it.upsample(m[None], x.shape[-2:])[0], cmap=True) for m in bm]
    return ex


# ------------------------------------------------------------------------------------------------------------
# The audit
# ------------------------------------------------------------------------------------------------------------
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
    probes = [("pgd", None)] + [(nm, make_adv2(nm, dep.eps, steps=(0, 1), check_every=1, **dep.attack_kw))
                                 for nm in _adv2_names(t) if nm in dep.interpreters]
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


def resolve_batch_size(cfg: AuditConfig, t: Target, dep: Deployment, journal: "Journal", resume: bool,
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


def _sha(tensors) -> str:
    h = hashlib.sha1()
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def journal_settings(cfg: AuditConfig, t: Target) -> dict:
    """The settings that shape a target's per-sample records (not: name, device, batch size, compile,
    channels-last, bootstrap — they change speed, cutting or aggregation, and are checked elsewhere)."""
    return {"seed": cfg.seed, "fpr": cfg.fpr, "examples": cfg.examples, "precision": cfg.precision,
            **{f"targets.{k}": v for k, v in asdict(t).items()}}


def fingerprint(cfg: AuditConfig, t: Target, dep: Deployment) -> dict:
    """What every journal batch of a target must have been made with: the weights of the model and of every
    interpreter (RTS's saliency net), the audited inputs with their classes and targets, the benign images the
    detectors are calibrated and held out on (every kind of data: a folder's may change between runs), the
    settings."""
    mods = {id(m): m for it in dep.interpreters.values() for m in it.modules()}
    mods.setdefault(id(dep.model), dep.model)
    weights = [v for m in mods.values() for _, v in sorted(m.state_dict().items())]
    benign = [c.float() for c in (dep.x_cal, dep.x_heldout) if c is not None]
    return {"model": _sha(weights), "data": _sha([dep.x.float(), dep.y, dep.y_t]),
            "calibration": _sha(benign), "config": journal_settings(cfg, t)}


def config_diff(old: dict, new: dict) -> list[str]:
    """'key: old → new' for each differing key of two flat settings dicts."""
    return [f"{k}: {old.get(k, '(unset)')!r} → {new.get(k, '(unset)')!r}" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)]


def journal_folder(key: str) -> str:
    """A target's journal folder name: its key with every character but letters, digits and ``@ . _ + -``
    replaced by ``_``, never hidden, ``.`` or ``..`` (so it stays inside the journal folder). Two targets whose
    names meet here are refused up front (:meth:`AuditConfig.validate`)."""
    name = re.sub(r"[^\w@.+-]", "_", key, flags=re.ASCII)
    return name if name and not name.startswith(".") else "_" + name


def digest(rec: dict) -> str:
    """A batch's content digest (SHA-256 of its canonical JSON, the digest itself left out)."""
    body = json.dumps({k: v for k, v in rec.items() if k != "digest"}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


def key_paths(rec, prefix: str = "") -> set[str]:
    """The dict-key paths of a (nested) record: two batches of one run have the same."""
    if not isinstance(rec, dict):
        return set()
    return {p for k, v in rec.items() for p in {f"{prefix}/{k}", *key_paths(v, f"{prefix}/{k}")}}


class Journal:
    """Per-batch JSON files under run_dir/journal/<target>/; written atomically, read back on resume.

    Each batch carries the target's :func:`fingerprint`, the sample indices it covers and a digest of its own
    content; ``load`` refuses a batch made with other weights, data or settings, or one moved from another
    batch's place, and redoes one whose content no longer matches its digest (edited or damaged since it was
    written: ``redone`` lists them, and the report says so)."""

    def __init__(self, run_dir: Path, target_key: str, fingerprint: dict | None = None) -> None:
        self.dir = run_dir / "journal" / journal_folder(target_key)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.fingerprint = fingerprint
        self.redone: list[int] = []

    def path(self, i: int) -> Path:
        return self.dir / f"batch_{i:05d}.json"

    def load(self, i: int, index: list[int] | None = None) -> dict | None:
        """Batch ``i`` (without its fingerprint and digest), None when absent, half-written or failing its digest
        (then it is redone); AuditError when it is not this run's batch ``i`` covering samples ``index``."""
        p = self.path(i)
        if not p.is_file():
            return None
        try:
            rec = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            log.warning("journal %s is unreadable (killed mid-write?); redoing that batch", p)
            return None
        if not isinstance(rec, dict):
            raise AuditError(f"journal {p} is not a journal batch (a JSON {type(rec).__name__}); start the run again "
                             f"with --overwrite (or another --name)")
        if self.fingerprint is not None and rec.get("digest") != digest(rec):
            if "digest" not in rec:
                raise AuditError(f"journal {p} carries no digest (written by an older underfire): it cannot be "
                                 f"checked; start the run again with --overwrite (or another --name)")
            log.warning("journal %s does not match its digest (edited or damaged); redoing that batch", p)
            if i not in self.redone:
                self.redone.append(i)
            return None
        rec.pop("digest", None)
        got = rec.pop("fingerprint", None)
        if self.fingerprint is not None:
            self._verify(p, got, rec.get("index"), index)
        return rec

    def _verify(self, p: Path, got: dict | None, have: list | None, want: list[int] | None) -> None:
        again = "start the run again with --overwrite (or another --name)"
        if not isinstance(got, dict) or set(got) != set(self.fingerprint):
            raise AuditError(f"journal {p} carries no fingerprint of this version (written by an older underfire, or "
                             f"not a journal batch): it cannot be checked against this run; {again}")
        if want is not None and have != want:
            span = f"{have[0]}–{have[-1]}" if isinstance(have, list) and have else repr(have)
            raise AuditError(f"journal {p} covers samples {span}, but batch {p.stem} is samples {want[0]}–{want[-1]}: "
                             f"the file was moved or copied; {again}")
        fp = self.fingerprint
        if got["model"] != fp["model"]:
            raise AuditError(f"journal {p} was made with other weights (model fingerprint {got['model']} ≠ "
                             f"{fp['model']}): the model or interpreter files changed since the run started; {again}")
        if got["config"] != fp["config"]:
            raise AuditError(f"journal {p} was made with other settings ({'; '.join(config_diff(got['config'], fp['config']))}); "
                             f"resume with the same settings, or {again}")
        for part, what in (("data", "audit data"), ("calibration", "calibration / held-out images")):
            if got[part] != fp[part]:
                raise AuditError(f"journal {p} was made on other {what} ({part} fingerprint {got[part]} ≠ {fp[part]}): "
                                 f"the data changed since the run started; {again}")

    def save(self, i: int, rec: dict) -> None:
        tmp = self.path(i).with_suffix(".tmp")
        rec = rec if self.fingerprint is None else {**rec, "fingerprint": self.fingerprint}
        tmp.write_text(json.dumps({**rec, "digest": digest(rec)} if self.fingerprint is not None else rec))
        os.replace(tmp, self.path(i))


def environment(device: torch.device) -> dict:
    import platform
    import subprocess

    try:
        from importlib.metadata import version
        pkg = version("underfire")
    except Exception:  # noqa: BLE001 — not installed as a distribution (running from a checkout)
        pkg = "unknown"
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except Exception:  # noqa: BLE001
        rev = None
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})"
    return {"underfire": pkg, "torch": str(torch.__version__), "python": platform.python_version(), "device": dev,
            "threads": torch.get_num_threads(), "git": rev, "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def _run_batches(cfg: AuditConfig, t: Target, dep: Deployment, dets: dict, journal: Journal, mine: list[int],
                 index: list[list[int]], n_batches: int, resume: bool, progress: Progress) -> None:
    """This rank's batches of one target, each journaled when done (skipped when already there on resume)."""
    key, t0, done_here = t.key(), time.time(), 0
    for j, i in enumerate(mine):
        if resume and journal.load(i, index[i]) is not None:
            progress(f"{key}: batch {i + 1}/{n_batches} already in the journal, skipped")
            continue
        sl = slice(index[i][0], index[i][-1] + 1)

        def step(msg, i=i, j=j):
            el = time.time() - t0
            eta = f", eta {el / done_here * (len(mine) - j):.0f}s" if done_here else ""
            progress(f"{key}: batch {i + 1}/{n_batches}: {msg} [{el:.0f}s{eta}]")
        step.steps = getattr(progress, "steps", None)  # the attacks' step bars (on a terminal)
        # the global RNG (the smoothing noise of smooth:<name>) seeded per batch: the same records in one
        # process, under torchrun and after --resume; forked, so nothing outside the batch sees it
        with torch.random.fork_rng(devices=[dep.x.device] if dep.x.device.type == "cuda" else []):
            torch.manual_seed(cfg.seed + sl.start)
            rec = _attack_batch(t, dep, dets, sl, cfg.seed, cfg.examples, step)
        journal.save(i, rec)
        done_here += 1
        if hasattr(progress, "advance"):
            progress.advance()


def _det_info(calibration: dict, decision: str, cost: dict) -> dict:
    """What :func:`aggregate` needs of a detector: its decision's held-out FPR, held-out scores and cost."""
    return {"fpr_heldout": calibration.get("fpr_heldout", {}).get(decision),
            "n_heldout": calibration.get("n_heldout", 0),
            "heldout_scores": calibration.get("heldout_scores", []), "cost": cost}


def reaggregate(report: dict) -> dict:
    """A saved report with its summaries, statuses and headline recomputed from its per-sample records by this
    version's :func:`aggregate` (e.g. after a definition changed); the attacks are not re-run. Lower-bound notes
    (transfer / query-only interpreters) carry over."""
    if report.get("schema_version") != SCHEMA_VERSION:
        raise AuditError(f"report of schema version {report.get('schema_version')}: its records cannot be "
                         f"re-aggregated by this version (schema {SCHEMA_VERSION}); re-run the audit")
    cfg = report["config"]
    for tg in report["targets"].values():
        t, dets = tg["target"], tg["detectors"]
        summary = aggregate(tg["records"], {d: v["decision"] for d, v in dets.items()}, cfg["bootstrap"],
                            cfg["seed"], {d: _det_info(v["calibration"], v["decision"], v.get("cost"))
                                          for d, v in dets.items()},
                            t.get("defenses") or [], cfg["fpr"], t.get("smooth_samples", 8))
        for name, a in summary["interpreters"].items():
            if lb := tg["summary"]["interpreters"].get(name, {}).get("lower_bound"):
                a["lower_bound"] = lb
        tg["summary"], tg["status"] = summary, target_status(summary, cfg["min_pgd_asr"])
    report["headline"] = headline(report["targets"])
    report.setdefault("definitions", {})["spoofability"] = SPOOF_DEFINITION
    return report


def run_audit(cfg: AuditConfig, run_dir: Path, resume: bool = False, progress: Progress | None = None) -> dict | None:
    """Run the audit; returns the report dict on rank 0 (None on other ranks). Writes nothing but journals.

    The caller (the CLI) writes report.json/html from the returned dict, atomically.
    """
    cfg.validate()
    progress = progress or (lambda msg: log.info(msg))
    rank, world = distributed_setup()
    device = resolve_device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    t_start = time.time()
    report = {"schema_version": SCHEMA_VERSION, "name": cfg.name, "config": cfg.to_dict(),
              "environment": {**environment(device), "world_size": world}, "definitions": {
                  "spoofability": SPOOF_DEFINITION,
                  "success": "argmax f(x_adv) = c_t on the 8-bit-quantised x_adv (basic GRAD-ADV² also p(c_t) ≥ 0.8 "
                             "during selection; adaptive attacks argmax only); L1/IoU/MC/detection rates are over "
                             "successful inputs",
                  "detection": "a detector score flags an input when it exceeds its threshold, calibrated at the "
                               "FPR on benign data disjoint from the audited inputs"},
              "targets": {}}
    deps = {}
    for t in cfg.targets:  # every pre-flight check (AuditRefused) before any attack starts
        progress(f"{t.key()}: loading model, interpreters and data")
        deps[t.key()] = build_deployment(t, cfg.seed, device, cfg.precision, cfg.channels_last, cfg.compile)
    for t in cfg.targets:
        key = t.key()
        dep = deps.pop(key)
        for w in dep.warnings:
            progress(f"{key}: {w}")
        journal = Journal(run_dir, key, fingerprint(cfg, t, dep))
        n = len(dep.x)
        bs = resolve_batch_size(cfg, t, dep, journal, resume, rank, world)
        if cfg.batch_size == "auto":
            progress(f"{key}: batch size {bs} (auto, {dep.x.device.type})")
        n_batches = math.ceil(n / bs)
        index = [list(range(i * bs, min(n, (i + 1) * bs))) for i in range(n_batches)]
        if resume:  # refuse another run's batches before any work
            for i in range(n_batches):
                journal.load(i, index[i])
        dets = build_detectors(t, dep, cfg.fpr, progress)
        if _strong_rows(t):
            progress(f"{key}: measuring the map noise of all {n} inputs (τ, needed by the {t.attack_strength} "
                     f"attack ensemble)")
            measure_noise(t, dep, index, cfg.seed)
        mine = [i for i in range(n_batches) if i % world == rank]
        bar = progress.target(key, len(mine)) if hasattr(progress, "target") else contextlib.nullcontext()
        with bar:
            _run_batches(cfg, t, dep, dets, journal, mine, index, n_batches, resume, progress)
        if world > 1:
            torch.distributed.barrier()
        if rank != 0:
            continue
        batches = [journal.load(i, index[i]) for i in range(n_batches)]
        if any(b is None for b in batches):
            raise AuditError(f"journal of {key} is missing batches after the run; run again with --resume")
        shape = key_paths(batches[0])
        for i, b in enumerate(batches[1:], 1):
            if key_paths(b) != shape:
                odd = sorted(key_paths(b) ^ shape)[0]
                raise AuditError(f"journal batch {journal.path(i)} does not fit batch 0 (key {odd} is in one only): "
                                 f"the journal was edited or written by another version; start the run again "
                                 f"with --overwrite")
        records = merge_batches(batches)
        decisions = {d: det.decision for d, det in dets.items()}
        det_info = {d: _det_info(det.calibration, det.decision, detector_cost(det)) for d, det in dets.items()}
        try:
            summary = aggregate(records, decisions, cfg.bootstrap, cfg.seed, det_info, t.defenses, cfg.fpr,
                                t.smooth_samples)
        except (IndexError, KeyError, TypeError) as exc:  # per-sample lists that do not line up
            raise AuditError(f"the journal of {key} cannot be aggregated ({type(exc).__name__}: {exc}): a batch was "
                             f"edited or written by another version; start the run again with --overwrite") from exc
        for name in t.interpreters:  # listed, but no attack measured its spoofability: it passes no gate
            a = summary["interpreters"].setdefault(name, {"tau": float("nan")})
            if "spoofability" not in a:
                a["not_attacked"] = (
                    "not among adv2_interpreters: no attack on its map ran" if name not in _adv2_names(t) else
                    "no ADV² on its map ran (add 'adv2' to the attacks)" if "adv2" not in t.attacks else
                    "no attack on its map could be measured")
        for name, a in summary["interpreters"].items():  # no white-box attack read this map's gradient
            how = ("query ADV² only (the map has no gradient)" if name in dep.opaque else
                   f"transfer from the {'surrogate' if name.startswith('opaque:') else 'native twin'} "
                   f"{dep.transfer[name]}" if name in dep.transfer else None)
            how = how or dep.unfaithful.get(name)
            if how and "spoofability" in a:
                a["lower_bound"] = how + (" and query ADV²" if "blackbox" in a and name in dep.transfer else "")
        if journal.redone:
            dep.warnings.append(f"journal batches {', '.join(str(i + 1) for i in journal.redone)} no longer matched "
                                f"their digests (edited or damaged since they were written) and were redone")
        report["targets"][key] = {
            "target": asdict(t), "model": dep.model.name, "eps_255": round(dep.eps * 255, 3), "n": n,
            "batch_size": bs, "linf_as_l2": linf_as_l2(dep.eps, dep.x.shape[1:]), "fingerprint": {k: v for k, v in journal.fingerprint.items() if k != "config"},
            "warnings": dep.warnings, "status": target_status(summary, cfg.min_pgd_asr),
            "attacks": {"pgd": _pgd(t, dep).describe(),
                        **{f"adv2-{nm}": _adv2(t, dep, nm).describe()
                           for nm in _adv2_names(t)},
                        "adaptive": {"interpreters": _adaptive_names(t), "lam_scale": ADAPTIVE_LAM,
                                     **adaptive(PGD(dep.eps, 1), next(iter(dets.values()))).adaptive_to[0]}
                        if dets and "adaptive" in t.attacks else None,
                        # the attack ensemble every row ran (attacks/strength.py); costs × the preset attack
                        "strength": {"level": t.attack_strength,
                                     "members": [m.describe(True) for m in LEVELS[t.attack_strength]]}},
            "map_defenses": {d: {n: it.name for n, it in m.items()} for d, m in dep.defended.items()},
            "transfer": dep.transfer,
            "detectors": {d: {"kind": det.kind, "decision": det.decision, "thresholds": det.thresholds,
                              "fitted": det.fitted, "cost": detector_cost(det),
                              "config": det.config(), "calibration": det.calibration} for d, det in dets.items()},
            "records": records,
            "summary": summary,
            "examples": _examples(t, dep, min(cfg.examples, n)),
        }
    if rank != 0:
        return None
    report["headline"] = headline(report["targets"])
    report["seconds"] = round(time.time() - t_start, 1)
    return report
