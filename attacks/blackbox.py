"""Black-box ADV²: spoofing an interpreter whose gradient the attacker does not have.

Two threat models (stated in every report that uses them); a *query* is one image shown to the deployed
interpreter or classifier, and every attack here counts them per image:

- ``graybox``: the classifier is white-box (its logits' gradient is available); the interpreter only answers
  queries with maps (pytorch-grad-cam computing in numpy, captum's Occlusion, an explanation API);
- ``blackbox``: the deployment answers queries with label scores and a map, nothing else.

The attack, per image (:class:`QueryAdv2`, on the one loop of attacks/pgd.py):

1. a start: the *transfer* result — ADV² against a differentiable surrogate (``gradcam`` for pytorch-grad-cam's
   GradCAM), every iterate judged by the real map (each judgement is a query) — or, without a surrogate,
   targeted PGD (white-box on the classifier in the gray-box model; query-estimated in the black-box one);
2. a query-based refinement: sign steps on the ℓ∞ ball along a gradient *estimate* of
       w · relu(cw_margin(f(x), c_t) + κ)  +  L1(g(x | c_t), m_t)
   (the margin keeps the target class, L1 is the audit's own map distance). The estimate is NES with
   antithetic Gaussian directions (Ilyas et al., ICML 2018) or SPSA with Rademacher directions, the
   directions drawn at a coarse resolution (≤ ``tile_to`` pixels a side, upsampled: the estimate's dimension
   stays small on 224² images); in the gray-box model the margin's gradient is exact and only the map term is
   estimated. All ``samples`` of one estimate and all images of the batch go to the interpreter as one batch.

Judging and selection are the loop's: every ``check_every`` steps the 8-bit iterate is read by the real
interpreter (a query per image) and the successful iterate with the smallest L1 is kept; the start is judged
first (a refinement never returns worse than its start). The number of steps is planned from the query budget
so that no image spends more than ``queries`` in total (transfer included). Per image the attack records the
queries spent and the trace (queries, best L1 so far), from which the audit reads queries per success.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from underfire.attacks.objectives import cw_margin, nll
from underfire.attacks.pgd import Attack, AttackResult, Stage
from underfire.attacks.threats import AttackError, LinfBall
from underfire.guard.interpreters.base import Explanation, Interpreter
from underfire.guard.maps import l1

THREATS = {
    "graybox": "gray box: the classifier is white-box; the interpreter answers queries with maps only",
    "blackbox": "black box: the deployment answers queries with label scores and maps, nothing else",
}
ESTIMATORS = ("nes", "spsa")


def estimate(f, v: torch.Tensor, u: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Antithetic finite-difference gradient estimate of a per-sample loss, batched over samples and directions.

    ``f`` maps N points (N, *v.shape[1:]) to N losses without gradients; ``u`` (B, k, *v.shape[1:]) holds k
    directions per sample (Gaussian: NES; ±1: SPSA). Returns (ĝ (B, ...), the mean loss over the 2k points)
    with ĝ = Σ_i [f(v + σu_i) − f(v − σu_i)] u_i / (2kσ), whose expectation is the gradient of f smoothed at σ.
    f is called once, on all 2·B·k points."""
    b, k = u.shape[:2]
    vs = torch.cat([v[:, None] + sigma * u, v[:, None] - sigma * u], 1).flatten(0, 1)  # (B·2k, ...)
    with torch.no_grad():
        fs = f(vs).view(b, 2, k)
    diff = (fs[:, 0] - fs[:, 1]).view(b, k, *[1] * (v.ndim - 1))
    return (diff * u).sum(1) / (2 * k * sigma), fs.mean((1, 2))


