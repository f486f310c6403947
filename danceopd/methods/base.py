"""The method interface and the behaviour most methods share (ODE rollout, K biased queries,
weighted velocity regression)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from danceopd.flow import guided_velocity
from danceopd.losses import weighted_mse
from danceopd.queries import select_queries

if TYPE_CHECKING:  # annotations only: no import cycle, no cost
    from danceopd.config import Config, MethodConfig


class Method:
    name = ""
    rollout = "ode"  # "ode" (Euler), "sde" (Flow-GRPO SDE) or "data" (forward-noised dataset targets)
    routing = "hard"  # "hard" (the row's route's teacher), "mix" (weight-average of all) or "none"

    def __init__(self, cfg: MethodConfig):
        self.cfg = cfg  # its own section: method.*

    # ---- work hand-out and rollout (worker) ---------------------------------------------------
    def group_size(self) -> int:
        """Rollouts per prompt (rows of one group share a prompt and differ in seed)."""
        return 1

    def text_dropout(self) -> float:
        """Probability that a sample's text condition is dropped before the rollout."""
        return 0.0

    def queried(self, n: int, seed: int) -> np.ndarray:
        """Sorted indices (into the N states of the rollout) that become training rows."""
        return select_queries(self.cfg.query_bias, n, self.cfg.k, np.random.default_rng(seed))

    def steps_needed(self, idx: np.ndarray, n: int, early_stop: bool) -> int:
        """Steps a sample must integrate to have every row it needs (its own stopping point)."""
        return int(idx.max()) if early_stop else n - 1

    def row_weights(self, idx: np.ndarray, sigmas: torch.Tensor) -> list[float]:
        return [1.0 / len(idx)] * len(idx)

    def data_target(self, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """`data` rollouts: the row's target before routing (zeros: the teacher fills it)."""
        return torch.zeros_like(x0)

    # ---- after routing (router) ---------------------------------------------------------------
    def annotate(self, t: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """Columns computed from a routed batch before the learner sees it (rewards, ...)."""
        return {}

    # ---- learner ----------------------------------------------------------------------------
    def predict(self, backend, model, t: dict[str, torch.Tensor]) -> torch.Tensor:
        """The student's velocity at the rows' states, with grad. With `learner_guidance` the
        learner trains the field it rolled out with (its CFG included), as the reference does."""
        scale = self.cfg.rollout_cfg_scale if (self.cfg.learner_guidance and self.rollout != "data") else 1.0
        return guided_velocity(lambda *a: backend.predict(model, *a), backend.null_cond, t["state"], t["sigma"], t["cond"],
                               scale).float()

    def loss(self, pred: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(scalar loss with grad to pred, per-row value detached [R])."""
        return weighted_mse(pred, batch)

    # ---- config ---------------------------------------------------------------------------------
    def check(self, cfg: Config) -> None:
        """Raise ValueError naming the key when the job's config does not fit this method."""
