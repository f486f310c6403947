"""Rectified-flow math (SD3 conventions), all in fp32.

    z_sigma = (1 - sigma) x0 + sigma eps,   v = eps - x0,
    Euler:  z_{i+1} = z_i + (sigma_{i+1} - sigma_i) v,   shift: sigma' = s sigma / (1 + (s - 1) sigma),
    model timestep = 1000 sigma.

Sigma arguments are Python floats, 0-dim tensors or [B] tensors; [B] is broadcast over the state
dims. Results are fp32 whatever the input dtype, so a bf16 student still rolls out and scores
log-probs in fp32 (FlowOPD ratios are exp of small differences and do not survive bf16).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # annotations only: no import cycle, no cost
    from danceopd.config import Config

NUM_TRAIN_TIMESTEPS = 1000


def _sig(sigma: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """sigma as fp32 on like's device: 0-dim stays 0-dim, [B] becomes [B, 1, ..., 1]."""
    s = torch.as_tensor(sigma, dtype=torch.float32, device=like.device)
    if s.dim() == 1:
        s = s.reshape(-1, *([1] * (like.dim() - 1)))
    return s


def shift_sigmas(sigma: float | torch.Tensor, shift: float) -> float | torch.Tensor:
    return shift * sigma / (1 + (shift - 1) * sigma)


def sigma_schedule(n: int, shift: float) -> torch.Tensor:
    """The N + 1 sigmas of an N-step rollout, identical to diffusers'
    ``FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(n).sigmas``.

    Diffusers spaces the grid between its *shifted* training extremes, so for s != 1 the grid is
    ``shift(linspace(1, shift(1/1000), n))`` (shift applied twice at the low end), not
    ``shift(linspace(1, 1/1000, n))``; we follow diffusers so students and teachers see exactly the
    states the released models know. Terminal sigma is 0.
    """
    if n < 1:
        raise ValueError(f"sigma_schedule: n must be >= 1, got {n}")
    # Diffusers builds its training sigmas in fp32; its sigma_min is shift(fp32(1/1000)).
    sigma_min = float(shift_sigmas(torch.tensor(1.0, dtype=torch.float32) / NUM_TRAIN_TIMESTEPS, shift))
    grid = torch.linspace(1.0, sigma_min, n, dtype=torch.float64)
    sig = shift_sigmas(grid, shift).to(torch.float32)
    return torch.cat([sig, torch.zeros(1, dtype=torch.float32)])


def zimage_sigma_schedule(n: int, shift: float) -> torch.Tensor:
    """The reference trainer's Z-Image grid: sigma_i = shift(i-th of linspace(1, 0, n + 1)) for
    i < n, then a terminal 0 (n = 16, shift 3: 1.0, .978, .955, ..., .300, .167, 0). Unlike the
    SD3 grid its low end is shifted once and reaches well below diffusers' last state."""
    if n < 1:
        raise ValueError(f"zimage_sigma_schedule: n must be >= 1, got {n}")
    grid = torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64)[:n]
    return torch.cat([shift_sigmas(grid, shift).to(torch.float32), torch.zeros(1, dtype=torch.float32)])


SIGMA_GRIDS = {"sd3": sigma_schedule, "zimage": zimage_sigma_schedule}


def sigma_grid(name: str, n: int, shift: float) -> torch.Tensor:
    """The N + 1 sigmas of the named model family's grid (`sd3` or `zimage`)."""
    if name not in SIGMA_GRIDS:
        raise ValueError(f"sigma grid {name!r}: not one of {', '.join(SIGMA_GRIDS)}")
    return SIGMA_GRIDS[name](n, shift)


def job_sigmas(cfg: Config, backend) -> torch.Tensor:
    """A job's grid: `method.sigma_grid`, or with `auto` the backend's model family (rollouts and
    evaluation share it)."""
    grid = backend.sigma_grid if cfg.method.sigma_grid == "auto" else cfg.method.sigma_grid
    return sigma_grid(grid, cfg.method.rollout_steps, cfg.method.shift)


