"""FlowOPD: on-policy distillation as RL on the student's SDE, rewarded by minus the per-step KL
between the student's and the teacher's transitions.

The objective is J(theta) = E_{tau ~ p_theta}[sum_t KL_t(theta)], with
KL_t = scale_t * mean_elem((mu_theta(z_t) - mu_teacher(z_t))^2). Its gradient has two parts:

- the *pathwise* part E[sum_t dKL_t/dtheta] at the sampled states (the reward is differentiable
  in the current student's transition mean), and
- the *score-function* part E[sum_t d log p_theta(z_{t+1} | z_t) * sum_{t' > t} KL_t']: a
  transition's noise moves only the LATER states, so its advantage is the reward-to-go of later
  transitions (the last transition's is 0).

`flowopd_estimator: kl_gradient` (default) uses both: loss = KL_t(pred) + the PPO clipped
surrogate with advantage = reward-to-go; its expected update is -grad J (tested on a
linear-Gaussian chain against the closed form). `per_step_detached` is the reference trainer's
form, kept for parity: the row's own detached reward as its advantage and no pathwise term;
on-policy its expected gradient is zero (d log p has mean 0 given z_t), only noise remains.

Scale (`flowopd_reward_scale`), with sigma_t = std_dev_t = eta sqrt(sigma / (1 - sigma)) the SDE's
diffusion coefficient and std^2 = sigma_t^2 dt the step's variance: `variance` (reference) divides
by 2 sigma_t^2, as worldbench/DanceOPD's danceopd/core/flowopd.py `clipped_policy_loss` divides
by 2 diffusion_std^2 (its `sde_step` returns that std without dt); `step_variance` divides by
2 std^2 = 2 sigma_t^2 dt, which makes KL_t the exact Gaussian KL of the step (equal covariances):
`variance` = `step_variance` * dt. Advantages are clamped to +-`flowopd_adv_clamp` (reference: 5).
`flowopd_groups > 1` normalises them within (group, timestep): ours, off by default; the
reference has no baseline (its advantage is the clamped reward itself).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from danceopd.flow import gaussian_log_prob, sde_step_mean_std
from danceopd.losses import elem_mean, group_normalise, reward_to_go
from danceopd.methods.base import Method

if TYPE_CHECKING:  # annotations only: no import cycle, no cost
    from danceopd.config import Config


class FlowOPD(Method):
    name = "flowopd"
    rollout = "sde"

    def group_size(self) -> int:
        return self.cfg.flowopd_groups

    def queried(self, n: int, seed: int) -> np.ndarray:
        return np.arange(n) if self.cfg.flowopd_all_states else super().queried(n, seed)

    def steps_needed(self, idx: np.ndarray, n: int, early_stop: bool) -> int:
        return int(idx.max()) + 1 if early_stop else n  # a row needs its transition's next state

    # ---- the reward ------------------------------------------------------------------------
    def _means(self, t: dict[str, torch.Tensor], velocity: torch.Tensor):
        return sde_step_mean_std(t["state"], velocity, t["sigma"], t["sigma_next"], self.cfg.flowopd_eta)

    def kl_scale(self, std: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per row: what multiplies mean_elem((mu - mu_teacher)^2)."""
        std = std.reshape(std.shape[0], -1)[:, 0]
        if self.cfg.flowopd_reward_scale == "step_variance":
            return 1.0 / (2 * std**2)
        dt = (t["sigma"] - t["sigma_next"]).float()
        return dt / (2 * std**2)  # = 1 / (2 sigma_t^2): std^2 = sigma_t^2 dt

    def kl(self, t: dict[str, torch.Tensor], velocity: torch.Tensor) -> torch.Tensor:
        mu, std = self._means(t, velocity)
        mu_teacher, _ = self._means(t, t["target"].detach())
        return self.kl_scale(std, t) * elem_mean((mu - mu_teacher) ** 2)

    def annotate(self, t: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """The advantage of every row, from the rollout's (old) velocities and the teacher's."""
        with torch.no_grad():
            reward = -self.kl(t, t["rollout_velocity"])
            if self.cfg.flowopd_estimator == "kl_gradient":
                reward = reward_to_go(reward, t["sample_index"], t["query_index"])
            if self.cfg.flowopd_groups > 1:  # compare the samples of a group at the same timestep
                reward = group_normalise(reward, t["group"] * (int(t["query_index"].max()) + 1) + t["query_index"])
            clamp = self.cfg.flowopd_adv_clamp
            return {"advantage": reward.clamp(-clamp, clamp).float().numpy()}

    # ---- the loss ----------------------------------------------------------------------------
    def terms(self, pred: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        t = {k: v.detach() for k, v in batch.items()}
        mu_new, std = self._means(t, pred)
        with torch.no_grad():
            mu_old, _ = self._means(t, t["rollout_velocity"])
            logp_old = gaussian_log_prob(t["next_state"], mu_old, std)
        logp_new = gaussian_log_prob(t["next_state"], mu_new, std)
        ratio = torch.exp(logp_new - logp_old)
        adv, clip = t["advantage"].float(), self.cfg.flowopd_clip
        surrogate = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - clip, 1 + clip))
        per_row = surrogate
        if self.cfg.flowopd_estimator == "kl_gradient":
            mu_teacher, _ = self._means(t, t["target"])
            per_row = per_row + self.kl_scale(std, t) * elem_mean((mu_new - mu_teacher) ** 2)
        return {"logp_new": logp_new, "logp_old": logp_old, "ratio": ratio, "surrogate": surrogate, "per_row": per_row}

    def loss(self, pred: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows averaged uniformly (as Flow-GRPO over timesteps and samples); `weight` unused."""
        per_row = self.terms(pred, batch)["per_row"]
        return per_row.mean(), per_row.detach()

    def check(self, cfg: Config) -> None:
        if self.cfg.flowopd_groups > cfg.rollout.batch_size:
            raise ValueError("method.flowopd_groups: larger than rollout.batch_size")
        if cfg.rollout.batch_size % self.cfg.flowopd_groups:
            raise ValueError("method.flowopd_groups: must divide rollout.batch_size")
