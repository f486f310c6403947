"""Placement as data: what each role of the job asks of the cluster, read from the config.

Every actor group (rollout workers, each teacher's replicas, learner ranks, router, replay
queue, weight store) is built from one `RoleSpec`; nothing else in the runtime hard-codes a
resource number.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

SINGLETON_RESTARTS = 3
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


def role_specs(cfg) -> dict[str, RoleSpec]:
    r, lc = cfg.rollout, cfg.learner
    specs = {
        "rollout": RoleSpec(r.num_cpus, r.num_gpus, r.max_restarts, members=r.workers),
        "learner": RoleSpec(lc.num_cpus, lc.num_gpus, 0, members=lc.world_size),
        # The singletons are rebuilt in place from what the controller holds (router state,
        # queued batch refs, the latest weights): a few restarts, like a teacher replica.
        "router": RoleSpec(0.1, 0.0, SINGLETON_RESTARTS, max_concurrency=cfg.routing.max_concurrent_batches),
        "replay": RoleSpec(max_restarts=SINGLETON_RESTARTS),
        "weight_store": RoleSpec(max_restarts=SINGLETON_RESTARTS),
    }
    used = {route.teacher for route in cfg.routing.routes}
    for t in cfg.teachers:
        if t.name in used:
            specs[f"teacher:{t.name}"] = RoleSpec(t.num_cpus, t.num_gpus, TEACHER_RESTARTS, members=t.replicas)
    return specs


def cpus_needed(cfg) -> int:
    """CPUs a local cluster needs for the job (at least this machine's cores)."""
    need = sum(s.num_cpus * s.members for s in role_specs(cfg).values())
    return max(math.ceil(need + 0.5), os.cpu_count() or 1)
