"""THE optimisation loop. Every attack in underfire (PGD, ADV² per interpreter, stAdv, adaptive variants)
is this loop with different pieces:

    min_v  ℓ_prd(f(x), c_t) + λ_s(i) · ℓ_int(g(x; f), m_t) + Σ extra(x, v)      x = threat.apply(x0, v)

run in stages (stage 1 = warm start with λ = 0, stage 2 = the joint objective), each with its own step rule
(sign, L2-normalised or Adam), step size and λ schedule; ``threat.project`` after every step.

Every ``check_every`` steps the current iterate is quantised to 8 bits (what a deployment receives) and
judged with the *real* interpreter (for GRAD: the true ReLU map) and without gradients: an iterate is
successful when argmax f = c_t (and p(c_t) ≥ ``min_confidence``); per sample the successful iterate with
the smallest ℓ_int so far is kept (best-iterate tracking). With ``early_stop`` a sample leaves the batch
once successful (for PGD). Samples are independent: losses are per sample and summed.

``precision="bf16"`` / ``"fp16"`` runs the objective (forward and its graph) under torch.autocast on the
inputs' device; the optimisation variable, the step and every judgement stay in float32, so success and
best-iterate selection are decided exactly as at full precision.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from underfire.attacks.objectives import INT_LOSSES, PRED_LOSSES, Schedule, constant
from underfire.attacks.threats import AttackError
from underfire.guard.interpreters.base import Explanation, Interpreter, trusted_inputs

log = logging.getLogger(__name__)

# extra(x, v, idx) -> per-sample loss for the active samples (B_active,)
Extra = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # objective's autocast dtype


@dataclass
class Stage:
    """One stage of the loop: ``steps`` updates with the given rule, step size and λ schedule."""

    steps: int
    lam: float | Schedule = 0.0
    rule: str = "sign"  # "sign" | "l2" | "adam" | "momentum"
    lr: float = 1 / 255

    def schedule(self) -> Schedule:
        return self.lam if callable(self.lam) else constant(float(self.lam))


@dataclass
class AttackResult:
    """What an attack returns. ``x_adv`` is the 8-bit image, and ``explanation`` / ``success`` are judged on it."""

    x_adv: torch.Tensor  # (B, C, H, W) in [0, 1], on the 8-bit grid
    explanation: Explanation  # the real interpreter's view of x_adv (target = argmax)
    success: torch.Tensor  # (B,) bool: argmax f(x_adv) == c_t (and confidence rule)
    history: dict = field(default_factory=dict)  # per check: step, loss, success rate, mean map distance
    definition: str = ""


class Attack:
    """A targeted attack on (classifier, interpreter): threat model + losses + stages + the one loop.

    Args:
        threat: a threat model (LinfBall, FlowField).
        stages: the schedule; λ = 0 stages ignore the interpreter (plain PGD steps).
        pred_loss, int_loss: names in objectives.PRED_LOSSES / INT_LOSSES or callables (B,) per sample.
        extra: additional per-sample loss terms (flow smoothness, detector hinges, ...).
        check_every: how often (steps) iterates are quantised and judged for best-iterate tracking.
        min_confidence: success also needs p(c_t) ≥ this (0.8 for ADV²-GRAD).
        select: "best" (successful iterate with smallest ℓ_int) or "last".
        early_stop: drop a sample from the batch once it is successful (PGD).
        precision: "fp32" (default), or "bf16" / "fp16" for the objective under autocast (GPU speed).
        compile: run the interpreter's ``compile_parts`` through torch.compile (GPU speed; the first steps
            pay the compilation; GRAD compiles nothing, since its attack needs a double backward).
        track: Adam steps per attack step with which an iterative interpreter (MASK, alone or in an
            ensemble) continues its previous differentiable explanation instead of solving from scratch
            (``Interpreter.tracking``); judging still solves from scratch. 0: solve from scratch every step.
    """

    name = "attack"
    judge_start = False  # judge the start before the first step (refinements: attacks/blackbox.py)
    DETECTED = 1e6  # added to a detected iterate's map distance in best-iterate selection
    MOMENTUM = 0.9  # decay of the "momentum" rule's gradient sum

    def __init__(self, threat, stages: Sequence[Stage], pred_loss="nll", int_loss="mse",
                 extra: Sequence[Extra] = (), check_every: int = 10, min_confidence: float = 0.0,
                 select: str = "best", early_stop: bool = False, seed: int = 0, precision: str = "fp32",
                 compile: bool = False, track: int = 5) -> None:
        if select not in ("best", "last"):
            raise AttackError(f"select must be 'best' or 'last', not {select!r}")
        if precision not in PRECISIONS:
            raise AttackError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
        if not stages or any(s.steps < 0 for s in stages):
            raise AttackError("an attack needs at least one stage with a non-negative step count")
        self.threat, self.stages = threat, list(stages)
        self.pred_loss = PRED_LOSSES[pred_loss] if isinstance(pred_loss, str) else pred_loss
        self.int_loss = INT_LOSSES[int_loss] if isinstance(int_loss, str) else int_loss
        self.extra, self.check_every = list(extra), max(1, check_every)
        self.min_confidence, self.select, self.early_stop, self.seed = min_confidence, select, early_stop, seed
        self.precision, self.compile, self.track = precision, compile, track
        self.evade: list[Callable[[torch.Tensor], torch.Tensor]] = []  # detectors to evade (attacks/adaptive.py)
        self.adaptive_to: list[dict] = []
        self.stage_index = 0  # the stage the loop is in (extra terms may depend on it)

    # -- the public call -----------------------------------------------------------------------------------
    def __call__(self, interp: Interpreter, x: torch.Tensor, y_target: torch.Tensor,
                 map_target: torch.Tensor | None = None,
                 progress: Callable[[int, int, torch.Tensor], None] | None = None) -> AttackResult:
        """Attack x towards classes ``y_target`` keeping maps near ``map_target``. ``progress(step, total, asr)``
        is called at every judgement (asr: a 0-d tensor, the share of the batch successful so far)."""
        self._validate(interp, x, y_target, map_target)
        return self._run(interp, x.detach(), y_target, None if map_target is None else map_target.detach(), progress)

    def definition(self) -> str:
        conf = f" and p(c_t) ≥ {self.min_confidence}" if self.min_confidence > 0 else ""
        return (f"success: argmax f(x_adv) = c_t{conf}, judged on the 8-bit-quantised x_adv; "
                f"{self.threat.describe()}; iterate: {self.select}")

    def describe(self) -> dict:
        return {"attack": self.name, **self.threat.describe(), "stages": [
            {"steps": s.steps, "rule": s.rule, "lr": s.lr, "lam0": s.schedule()(0),
             "lam_end": s.schedule()(max(s.steps - 1, 0))} for s in self.stages],
            "select": self.select, "min_confidence": self.min_confidence, "check_every": self.check_every,
            "precision": self.precision, "compile": self.compile, "track": self.track,
            **({"adaptive_to": self.adaptive_to} if self.adaptive_to else {})}

    # -- checks --------------------------------------------------------------------------------------------
    def _validate(self, interp, x, y_t, map_t) -> None:
        from underfire.guard.interpreters.base import InterpreterError, check_input

        try:
            check_input(x, interp.model, y_t)
        except InterpreterError as exc:
            raise AttackError(str(exc)) from exc
        if map_t is not None:
            want = (x.shape[0], 1, *interp.native_size(tuple(x.shape[-2:])))
            if tuple(map_t.shape) != want:
                raise AttackError(f"target map must have shape {want} (the interpreter's native resolution), "
                                  f"got {tuple(map_t.shape)}")
            if not torch.isfinite(map_t).all():
                raise AttackError("target map contains NaN or inf")
        elif any(s.schedule()(0) > 0 for s in self.stages):
            raise AttackError(f"{self.name} has an interpretation term and needs a target map")

    def judge(self, interp: Interpreter, xq: torch.Tensor, y_t: torch.Tensor, map_t: torch.Tensor | None,
              idx: torch.Tensor | None = None) -> tuple[Explanation, torch.Tensor, torch.Tensor]:
        """The real interpreter on quantised images: (explanation, success (B,), map distance (B,)).

        ``idx`` says which samples of the batch these are (attacks with per-sample state use it).
        """
        with torch.no_grad():
            if map_t is None and idx is not None:  # inside the loop without a map target: logits suffice
                e = Explanation(interp.model(xq), torch.empty(0))
            else:
                e = interp(xq)
            ok = self.succeeded(e.logits, y_t)
            d = self.int_loss(e.saliency, map_t) if map_t is not None else torch.zeros_like(ok, dtype=xq.dtype)
        return e, ok, d

    def succeeded(self, logits: torch.Tensor, y_t: torch.Tensor) -> torch.Tensor:
        """The success definition: argmax = c_t and p(c_t) ≥ min_confidence. (B,) bool."""
        p = logits.softmax(1)
        return (p.argmax(1) == y_t) & (p.gather(1, y_t[:, None]).squeeze(1) >= self.min_confidence)

    # -- the loop ------------------------------------------------------------------------------------------
    def loss(self, interp: Interpreter, x: torch.Tensor, v: torch.Tensor, y_t: torch.Tensor,
             map_t: torch.Tensor | None, lam: float, idx: torch.Tensor) -> torch.Tensor:
        """Per-sample loss of the active samples (B_active,): the objective + every extra term."""
        total = self.objective(interp, x, y_t, map_t, lam, idx)
        for term in self.extra:
            total = total + term(x, v, idx)
        return total

    def objective(self, interp: Interpreter, x: torch.Tensor, y_t: torch.Tensor, map_t: torch.Tensor | None,
                  lam: float, idx: torch.Tensor) -> torch.Tensor:
        """ℓ_prd + λ·ℓ_int per sample; the override point of attacks with another interpretation term.

        ``idx``: which samples of the batch are active (attacks with per-sample state use it)."""
        if lam > 0:
            e = interp(x, y_t)  # the map the attacker shapes is the one shown for c_t
            return self.pred_loss(e.logits, y_t) + lam * self.int_loss(e.saliency, map_t)
        return self.pred_loss(interp.model(x), y_t)

    def line_search(self, interp: Interpreter, x0: torch.Tensor, v: torch.Tensor, step: torch.Tensor,
                    y_t: torch.Tensor, lam: float) -> torch.Tensor:
        """The L2 rule's update v − step; attacks with a line search (MASK-ADV²) choose its length here."""
        return v - step

    def _update(self, stage: Stage, interp, x0, vi, g, y_t, lam, idx, state: dict) -> torch.Tensor:
        """One step of the stage's rule from vi along the gradient g (before projection)."""
        if stage.rule == "sign":
            return torch.add(vi, g.sign(), alpha=-stage.lr)
        if stage.rule == "l2":
            norm = g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (g.ndim - 1))
            return self.line_search(interp, x0, vi, stage.lr * math.sqrt(g[0].numel()) * g / norm, y_t, lam)
        if stage.rule == "momentum":  # MI-FGSM (Dong et al. 2018): sign steps along a decaying sum of
            # L1-normalised gradients, which averages a noisy gradient (a sampled map's) over steps
            scale = g.abs().flatten(1).mean(1).clamp_min(1e-12).view(-1, *[1] * (g.ndim - 1))
            state["m"][idx] = self.MOMENTUM * state["m"][idx] + g / scale
            return torch.add(vi, state["m"][idx].sign(), alpha=-stage.lr)
        if stage.rule == "adam":
            state["t"] += 1
            state["m"][idx] = 0.9 * state["m"][idx] + 0.1 * g
            state["v"][idx] = 0.999 * state["v"][idx] + 0.001 * g * g
            mh, vh = state["m"][idx] / (1 - 0.9 ** state["t"]), state["v"][idx] / (1 - 0.999 ** state["t"])
            return vi - stage.lr * mh / (vh.sqrt() + 1e-8)
        raise AttackError(f"unknown step rule {stage.rule!r}")

    def gradient(self, interp: Interpreter, x0: torch.Tensor, v: torch.Tensor, y_t: torch.Tensor,
                 map_t: torch.Tensor | None, lam: float, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-sample loss, its gradient w.r.t. ``v``) for the active samples: autograd through the objective
        (under autocast at reduced precision). The override point of gradient-free attacks (attacks/blackbox.py)."""
        amp = PRECISIONS[self.precision]
        with torch.autocast(x0.device.type, dtype=amp, enabled=amp is not None):
            per = self.loss(interp, self.threat.apply(x0, v), v, y_t, map_t, lam, idx)
        per = per.float()
        (g,) = torch.autograd.grad(per.sum(), v)
        return per, g

    def start(self, x0: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """The optimisation variable's first value (the threat model's start; a refinement starts elsewhere)."""
        return self.threat.init(x0, gen)

    def reset(self, interp: Interpreter, x0: torch.Tensor, y_t: torch.Tensor) -> None:
        """Called once before the loop; attacks with per-sample state (MASK-ADV²) initialise it here."""

    def _run(self, interp, x0, y_t, map_t, progress) -> AttackResult:
        if self.compile:
            interp = interp.compiled()
        self.reset(interp, x0, y_t)
        gen = torch.Generator().manual_seed(self.seed)
        b = x0.shape[0]
        v = self.start(x0, gen)
        best_x = self.threat.quantize(self.threat.apply(x0, v), x0)
        best_d = torch.full((b,), math.inf, device=x0.device, dtype=x0.dtype)
        best_ok = torch.zeros(b, dtype=torch.bool, device=x0.device)
        if self.judge_start:  # a refinement's start is a candidate like any iterate
            _, best_ok, d0 = self.judge(interp, best_x, y_t, map_t, torch.arange(b, device=x0.device))
            best_d = torch.where(best_ok, d0, best_d)
        active = torch.ones(b, dtype=torch.bool, device=x0.device)
        state = {"m": torch.zeros_like(v), "v": torch.zeros_like(v), "t": 0}
        hist: dict[str, list] = {"step": [], "loss": [], "success": [], "map_distance": []}
        total_steps = sum(s.steps for s in self.stages)
        step = 0
        idx = active.nonzero().squeeze(1)  # recomputed only when samples leave (early stop): no sync per step
        # x0, y_t, map_t were validated once: no per-step input checks (host syncs); MASK (alone or in an
        # ensemble) continues its previous mask at every differentiable explanation of the loop
        tracking = interp.tracking(self.track) if self.track > 0 else contextlib.nullcontext()
        with trusted_inputs(), tracking:
            for self.stage_index, stage in enumerate(self.stages):
                lam_of = stage.schedule()
                for i in range(stage.steps):
                    if idx.numel() == 0:
                        break
                    full = idx.numel() == b  # every sample active: whole tensors, no gather / scatter copies
                    xs, ys = (x0, y_t) if full else (x0[idx], y_t[idx])
                    ms = map_t if full or map_t is None else map_t[idx]
                    vi = (v if full else v[idx]).detach().requires_grad_(True)
                    lam = lam_of(i)
                    per, g = self.gradient(interp, xs, vi, ys, ms, lam, idx)
                    with torch.no_grad():
                        vn = self.threat.project(self._update(stage, interp, xs, vi, g, ys, lam, idx, state), xs)
                        if full:
                            v = vn
                        else:
                            v[idx] = vn
                    step += 1
                    if step % self.check_every == 0 or step == total_steps:
                        xq = self.threat.quantize(self.threat.apply(x0[idx], v[idx]), x0[idx])
                        _, ok, d = self.judge(interp, xq, y_t[idx], None if map_t is None else map_t[idx], idx)
                        for flagged in self.evade:  # adaptive attacks: a detected iterate is worse than any other
                            d = d + self.DETECTED * flagged(xq).to(d.dtype)
                        with torch.no_grad():  # masks by torch.where, not boolean indexing: no host sync
                            if self.select == "best":
                                improve = ok & (d < best_d[idx])  # a successful iterate closer to the target map
                                take = improve | (~best_ok[idx] & ~ok)  # no success yet: keep the latest
                                best_x[idx] = torch.where(take.view(-1, *[1] * (xq.ndim - 1)), xq, best_x[idx])
                                best_d[idx] = torch.where(improve, d, best_d[idx])
                                best_ok[idx] = best_ok[idx] | improve
                            else:
                                best_x[idx], best_ok[idx] = xq, ok
                        hist["step"].append(step)  # tensors until the end of the loop (no sync per check)
                        hist["loss"].append(per.detach().mean())
                        hist["success"].append(best_ok.float().mean())
                        hist["map_distance"].append(d.detach().mean())
                        if self.early_stop:
                            active[idx] = active[idx] & ~ok
                            idx = active.nonzero().squeeze(1)
                        if progress is not None:
                            progress(step, total_steps, hist["success"][-1])
        hist = {k: [v if k == "step" else float(v) for v in vals] for k, vals in hist.items()}
        e, ok, _ = self.judge(interp, best_x, y_t, map_t)
        return AttackResult(best_x, e, ok, hist, self.definition())
