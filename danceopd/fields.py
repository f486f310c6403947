"""Exact flow-matching velocity fields of Gaussian data — the analytic teachers.

For x0 ~ N(mu, std^2 I), eps ~ N(0, I) and z = (1 - sigma) x0 + sigma eps, the marginal
velocity E[eps - x0 | z] is linear in z:
    var  = (1 - sigma)^2 std^2 + sigma^2
    E[eps | z] = sigma / var * (z - (1 - sigma) mu)
    E[x0  | z] = mu + (1 - sigma) std^2 / var * (z - (1 - sigma) mu)
Integrating it from sigma = 1 to 0 carries N(0, I) exactly to N(mu, std^2 I).
"""

from __future__ import annotations

import torch


def gaussian_velocity(z: torch.Tensor, sigma: torch.Tensor, mu: torch.Tensor, std: float | torch.Tensor) -> torch.Tensor:
    """z, mu: [B, *S]; sigma: [B]; std: scalar or broadcastable to z."""
    s = sigma.reshape(-1, *([1] * (z.dim() - 1))).to(z.dtype)
    var = (1 - s) ** 2 * std**2 + s**2
    resid = z - (1 - s) * mu
    e_eps = s / var * resid
    e_x0 = mu + (1 - s) * std**2 / var * resid
    return e_eps - e_x0
