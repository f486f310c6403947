"""Placement as data: what each role of the job asks of the cluster, read from the config.

Every actor group (rollout workers, each teacher's replicas, learner ranks, the router's
scorer, the evaluator) is built from one `RoleSpec`; nothing else in the runtime hard-codes a
resource number.
"""

from __future__ import annotations

import collections
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: no import cycle, no cost
    from danceopd.config import Config

SCORER_RESTARTS = 3
TEACHER_RESTARTS = 3


@dataclass(frozen=True)
class RoleSpec:
    num_cpus: float = 0.0
    num_gpus: float = 0.0
    max_restarts: int = 0  # restarts the fleet itself makes of one member
    max_concurrency: int = 1  # > 1: a threaded actor (calls from one caller may overlap)
    members: int = 1  # at start

    @property
    def bundle(self) -> dict:
        return {k: v for k, v in {"CPU": self.num_cpus, "GPU": self.num_gpus}.items() if v}


def role_specs(cfg: Config) -> dict[str, RoleSpec]:
    r, lc = cfg.rollout, cfg.learner
    specs = {
        "rollout": RoleSpec(r.num_cpus, r.num_gpus, r.max_restarts, members=r.workers),
        "learner": RoleSpec(lc.num_cpus, lc.num_gpus, 0, members=lc.world_size),
        # The router's scoring side: stateless (the driver owns the router's state), so it is
        # replaced like a teacher replica and re-scores what it held.
        "router": RoleSpec(0.1, 0.0, SCORER_RESTARTS, max_concurrency=cfg.routing.max_concurrent_batches),
    }
    used = {route.teacher for route in cfg.routing.routes}
    for t in cfg.teachers:
        if t.name in used:
            specs[f"teacher:{t.name}"] = RoleSpec(t.num_cpus, t.num_gpus, TEACHER_RESTARTS, members=t.replicas)
    if cfg.eval.enabled:  # off the data path: a failed evaluator stops evaluation, never the job
        specs["evaluator"] = RoleSpec(cfg.eval.num_cpus, cfg.eval.num_gpus)
    return specs


def cpus_needed(cfg: Config) -> int:
    """CPUs a local cluster needs for the job (at least this machine's cores)."""
    need = sum(s.num_cpus * s.members for s in role_specs(cfg).values())
    return max(math.ceil(need + 0.5), os.cpu_count() or 1)


def _field(cfg: Config, role: str) -> str:
    if role.startswith("teacher:"):
        name = role.split(":", 1)[1]
        return f"teachers.{[t.name for t in cfg.teachers].index(name)}"
    return {"rollout": "rollout", "learner": "learner", "evaluator": "eval"}.get(role, role)


def check_capacity(cfg: Config, nodes: list[dict]) -> None:
    """Refuse, before any actor starts, a job the cluster can never place: a member larger than
    every node, or more of a resource than all nodes hold together. `nodes`: each alive node's
    total resources (e.g. {"CPU": 8, "GPU": 1}). Raises ConfigError naming the config field."""
    from danceopd.config import ConfigError

    specs = role_specs(cfg)
    total = {k: sum(n.get(k, 0.0) for n in nodes) for k in ("CPU", "GPU")}
    for role, spec in specs.items():
        need = spec.bundle
        if need and not any(all(n.get(k, 0.0) >= v for k, v in need.items()) for n in nodes):
            have = ", ".join(f"{n.get('CPU', 0):g} CPU/{n.get('GPU', 0):g} GPU" for n in nodes)
            raise ConfigError(f"{_field(cfg, role)}: one member needs {need.get('CPU', 0):g} CPU and {need.get('GPU', 0):g} GPU; "
                              f"no node of the cluster has that (nodes: {have})")
    for k in ("CPU", "GPU"):
        want = sum(s.bundle.get(k, 0.0) * s.members for s in specs.values())
        if want > total[k] + 1e-9:
            parts = ", ".join(f"{_field(cfg, r)} {s.members}x{s.bundle[k]:g}" for r, s in specs.items() if s.bundle.get(k))
            raise ConfigError(f"num_{k.lower()}s: the job needs {want:g} {k} ({parts}); the cluster has {total[k]:g}")


def reserved_by_others(specs: dict) -> dict[str, float]:
    out: collections.Counter = collections.Counter()
    for role, spec in specs.items():
        if role != "rollout":
            for k, v in spec.bundle.items():
                out[k] += v * spec.members
    return dict(out)


def placeable(spec, nodes: list[dict], reserved: dict[str, float]) -> int:
    """Members of `spec` that `nodes` (each node's total resources) can hold once `reserved`
    is taken out of the whole cluster."""
    need = spec.bundle
    if not need:
        return 10**6
    per_node = sum(min(int(node.get(k, 0.0) // v) for k, v in need.items()) for node in nodes)
    left = min(int(max(0.0, sum(n.get(k, 0.0) for n in nodes) - reserved.get(k, 0.0)) // v) for k, v in need.items())
    return min(per_node, left)
