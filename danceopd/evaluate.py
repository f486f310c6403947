"""Evaluation: sample the student with its full ODE and compare against each route's target."""

from __future__ import annotations

import torch

from danceopd.backends.base import Row
from danceopd.flow import euler_step, sigma_schedule


@torch.no_grad()
def sample(backend, model, rows: list[Row], seeds: list[int], steps: int, shift: float) -> torch.Tensor:
    """Deterministic Euler ODE from seeded noise to the clean endpoint."""
    sig = sigma_schedule(steps, shift)
    z = backend.noise(seeds)
    cond = backend.encode(rows)
    b = len(rows)
    for i in range(steps):
        z = euler_step(z, backend.predict(model, z, sig[i].expand(b), cond), sig[i].expand(b), sig[i + 1].expand(b))
    return backend.decode(z)


def toy_route_errors(cfg, backend, model, n: int = 256, seed: int = 12345) -> dict[str, float]:
    """Per route: mean over prompt classes of |E[student sample] - teacher target mean|."""
    out = {}
    for route in cfg.routing.routes:
        errs = []
        for c in range(backend.num_classes):
            rows = [Row(uid=f"eval-{c}", task=route.task, prompt=f"class {c}")] * n
            x = sample(backend, model, rows, [seed + i for i in range(n)], cfg.method.rollout_steps, cfg.method.shift)
            errs.append(float((x.mean(0) - backend.target_mean(route.task, f"class {c}")).norm()))
        out[route.name] = sum(errs) / len(errs)
    return out
