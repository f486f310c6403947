"""Join a Ray cluster, or start a local one sized for the job."""

from __future__ import annotations

import ray

from services.runtime.placement import cpus_needed


def connect(cfg, address: str | None) -> bool:
    """Join `address` (`auto`: the running cluster) or start a local cluster sized for the job.
    Returns True when this call connected (and so should disconnect)."""
    if ray.is_initialized():
        return False
    env = {"RAY_USAGE_STATS_ENABLED": "0"}
    if address:
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True)
        return True  # disconnects only; a joined cluster keeps running
    ray.init(address="local", num_cpus=cpus_needed(cfg), include_dashboard=False, runtime_env={"env_vars": env})
    return True
