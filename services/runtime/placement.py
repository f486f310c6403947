"""Placement as data: what each role of the job asks of the cluster, read from the config.

Every actor group (rollout workers, each teacher's replicas, learner ranks, the router's
scorer, the evaluator) is built from one `RoleSpec`; nothing else in the runtime hard-codes a
resource number.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: no import cycle, no cost
    from danceopd.config import Config

SCORER_RESTARTS = 3
TEACHER_RESTARTS = 3


GiB = 1024**3


@dataclass(frozen=True)
class RoleSpec:
    num_cpus: float = 0.0
    num_gpus: float = 0.0
    max_restarts: int = 0  # restarts the fleet itself makes of one member
    max_concurrency: int = 1  # > 1: a threaded actor (calls from one caller may overlap)
    members: int = 1  # at start
    resources: tuple[tuple[str, float], ...] = ()  # custom Ray resources per member
    labels: tuple[tuple[str, str], ...] = ()  # node labels a member's node must carry
    memory: float = 0.0  # bytes per member
    strategy: str = "PACK"  # placement group strategy (the learner gang's matters)

    @property
    def bundle(self) -> dict:
        """One member's reservation: what its placement group bundle holds."""
        base = {"CPU": self.num_cpus, "GPU": self.num_gpus, "memory": self.memory, **dict(self.resources)}
        return {k: v for k, v in base.items() if v}

    @property
    def label_selector(self) -> dict:
        return dict(self.labels)

    def actor_options(self, in_group: bool) -> dict:
        """Ray actor options for one member: inside its placement group (`in_group`) they claim
        the bundle, whose label selector already chose the node; outside one they carry it."""
        opts = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.resources:
            opts["resources"] = dict(self.resources)
        if self.memory:
            opts["memory"] = self.memory
        if self.labels and not in_group:
            opts["label_selector"] = self.label_selector
        return opts


def _spec(section, **kw) -> RoleSpec:
    """A RoleSpec from a config section's placement fields (danceopd.config._Placed)."""
    return RoleSpec(section.num_cpus, getattr(section, "num_gpus", 0.0), resources=tuple(sorted(section.resources.items())),
                    labels=tuple(sorted(section.label_selector.items())), memory=section.memory_gb * GiB, **kw)


def role_specs(cfg: Config) -> dict[str, RoleSpec]:
    r, lc = cfg.rollout, cfg.learner
    specs = {
        "rollout": _spec(r, max_restarts=r.max_restarts, members=r.workers),
        "learner": _spec(lc, members=lc.world_size, strategy=lc.placement_strategy),
        # The router's scoring side: stateless (the driver owns the router's state), so it is
        # replaced like a teacher replica and re-scores what it held.
        "router": _spec(cfg.routing, max_restarts=SCORER_RESTARTS, max_concurrency=cfg.routing.max_concurrent_batches),
    }
    used = {route.teacher for route in cfg.routing.routes}
    for t in cfg.teachers:
        if t.name in used:
            specs[f"teacher:{t.name}"] = _spec(t, max_restarts=TEACHER_RESTARTS, members=t.replicas)
    if cfg.eval.enabled:  # off the data path: a failed evaluator stops evaluation, never the job
        specs["evaluator"] = _spec(cfg.eval)
    return specs


def cpus_needed(cfg: Config) -> int:
    """CPUs a local cluster needs for the job (at least this machine's cores)."""
    need = sum(s.num_cpus * s.members for s in role_specs(cfg).values())
    return max(math.ceil(need + 0.5), os.cpu_count() or 1)


def _field(cfg: Config, role: str) -> str:
    if role.startswith("teacher:"):
        name = role.split(":", 1)[1]
        return f"teachers.{[t.name for t in cfg.teachers].index(name)}"
    return {"rollout": "rollout", "learner": "learner", "evaluator": "eval", "router": "routing"}.get(role, role)


def amount(k: str, v: float) -> str:
    """A resource amount as users write it: memory in GiB, everything else as is."""
    return f"{v / GiB:g}" if k == "memory" else f"{v:g}"


def unit(k: str) -> str:
    return "GiB memory" if k == "memory" else k


def describe(res: dict) -> str:
    return ", ".join(f"{amount(k, v)} {unit(k)}" for k, v in res.items() if v) or "nothing"


def most_members(bundle: dict, nodes: list[dict]) -> int:
    """How many members of one `bundle` the `nodes` (total resources each) hold at most, with
    nothing else on them: a ceiling, never a promise."""
    if not bundle:
        return 10**9
    return sum(min(math.floor(n.get(k, 0.0) / v + 1e-9) for k, v in bundle.items()) for n in nodes)


def check_capacity(cfg: Config, nodes: list[dict]) -> None:
    """Refuse, before any actor starts, a job the cluster can never place: a member larger than
    every node, or more of a resource than all nodes hold together. `nodes`: each alive node's
    total resources (e.g. {"CPU": 8, "GPU": 1, "rollout": 1000}: custom resources and memory
    count like CPUs). Raises ConfigError naming the config field."""
    from danceopd.config import ConfigError

    specs = role_specs(cfg)
    for role, spec in specs.items():
        need = spec.bundle
        if need and not any(all(n.get(k, 0.0) >= v for k, v in need.items()) for n in nodes):
            have = "; ".join(describe({k: n.get(k, 0.0) for k in need}) for n in nodes)
            raise ConfigError(f"{_field(cfg, role)}: one member needs {describe(need)}; no node of the cluster has that "
                              f"(nodes: {have})")
    for k in sorted({k for s in specs.values() for k in s.bundle}):
        want = sum(s.bundle.get(k, 0.0) * s.members for s in specs.values())
        total = sum(n.get(k, 0.0) for n in nodes)
        if want > total + 1e-9:
            key = {"CPU": "num_cpus", "GPU": "num_gpus", "memory": "memory_gb"}.get(k, f"resources.{k}")
            parts = ", ".join(f"{_field(cfg, r)} {s.members}x{describe({k: s.bundle[k]})}" for r, s in specs.items() if s.bundle.get(k))
            raise ConfigError(f"{key}: the job needs {describe({k: want})} ({parts}); the cluster has {describe({k: total}) if total else 'none'}")
