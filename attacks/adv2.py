"""PGD and ADV² (Zhang et al., USENIX Security 2020) as thin compositions of the one loop.

Threat model: white box, targeted, ‖x − x0‖∞ ≤ ε, x ∈ [0, 1]. Shapes: x (B, C, H, W) in [0, 1], y_target (B,),
map_target (B, 1, h, w) at the interpreter's native resolution.

    result = Adv2.for_interpreter(interp, eps=8/255)(interp, x, y_target, benign_map)

Defaults reproduce ../shared/paper/ADV2-NOTES.md ("paper" schedule); ``schedule="short"`` divides every
stage's length by ``shorten`` for CPU runs (the report states which schedule ran).
"""

from __future__ import annotations

from attacks.objectives import ramp, stepwise
from attacks.pgd import Attack, Stage
from attacks.threats import AttackError, LinfBall

STEP = 1 / 255


class PGD(Attack):
    """Targeted PGD (Madry et al.): sign steps of 1/255 on NLL, projected on the ε-ball; the last iterate."""

    name = "pgd"

    def __init__(self, eps: float = 8 / 255, steps: int = 1000, lr: float = STEP, **kw) -> None:
        kw.setdefault("select", "last")
        super().__init__(LinfBall(eps), [Stage(steps, 0.0, "sign", lr)], pred_loss="nll", **kw)


# Per interpreter: (stage-1 steps, stage-2 steps, λ schedule factory(stage-2 steps), ℓ_prd, ℓ_int, extra kw)
PAPER = {
    "grad": (300, 704, lambda n: stepwise([(round(n * 301 / 704), 1e-3), (round(n * 201 / 704), 4e-3),
                                            (round(n * 101 / 704), 1e-2), (n, 5e-2)]),
             "smoothed_nll", "l2sq", {"min_confidence": 0.8}),
    "cam": (400, 1200, lambda n: ramp(5.0, 10.0, n), "nll", "mse", {}),
    "rts": (300, 1000, lambda n: ramp(5.0, 10.0, n), "nll", "mse", {}),
}


class Adv2(Attack):
    """ADV²: stage 1 plain targeted PGD (warm start), stage 2 ℓ_prd + λ·ℓ_int with best-iterate selection.

    Args:
        interpreter: registry name whose paper settings to use ("grad", "cam", "rts"; any other
            differentiable interpreter, ensembles included, gets the CAM settings).
        eps: L∞ radius.
        schedule: "paper" or "short" (every stage ``shorten`` times shorter).
        lam_scale: multiplies the λ schedule (maps at other resolutions than the paper's need other λ).
    """

    name = "adv2"

    def __init__(self, interpreter: str = "cam", eps: float = 8 / 255, schedule: str = "paper",
                 shorten: int = 4, lam_scale: float = 1.0, steps: tuple[int, int] | None = None, **kw) -> None:
        if schedule not in ("paper", "short"):
            raise AttackError(f"schedule must be 'paper' or 'short', not {schedule!r}")
        s1, s2, lam, pred, intl, extra = PAPER.get(interpreter, PAPER["cam"])
        if steps is not None:
            s1, s2 = steps
        elif schedule == "short":
            s1, s2 = max(1, s1 // shorten), max(1, s2 // shorten)
        base = lam(s2)
        schedule_fn = (lambda i: lam_scale * base(i)) if lam_scale != 1.0 else base
        for k, v in extra.items():
            kw.setdefault(k, v)
        super().__init__(LinfBall(eps), [Stage(s1, 0.0, "sign", STEP), Stage(s2, schedule_fn, "sign", STEP)],
                         pred_loss=pred, int_loss=intl, **kw)
        self.interpreter, self.schedule_name = interpreter, schedule

    @classmethod
    def for_interpreter(cls, interp, **kw) -> "Adv2":
        return cls(getattr(interp, "name", "cam"), **kw)

    def describe(self) -> dict:
        return {**super().describe(), "interpreter": self.interpreter, "schedule": self.schedule_name}
