"""The learning rate of each optimizer step — one function, used by the plain and the DeepSpeed
learner alike.

Its only state is the step count, which is the learner's weight version (a skipped step is not a
step): a checkpoint holds it (state.json, engine.json) and a resume of either mode sets it back, so
the curve continues exactly where it stopped.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: no import cycle, no cost
    from danceopd.config import LearnerConfig


def lr_at(lc: LearnerConfig, step: int) -> float:
    """The lr of optimizer step `step` (1-based: the first step is 1). Warm-up: step n <=
    warmup_steps uses lr * n / warmup_steps (from 0, never 0 itself). Then `constant` stays at lr;
    `cosine` and `linear` decay from lr to min_lr over the remaining steps, the last step
    (learner.steps) using min_lr. Steps past learner.steps (a job whose steps were lowered) stay
    at the end value."""
    w, total = lc.warmup_steps, lc.steps
    if step <= w:
        return lc.lr * step / w
    if lc.lr_schedule == "constant":
        return lc.lr
    progress = min(1.0, (step - w) / max(total - w, 1))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if lc.lr_schedule == "cosine" else 1.0 - progress
    return lc.min_lr + (lc.lr - lc.min_lr) * shape


def set_lr(optimizer, lr: float) -> None:
    """Set every param group's lr (a torch optimizer, or a DeepSpeed ZeRO optimizer, whose
    param_groups are its wrapped torch optimizer's)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
