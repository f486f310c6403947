"""`danceopd train --mode ray`: join or start a Ray cluster, run the Controller, clean up."""

from __future__ import annotations

import math
import os

import ray

from services.controller import Controller


def cpus_needed(cfg) -> int:
    teachers = sum(t.replicas * t.num_cpus for t in cfg.teachers)
    need = cfg.rollout.workers * cfg.rollout.num_cpus + cfg.learner.world_size * cfg.learner.num_cpus + teachers + 0.5
    return max(math.ceil(need), os.cpu_count() or 1)


def connect(cfg, address: str | None) -> bool:
    """Join `address` (`auto`: the running cluster) or start a local cluster sized for the job.
    Returns True when this call started the cluster (and so should stop it)."""
    if ray.is_initialized():
        return False
    env = {"RAY_USAGE_STATS_ENABLED": "0"}
    if address:
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True)
        return True  # disconnects only; a joined cluster keeps running
    ray.init(address="local", num_cpus=cpus_needed(cfg), include_dashboard=False, runtime_env={"env_vars": env})
    return True


def train_ray(cfg, address: str | None = None, resume_from=None, show_progress: bool = True) -> dict:
    started = connect(cfg, address)
    controller = None
    try:
        controller = Controller(cfg, resume_from=resume_from, show_progress=show_progress)
        return controller.run()
    finally:
        if controller is not None:
            controller.shutdown()
        if started:
            ray.shutdown()
