"""The learner's loss, blind to how its rows were made.

A batch is a dict of tensors with one row per queried state:
``state [R,*S]``, ``sigma [R]``, ``sigma_next [R]``, ``cond [R,C]``, ``target [R,*S]`` (teacher
velocity with CFG absorbed, or the data velocity for sft/offpolicy), ``weight [R]``,
``sample_index [R]`` (rows sharing a value come from one sample) and, for flowopd,
``next_state [R,*S]``, ``rollout_velocity [R,*S]`` (the student's velocity when it rolled out,
i.e. the old policy) and ``group [R]`` (advantage-normalisation group). ``pred`` is the current
student's velocity at ``state``, with grad. Everything on the target side is detached here, so a
caller cannot leak gradient into a teacher or into stored rollout tensors by accident.

Regression methods (danceopd, diffusionopd, offpolicy, sft, softmix):
    loss = sum_r weight_r * mean_elem((pred_r - target_r)^2) / #distinct samples
so the weights (1/K, dt^2/2, ...) say how a sample's rows combine and the batch is a mean over
samples, whatever the number of rows each one contributed.

FlowOPD: the reward of a transition is minus the per-step Gaussian KL between the old student's
and the teacher's transition means, -mean_elem((mu_old - mu_teacher)^2) / (2 std^2), optimised
with the PPO clipped surrogate on fp32 log-probs of ``next_state``.

Known reference behaviours (DESIGN §1), decided here on purpose:

1. Rollout weights equal to update weights (max_policy_lag = 0, one update per rollout) make the
   ratio exactly 1 and the clip inactive. That is not a zero gradient: d ratio = ratio * d logp_new,
   so the loss -A * ratio still back-propagates -A * d logp_new through the current student's
   transition mean. We keep the reference objective unchanged (no "ratio = 1, skip" shortcut); a
   test checks both the exact ratio of 1 and that pred receives gradient.
2. The reward is a negative KL, so without a baseline every advantage is <= 0 and the update only
   pushes probability away from sampled transitions. ``method.flowopd_groups > 1`` normalises
   rewards within each ``group`` ((r - mean) / (std + 1e-6)), which supplies the baseline; with
   ``flowopd_groups = 1`` the raw reward is used, reproducing the reference.

3. The per-step reward depends on the state and the old velocity, not on the noise of the row's
   own transition, while on-policy E_noise[d logp_new] = 0: used as the advantage of its own row,
   every row's expected gradient would be zero (pure variance). So a row's advantage is its
   *reward-to-go*: the sum of the rewards of the LATER transitions of the same trajectory (rows
   sharing `sample_index` with a larger `query_index`), which do depend on the sampled
   next_state — the policy-gradient theorem's credit assignment. The last transition's advantage
   is 0 (nothing after it depends on its noise). Batches without `query_index` (hand-built ones)
   fall back to the per-step reward.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from danceopd.config import MethodConfig
from danceopd.flow import gaussian_log_prob, sde_step_mean_std

REGRESSION_METHODS = ("danceopd", "diffusionopd", "offpolicy", "sft", "softmix")


def _elem_mean(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).mean(dim=1)


def _num_samples(sample_index: torch.Tensor) -> int:
    return int(torch.unique(sample_index).numel())


def group_normalise(reward: torch.Tensor, group: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(r - mean_g) / (std_g + eps) per group, population std (ddof = 0, as Flow-GRPO)."""
    _, inv, counts = torch.unique(group, return_inverse=True, return_counts=True)
    counts = counts.to(reward.dtype)
    mean = torch.zeros_like(counts).index_add_(0, inv, reward) / counts
    var = torch.zeros_like(counts).index_add_(0, inv, (reward - mean[inv]) ** 2) / counts
    return (reward - mean[inv]) / (var.sqrt()[inv] + eps)


def reward_to_go(reward: torch.Tensor, sample_index: torch.Tensor, query_index: torch.Tensor) -> torch.Tensor:
    """Per row: the sum of the rewards of later transitions of the same trajectory."""
    later = (sample_index[:, None] == sample_index[None, :]) & (query_index[None, :] > query_index[:, None])
    return later.to(reward.dtype) @ reward


def flowopd_terms(method_cfg: MethodConfig, pred: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-row FlowOPD quantities: reward, advantage, logp_new, logp_old, ratio, per_row loss."""
    eta = method_cfg.flowopd_eta
    state = batch["state"].detach()
    sigma, sigma_next = batch["sigma"].detach(), batch["sigma_next"].detach()
    next_state = batch["next_state"].detach()
    mu_new, std = sde_step_mean_std(state, pred, sigma, sigma_next, eta)
    with torch.no_grad():
        mu_old, _ = sde_step_mean_std(state, batch["rollout_velocity"], sigma, sigma_next, eta)
        mu_teacher, _ = sde_step_mean_std(state, batch["target"], sigma, sigma_next, eta)
        reward = -_elem_mean((mu_old - mu_teacher) ** 2 / (2 * std**2))
        if "query_index" in batch:
            reward = reward_to_go(reward, batch["sample_index"], batch["query_index"])
        if method_cfg.flowopd_groups > 1:
            advantage = group_normalise(reward, batch["group"])
        else:
            advantage = reward
        logp_old = gaussian_log_prob(next_state, mu_old, std)
    logp_new = gaussian_log_prob(next_state, mu_new, std)
    ratio = torch.exp(logp_new - logp_old)
    clip = method_cfg.flowopd_clip
    per_row = torch.maximum(-advantage * ratio, -advantage * torch.clamp(ratio, 1 - clip, 1 + clip))
    return {"reward": reward, "advantage": advantage, "logp_new": logp_new, "logp_old": logp_old,
            "ratio": ratio, "per_row": per_row}


def compute_loss(
    method_cfg: MethodConfig, pred: torch.Tensor, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (scalar loss with grad to pred, per-row loss detached [R]).

    Per-row values are the unweighted element-mean squared error for the regression methods (so
    per-route means read as MSE) and the clipped surrogate for flowopd. FlowOPD averages its rows
    uniformly (as Flow-GRPO does over timesteps and samples) and ignores ``weight``.
    """
    if method_cfg.name == "flowopd":
        t = flowopd_terms(method_cfg, pred, batch)
        return t["per_row"].mean(), t["per_row"].detach()
    if method_cfg.name not in REGRESSION_METHODS:
        raise ValueError(f"compute_loss: unknown method {method_cfg.name!r}")
    target = batch["target"].detach().float()
    per_row = _elem_mean((pred.float() - target) ** 2)
    weight = batch["weight"].detach().float().to(per_row.device)
    loss = (weight * per_row).sum() / _num_samples(batch["sample_index"])
    return loss, per_row.detach()


def per_route_mean(per_row: torch.Tensor, routes: list[str]) -> dict[str, float]:
    """Mean of a per-row value for each route name (for metrics)."""
    values = torch.as_tensor(per_row).detach().float().cpu().tolist()
    if len(values) != len(routes):
        raise ValueError(f"per_route_mean: {len(values)} values for {len(routes)} routes")
    acc: dict[str, list[float]] = defaultdict(list)
    for v, r in zip(values, routes, strict=True):
        acc[r].append(v)
    return {r: sum(vs) / len(vs) for r, vs in acc.items()}
