"""What an audit runs: its settings (:class:`AuditConfig`, one :class:`Target` per deployment), their
validation, the errors the audit raises, and the name helpers every stage shares."""

from __future__ import annotations

import math
import os
import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch
from underfire.attacks.adv2 import make_adv2
from underfire.attacks.blackbox import THREATS
from underfire.attacks.pgd import PRECISIONS
from underfire.attacks.strength import STRENGTHS
from underfire.audit.defenses import DEFENSES, NEEDS_TWO, combo, parts
from underfire.guard.errors import UnderfireError
from underfire.guard.interpreters.base import InterpreterError
from underfire.guard.registry import check_name, traits_or_none

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
            check_types(t, Target, f"targets[{i}].")
            targets.append(Target(**t))
        top = {k: v for k, v in d.items() if k != "targets"}
        check_types(top, cls, "")
        return cls(**top, targets=targets)

    def validate(self) -> None:
        """Types and ranges of every setting, before any model or data is loaded; AuditError names the key."""
        if not isinstance(self.targets, list) or not self.targets:
            raise AuditError("the audit has no targets")
        if isinstance(self.batch_size, str) and self.batch_size.isdigit():
            self.batch_size = int(self.batch_size)
        check_types(asdict(self), type(self), "")
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
            check_types(asdict(t), Target, f"targets[{i}].")
            validate_target(t)
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


def validate_target(t: Target) -> None:
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
    if not entry_point(t.model):  # an entry point may hand over maps of its own names: checked once it loads
        for name in t.interpreters:
            try:
                check_name(name)
            except InterpreterError as exc:
                raise AuditError(f"{where}: {exc}") from None
    if t.defenses is None:  # the default: what applies here (an ensemble needs two interpreters)
        t.defenses = ["squeeze"] + (["ensemble"] if len(ensemble_names(t)) >= 2 else [])
    if "all" in t.defenses:  # every defense that applies here (the ensembles need two interpreters)
        t.defenses = [d for d in DEFENSES if d not in NEEDS_TWO or len(ensemble_names(t)) >= 2]
    if unknown := {d for d in t.defenses if d not in DEFENSES and "+" not in d}:
        raise AuditError(f"unknown defenses {sorted(unknown)}; known: {', '.join(DEFENSES)}, a combination "
                         f"<map defense>+<detector> such as smooth+squeeze, or all")
    for d in t.defenses:
        try:
            combo(d)
        except ValueError as exc:
            raise AuditError(f"{where}: {exc}") from None
    for d in NEEDS_TWO:
        if any(parts(x)[1] == d for x in t.defenses) and len(ensemble_names(t)) < 2:
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
    presets = {tr.preset if (tr := traits_or_none(n)) else "cam" for n in adv2_names(t)}
    for kind in {"mask" if p == "mask" else "grad" for p in presets} if t.adv2_options else ():
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


def entry_point(model: str) -> bool:
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


def check_types(values: dict, cls: type, where: str) -> None:
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


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def strong_rows(t: Target) -> bool:
    """Whether the rows run the attack ensemble (every strength above quick)."""
    return t.attack_strength != "quick"


def adv2_names(t: Target) -> list[str]:
    return list(t.interpreters) if t.adv2_interpreters is None else list(t.adv2_interpreters)


def _one_pass(names: list[str]) -> list[str]:
    """All but the iterative interpreters (MASK): those are left out of the defaults for time — a detector
    solves them (300 optimisation steps) for every calibration and judged input, and the adaptive attacker
    tracks them at every step (with MASK the table9 run takes 38 min instead of 11 on one CPU core; README,
    ensembles); named explicitly, they take part."""
    return [n for n in names if not ((tr := traits_or_none(n)) and tr.iterative)]


def ensemble_names(t: Target) -> list[str]:
    """Members of the disagreement detector: every one-pass interpreter unless named."""
    return list(t.ensemble_members) if t.ensemble_members is not None else _one_pass(t.interpreters)


def stability_names(t: Target) -> list[str]:
    """Members of the stability detector: like the ensemble's."""
    return list(t.stability_members) if t.stability_members is not None else _one_pass(t.interpreters)


def adaptive_names(t: Target) -> list[str]:
    """Interpreters the adaptive attacks (and map defenses) cover: every one-pass interpreter unless named."""
    return list(t.adaptive_interpreters) if t.adaptive_interpreters is not None else _one_pass(t.interpreters)


def journal_folder(key: str) -> str:
    """A target's journal folder name: its key with every character but letters, digits and ``@ . _ + -``
    replaced by ``_``, never hidden, ``.`` or ``..`` (so it stays inside the journal folder). Two targets whose
    names meet here are refused up front (:meth:`AuditConfig.validate`)."""
    name = re.sub(r"[^\w@.+-]", "_", key, flags=re.ASCII)
    return name if name and not name.startswith(".") else "_" + name
