"""Evaluation: sample the student with its full ODE and compare against each route's target."""

from __future__ import annotations

import torch

from danceopd.backends.base import Row
from danceopd.flow import integrate, job_sigmas


@torch.no_grad()
def sample(backend, model, rows: list[Row], seeds: list[int], sigmas: torch.Tensor) -> torch.Tensor:
    """Deterministic Euler ODE (the rollouts' integrator and grid) from seeded noise to the
    clean endpoint."""
    cond = backend.encode(rows)
    traj = integrate(lambda z, sig, active: backend.predict(model, z, sig, cond[active]), backend.noise(seeds), sigmas)
    return backend.decode(traj.states[-1])


def toy_route_errors(cfg, backend, model, n: int = 256, seed: int = 12345) -> dict[str, float]:
    """Per route: mean over prompt classes of |E[student sample] - teacher target mean|."""
    sigmas = job_sigmas(cfg, backend)
    out = {}
    for route in cfg.routing.routes:
        errs = []
        for c in range(backend.num_classes):
            rows = [Row(uid=f"eval-{c}", task=route.task, prompt=f"class {c}")] * n
            x = sample(backend, model, rows, [seed + i for i in range(n)], sigmas)
            errs.append(float((x.mean(0) - backend.target_mean(route.task, f"class {c}")).norm()))
        out[route.name] = sum(errs) / len(errs)
    return out


def weights_route_errors(cfg, weights: dict, n: int = 128) -> dict[str, float] | None:
    """`toy_route_errors` of a student holding `weights` (the learner's export), or None where
    the backend has no analytic target to compare with (shapes: see its own evaluation)."""
    from danceopd.backends import make_backend
    from danceopd.lora import load_trainable_state_dict

    backend = make_backend(cfg)
    if not hasattr(backend, "target_mean"):
        return None
    model = backend.build_student("random", cfg.job.seed)
    load_trainable_state_dict(model, weights)
    model.eval()
    return {k: round(v, 5) for k, v in toy_route_errors(cfg, backend, model, n=n).items()}