class QueryAdv2(Attack):
    """ADV² without the interpreter's gradient (see the module docstring).

    Args:
        eps: ℓ∞ radius.
        queries: budget per image, everything counted (transfer judgements, estimates, judgements).
        threat: "graybox" or "blackbox".
        estimator: "nes" (antithetic Gaussian) or "spsa" (antithetic Rademacher).
        samples: antithetic pairs per estimate (2 · samples queries per step).
        sigma: finite-difference radius (default 2/255).
        lr: sign-step size (default 0.5/255: measured on the Fashion-MNIST ResNet against pytorch-grad-cam's
            GradCAM, 8 images, ε = 24/255, 2,000 queries from the transfer start, L1 ratio to PGD 0.425 →
            0.352 with (σ, lr) = (2, 0.5)/255 against 0.425 with (6, 3)/255 and 0.401 with (6, 1)/255).
        tile_to: directions are drawn at ≤ this many pixels a side and upsampled (nearest).
        margin_weight, kappa: the prediction hinge w · relu(cw_margin + κ).
        start_share: without a start, the share of the budget spent on reaching c_t first (black box).
    """

    name = "adv2-query"
    judge_start = True

    def __init__(self, eps: float, queries: int = 5000, threat: str = "graybox", estimator: str = "nes",
                 samples: int = 10, sigma: float | None = None, lr: float | None = None, tile_to: int = 32,
                 margin_weight: float = 1.0, kappa: float = 1.0, start_share: float = 0.3, check_every: int = 5,
                 seed: int = 0) -> None:
        if threat not in THREATS:
            raise AttackError(f"threat must be one of {', '.join(THREATS)}, not {threat!r}")
        if estimator not in ESTIMATORS:
            raise AttackError(f"estimator must be one of {', '.join(ESTIMATORS)}, not {estimator!r}")
        if queries < 1 or samples < 1:
            raise AttackError(f"a query attack needs a budget ≥ 1 and ≥ 1 sample per estimate, got {queries}, {samples}")
        super().__init__(LinfBall(eps), [Stage(0)], pred_loss=nll, int_loss=l1, check_every=check_every, seed=seed)
        self.budget, self.threat_model, self.estimator, self.samples = int(queries), threat, estimator, int(samples)
        self.sigma = 2 / 255 if sigma is None else float(sigma)
        self.lr = 0.5 / 255 if lr is None else float(lr)
        self.tile_to, self.margin_weight, self.kappa, self.start_share = tile_to, margin_weight, kappa, start_share
        self.queries = self.trace = self._x_start = self._best = None
        self._idle = False
        self._gen = torch.Generator()

    # -- the public call -----------------------------------------------------------------------------------
    def __call__(self, interp: Interpreter, x: torch.Tensor, y_target: torch.Tensor,
                 map_target: torch.Tensor | None = None, progress=None, start: torch.Tensor | None = None,
                 spent: torch.Tensor | int = 0) -> AttackResult:
        """Refine ``start`` (or start from x) with queries of ``interp``. ``spent``: queries each image already
        cost (a transfer start's judgements), counted against the budget."""
        if map_target is None:
            raise AttackError("ADV² needs a target map")
        b = x.shape[0]
        spent = torch.as_tensor(spent, dtype=torch.long).expand(b).clone()
        if start is not None:
            if start.shape != x.shape or float((start - x).abs().amax()) > self.threat.eps + 1e-6:
                raise AttackError("the start must have x's shape and lie in the ε-ball around x")
        left = self.budget - int(spent.max())
        self.stages = self._plan(left, start is not None)
        # nothing left to refine with (the transfer spent the budget): the result is the start, whose map the
        # attacker already read; judging it again would spend queries beyond the budget
        self._idle = not any(s.steps for s in self.stages)
        self.judge_start = not self._idle
        self.queries, self._x_start = spent.to(x.device), None if start is None else start.detach()
        self.trace = [[] for _ in range(b)]
        self._best = torch.full((b,), math.inf, device=x.device)
        self._gen.manual_seed(self.seed)
        r = super().__call__(interp, x, y_target, map_target, progress)
        r.history.update(queries=self.queries.tolist(), trace=self.trace, threat=self.threat_model)
        return r

    def describe(self) -> dict:
        return {**super().describe(), "threat_model": self.threat_model, "queries": self.budget,
                "estimator": self.estimator, "samples": self.samples, "sigma": self.sigma, "lr": self.lr,
                "tile_to": self.tile_to, "objective": f"{self.margin_weight} · relu(cw_margin + {self.kappa}) + L1"}

    def definition(self) -> str:
        return super().definition() + f"; {THREATS[self.threat_model]}; ≤ {self.budget} queries per image"

    # -- the plan: steps from the budget -------------------------------------------------------------------
    def _cost(self, stages: list[Stage]) -> int:
        """Queries per image of a plan: the start's judgement, 2 · samples per estimated step, one per
        judgement (every ``check_every`` steps and the last) and the final read."""
        total, step, n = 1, 0, sum(s.steps for s in stages)
        for s in stages:
            for _ in range(s.steps):
                step += 1
                total += self._step_queries(s) + (step % self.check_every == 0 or step == n)
        return total + 1

    def _step_queries(self, stage: Stage) -> int:
        white_pgd = stage.schedule()(0) == 0 and self.threat_model == "graybox"
        return 0 if white_pgd else 2 * self.samples

    def _plan(self, left: int, has_start: bool) -> list[Stage]:
        per = 2 * self.samples + 1 / self.check_every
        if left < 2 + 2 * self.samples:
            return [Stage(0, 1.0, "sign", self.lr)]
        warm = []
        if not has_start:  # reach c_t first: white-box PGD (gray box, free) or query PGD (black box)
            steps = 100 if self.threat_model == "graybox" else max(1, int(self.start_share * left / per))
            warm = [Stage(steps, 0.0, "sign", self.lr)]
        n = max(0, int((left - self._cost(warm)) / per))
        while n > 0 and self._cost([*warm, Stage(n, 1.0, "sign", self.lr)]) > left:
            n -= 1
        return [*warm, Stage(n, 1.0, "sign", self.lr)]

    # -- the loop's override points ------------------------------------------------------------------------
    def start(self, x0, gen):
        return x0.clone() if self._x_start is None else self._x_start.clone()

    def _loss(self, e: Explanation, y_t: torch.Tensor, map_t: torch.Tensor, lam: float, with_margin: bool):
        total = l1(e.saliency, map_t) if lam > 0 else torch.zeros_like(y_t, dtype=e.logits.dtype)
        if with_margin:
            total = total + (self.margin_weight * (cw_margin(e.logits, y_t, math.inf) + self.kappa).relu()
                             if lam > 0 else nll(e.logits, y_t))
        return total

    def _directions(self, v: torch.Tensor) -> torch.Tensor:
        b, c, h, w = v.shape
        s = max(1, math.ceil(max(h, w) / self.tile_to))
        shape = (b, self.samples, c, math.ceil(h / s), math.ceil(w / s))
        u = (torch.randn(shape, generator=self._gen) if self.estimator == "nes"
             else torch.randint(0, 2, shape, generator=self._gen).float() * 2 - 1).to(v)
        if s > 1:
            u = F.interpolate(u.flatten(0, 1), scale_factor=s, mode="nearest")[..., :h, :w].unflatten(0, (b, self.samples))
        return u

    def gradient(self, interp, x0, v, y_t, map_t, lam, idx):
        v = v.detach()
        stage = self.stages[self.stage_index]
        exact = self.threat_model == "graybox"  # the prediction term through the white-box classifier
        g_pred, per = torch.zeros_like(v), torch.zeros(len(v), device=v.device)
        if exact:
            vg = v.clone().requires_grad_(True)
            with torch.enable_grad():
                z = interp.model(self.threat.apply(x0, vg))
                p = (self.margin_weight * (cw_margin(z, y_t, math.inf) + self.kappa).relu() if lam > 0
                     else nll(z, y_t))
                (g_pred,) = torch.autograd.grad(p.sum(), vg)
            per = p.detach()
        if self._step_queries(stage) == 0:
            return per, g_pred
        rep = lambda t: t.repeat_interleave(2 * self.samples, 0)  # noqa: E731

        def f(vs):  # the queried part of the loss at every perturbed point: one batch for the interpreter
            xs = self.threat.apply(rep(x0), vs).clamp(0, 1)
            e = interp(xs, rep(y_t)) if lam > 0 else Explanation(interp.model(xs), torch.empty(0))
            return self._loss(e, rep(y_t), None if map_t is None else rep(map_t), lam, not exact)

        g, f_mean = estimate(f, v, self._directions(v), self.sigma)
        self.queries[idx] += 2 * self.samples
        return per + f_mean, g_pred + g

    def judge(self, interp, xq, y_t, map_t, idx=None):
        e, ok, d = super().judge(interp, xq, y_t, map_t, idx)
        if idx is None:  # the final read of the returned images (already read when the start is returned as is)
            self.queries += 0 if self._idle else 1
            return e, ok, d
        if map_t is not None or self.threat_model == "blackbox":
            self.queries[idx] += 1
        better = ok & (d < self._best[idx])
        self._best[idx] = torch.where(better, d, self._best[idx])
        for j, i in enumerate(idx.tolist()):
            best = float(self._best[i])
            self.trace[i].append([int(self.queries[i]), best if math.isfinite(best) else None])  # None: no success yet
        return e, ok, d


