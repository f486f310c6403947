"""The regression methods: the student's velocity regresses a teacher's (or the data's) at
selected states; they differ in rollout, queried states, weights and target."""

from __future__ import annotations

import numpy as np
import torch

from danceopd.methods.base import Method
from danceopd.queries import diffusionopd_weights


class DanceOPD(Method):
    """The paper's method: on-policy ODE rollout, K biased queries, hard-routed teacher targets."""

    name = "danceopd"


class SoftMix(DanceOPD):
    """Ablation of hard routing: each row's target is the weight-average of every route's field."""

    name = "softmix"
    routing = "mix"


class DiffusionOPD(Method):
    """Every state of the rollout, weighted 0.5/N^2 (reference) or dt^2/2 (`uniform_dt: false`)."""

    name = "diffusionopd"

    def queried(self, n: int, seed: int) -> np.ndarray:
        return np.arange(n)

    def row_weights(self, idx: np.ndarray, sigmas: torch.Tensor) -> list[float]:
        w = diffusionopd_weights(sigmas, self.cfg.uniform_dt)
        return [float(w[i]) for i in idx]


class OffPolicy(Method):
    """No student rollout: dataset targets forward-noised to the queried levels, teacher targets."""

    name = "offpolicy"
    rollout = "data"


class SFT(Method):
    """Plain flow matching on the data (what trains a teacher): target eps - x0, no teacher."""

    name = "sft"
    rollout = "data"
    routing = "none"

    def text_dropout(self) -> float:
        return self.cfg.cond_dropout

    def data_target(self, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return eps - x0
