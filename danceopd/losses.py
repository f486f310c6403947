"""Loss math the methods share (danceopd/methods/ decides which applies), blind to how rows
were made.

A batch is a dict of tensors with one row per queried state:
``state [R,*S]``, ``sigma [R]``, ``sigma_next [R]``, ``cond [R,C]``, ``target [R,*S]`` (teacher
velocity with CFG absorbed, or the data velocity for sft), ``weight [R]``, ``sample_index [R]``
(rows sharing a value come from one sample), ``query_index [R]`` and, for flowopd,
``next_state``, ``rollout_velocity`` (the old policy's velocity), ``group`` and ``advantage``.
Everything on the target side is detached here, so a caller cannot leak gradient into a teacher
or into stored rollout tensors by accident.

Regression: loss = sum_r weight_r * mean_elem((pred_r - target_r)^2) / #distinct samples, so
the weights (1/K, 0.5/N^2, ...) say how a sample's rows combine and the batch is a mean over
samples, whatever the number of rows each one contributed.
"""

from __future__ import annotations

from collections import defaultdict

import torch


def elem_mean(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).mean(dim=1)


def weighted_mse(pred: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, per-row element-mean squared error, detached: per-route means read as MSE)."""
    target = batch["target"].detach().float()
    per_row = elem_mean((pred.float() - target) ** 2)
    weight = batch["weight"].detach().float().to(per_row.device)
    samples = int(torch.unique(batch["sample_index"]).numel())
    return (weight * per_row).sum() / samples, per_row.detach()


def group_normalise(reward: torch.Tensor, group: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(r - mean_g) / (std_g + eps) per group, population std (ddof = 0, as Flow-GRPO)."""
    _, inv, counts = torch.unique(group, return_inverse=True, return_counts=True)
    counts = counts.to(reward.dtype)
    mean = torch.zeros_like(counts).index_add_(0, inv, reward) / counts
    var = torch.zeros_like(counts).index_add_(0, inv, (reward - mean[inv]) ** 2) / counts
    return (reward - mean[inv]) / (var.sqrt()[inv] + eps)


def reward_to_go(reward: torch.Tensor, sample_index: torch.Tensor, query_index: torch.Tensor) -> torch.Tensor:
    """Per row: the sum of the rewards of the later transitions (larger query_index) of the same
    sample. O(R log R): sort by (sample, index), then a suffix sum within each sample."""
    if reward.numel() == 0:
        return reward
    key = sample_index.long() * (int(query_index.max()) + 1) + query_index.long()
    order = torch.argsort(key)
    r = reward[order].double()
    _, seg = torch.unique_consecutive(sample_index[order], return_inverse=True)
    total = torch.zeros(int(seg.max()) + 1, dtype=r.dtype).index_add_(0, seg, r)
    csum = torch.cumsum(r, 0)
    pos = torch.arange(len(r))
    first = torch.zeros_like(seg[: len(total)]).scatter_reduce_(0, seg, pos, reduce="amin", include_self=False)
    before = (csum - r)[first]  # cumulative sum before each sample's first row
    later = total[seg] - (csum - before[seg])  # the sample's total minus its prefix up to this row
    out = torch.empty_like(reward)
    out[order] = later.to(reward.dtype)
    return out


def per_route_mean(per_row: torch.Tensor, routes: list[str]) -> dict[str, float]:
    """Mean of a per-row value for each route name (for metrics)."""
    values = torch.as_tensor(per_row).detach().float().cpu().tolist()
    if len(values) != len(routes):
        raise ValueError(f"per_route_mean: {len(values)} values for {len(routes)} routes")
    acc: dict[str, list[float]] = defaultdict(list)
    for v, r in zip(values, routes, strict=True):
        acc[r].append(v)
    return {r: sum(vs) / len(vs) for r, vs in acc.items()}