def transfer_start(surrogate_attack: Attack, transfer_interp: Interpreter, x: torch.Tensor, y_t: torch.Tensor,
                   map_t: torch.Tensor, counter: "Counted") -> tuple[AttackResult, torch.Tensor]:
    """ADV² against the surrogate, judged by the real map (``transfer_interp`` = Transfer(surrogate, counted real)).
    Returns the result and the queries each image cost: every judgement of the transfer loop reads the whole
    batch (ADV² stops no sample early), so the count divides evenly."""
    before = counter.images
    r = surrogate_attack(transfer_interp, x, y_t, map_t)
    used = counter.images - before
    if used % len(x):
        raise AttackError("transfer judgements did not read the whole batch each time; queries cannot be split")
    return r, torch.full((len(x),), used // len(x), dtype=torch.long)


class Counted(Interpreter):
    """The deployed interpreter as a query oracle: no gradient ever (its calls run under no_grad and return
    detached maps), and ``images`` counts every image it is shown."""

    compile_parts = ()

    def __init__(self, real: Interpreter) -> None:
        super().__init__(real.model)
        self.real, self.name, self.images = real, real.name, 0

    def modules(self):
        return self.real.modules()

    def native_size(self, hw):
        return self.real.native_size(hw)

    def explain(self, x, target):
        self.images += x.shape[0]
        with torch.no_grad():
            e = self.real(x.detach(), target)
        return Explanation(e.logits.detach(), e.saliency.detach())