def euler_step(z: torch.Tensor, v: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    dt = _sig(sigma_next, z) - _sig(sigma, z)
    return z.float() + dt * v.float()


def forward_noise(x0: torch.Tensor, eps: torch.Tensor, sigma) -> torch.Tensor:
    s = _sig(sigma, x0)
    return (1 - s) * x0.float() + s * eps.float()


def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    return eps.float() - x0.float()


def sde_step_mean_std(
    z: torch.Tensor, v: torch.Tensor, sigma, sigma_next, eta: float, sigma_max=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the Flow-GRPO SDE transition z_sigma -> z_sigma_next.

    std_dev_t = eta sqrt(sigma / (1 - sigma)) is infinite at sigma = 1. Flow-GRPO replaces the
    denominator's sigma by the schedule's largest sigma below 1 (``scheduler.sigmas[1]``). When
    ``sigma_max`` is not given we use ``sigma_next`` in its place: a step that starts at sigma = 1
    is step 0 of the schedule, whose sigma_next *is* sigmas[1], so this is the same number without
    threading the schedule through every caller. The returned std is broadcastable to z.
    """
    s = _sig(sigma, z)
    s_next = _sig(sigma_next, z)
    guard = s_next if sigma_max is None else torch.as_tensor(sigma_max, dtype=torch.float32, device=z.device)
    std_dev_t = eta * torch.sqrt(s / (1 - torch.where(s >= 1, guard, s)))
    dt = s_next - s  # negative: sampling runs sigma 1 -> 0
    zf, vf = z.float(), v.float()
    mean = zf * (1 + std_dev_t**2 / (2 * s) * dt) + vf * (1 + std_dev_t**2 * (1 - s) / (2 * s)) * dt
    std = std_dev_t * torch.sqrt(-dt)
    return mean, std


def sde_step(z, v, sigma, sigma_next, eta: float, noise: torch.Tensor, sigma_max=None):
    """One stochastic step; returns (z_next, mean, std)."""
    mean, std = sde_step_mean_std(z, v, sigma, sigma_next, eta, sigma_max)
    return mean + std * noise.float(), mean, std


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-element Gaussian log-density averaged over the non-batch dims -> [B] (as Flow-GRPO)."""
    x, mean, std = x.float(), mean.float(), torch.as_tensor(std, dtype=torch.float32, device=x.device)
    lp = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    lp = lp.expand_as(x)
    return lp.mean(dim=tuple(range(1, x.dim()))) if x.dim() > 1 else lp


def cfg_combine(v_uncond: torch.Tensor, v_cond: torch.Tensor, scale: float) -> torch.Tensor:
    # Scales 1 and 0 return a branch untouched: u + 1 * (c - u) is not bit-exactly c in floating
    # point, and "scale 1 = one conditional pass" must mean the same numbers as that pass.
    if scale == 1:
        return v_cond
    if scale == 0:
        return v_uncond
    return v_uncond + scale * (v_cond - v_uncond)


@dataclass
class Trajectory:
    """What `integrate` made. ``states[i]`` is the state before step i (``states[0]`` the noise);
    ``velocities[i]`` the field at ``states[i]``. Row b is valid up to ``states[until[b]]`` and
    ``velocities[until[b] - 1]``; past that it holds the sample's last state (it left the batch).
    ``nfe`` counts field evaluations per sample (a CFG field's two passes count as one)."""

    states: list[torch.Tensor]
    velocities: list[torch.Tensor]
    until: torch.Tensor
    nfe: int


def guided_velocity(predict, null_cond, z, sigma, cond, scale: float) -> torch.Tensor:
    """CFG of any field: one pass at scale 1, else both branches in one batched call."""
    if scale == 1:
        return predict(z, sigma, cond)
    v_u, v_c = predict(torch.cat([z, z]), torch.cat([sigma, sigma]), torch.cat([null_cond(cond), cond])).chunk(2)
    return cfg_combine(v_u, v_c, scale)


def integrate(
    field: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    z: torch.Tensor,
    sigmas: torch.Tensor,
    until: torch.Tensor | list[int] | int | None = None,
    eta: float | None = None,
    noise: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
) -> Trajectory:
    """The one rollout integrator: Euler ODE (``eta`` None) or the Flow-GRPO SDE (``eta`` > 0,
    ``noise(step, active) -> [len(active), *S]``) from z at sigmas[0], every sample stopping at its
    own last needed state.

    ``field(z, sigma, active) -> v`` sees only the active samples (``active`` indexes the batch,
    so a caller can pick their conditions). Sample b takes steps 0 .. until[b] - 1 and so reaches
    state until[b] (default: the clean endpoint, N steps); a finished sample leaves the active
    batch, so a batch costs sum(until) evaluations, not B * max(until).

    The trajectory stays on z's device: the sigmas and every step's active rows go there once,
    before the first step, so a GPU rollout makes no host round trip per step (``active`` as the
    field and ``noise`` see it stays on the host, where a caller's conditions are).
    """
    n = len(sigmas) - 1
    b = z.shape[0]
    until = torch.full((b,), n, dtype=torch.long) if until is None else torch.as_tensor(until, dtype=torch.long).expand(b)
    if int(until.min()) < 0 or int(until.max()) > n:
        raise ValueError(f"integrate: until must lie in [0, {n}], got {until.tolist()}")
    if eta is not None and noise is None:
        raise ValueError("integrate: an SDE rollout (eta set) needs a noise function")
    z = z.float()
    actives = [torch.nonzero(until > i).squeeze(1) for i in range(int(until.max()))]
    sig_all = sigmas.to(device=z.device, dtype=torch.float32)
    rows_all = torch.cat(actives).to(z.device).split([len(a) for a in actives]) if actives else []
    states, velocities, nfe = [z], [], 0
    for i, (active, rows) in enumerate(zip(actives, rows_all)):
        sig, sig_next = sig_all[i].expand(len(active)), sig_all[i + 1].expand(len(active))
        za = z[rows]
        v = field(za, sig, active).float()
        nfe += len(active)
        if eta is None:
            z_next = euler_step(za, v, sig, sig_next)
        else:
            z_next, _, _ = sde_step(za, v, sig, sig_next, eta, noise(i, active))
        vel = torch.zeros_like(z)
        vel[rows] = v
        z = z.clone()
        z[rows] = z_next
        velocities.append(vel)
        states.append(z)
    return Trajectory(states, velocities, until, nfe)
