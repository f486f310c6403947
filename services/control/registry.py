"""Registry: `register(job_name, url, token)` creates a small named Ray actor
("danceopd-control:<job>", namespace "danceopd"). It is NOT detached, so it dies with the
driver that created it (the controller) and a crashed job never leaves a stale entry. Anyone
who can call Ray actors on the cluster can read the token; that is the same trust boundary as
the cluster itself (Ray token auth protects it). `lookup(job_name)` returns None when nothing
is registered.
"""

from __future__ import annotations

import os

REGISTRY_NAMESPACE = "danceopd"


def registry_name(job_name: str) -> str:
    return f"danceopd-control:{job_name}"


_REGISTERED: dict[str, object] = {}  # job -> actor handle; a non-detached actor lives while referenced


def _registry_actor_class():
    import ray

    @ray.remote(num_cpus=0, max_restarts=0)
    class ControlRegistry:
        def __init__(self, job_name: str, url: str, token: str, node_ip: str, pid: int):
            self.info = {"job": job_name, "url": url, "token": token, "node_ip": node_ip, "pid": pid}

        def get(self) -> dict:
            return dict(self.info)

    return ControlRegistry


def register(job_name: str, url: str, token: str):
    """Publish this job's control endpoint on the Ray cluster the process is connected to.
    Raises ValueError when a live job already registered the same name."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    name = registry_name(job_name)
    try:
        ray.get_actor(name, namespace=REGISTRY_NAMESPACE)
    except ValueError:
        pass
    else:
        raise ValueError(f"job.name {job_name!r}: another running job already registered that name "
                         f"(actor {name!r}); give this job another job.name")
    node_ip = ray.util.get_node_ip_address()
    # On the controller's node: it needs no resources, so Ray could place it on any node, where a
    # node's loss (or one lost a moment ago that the GCS has not yet declared dead) took the
    # registry with it and failed the job's next start.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    try:
        handle = _registry_actor_class().options(name=name, namespace=REGISTRY_NAMESPACE, lifetime=None,
                                                 scheduling_strategy=here).remote(job_name, url, token, node_ip, os.getpid())
    except ValueError as e:  # lost a race with another job of the same name
        raise ValueError(f"job.name {job_name!r}: another running job already registered that name ({e})") from None
    ray.get(handle.get.remote())  # created and reachable before anyone is told to look
    _REGISTERED[job_name] = handle
    return handle


def unregister(job_name: str) -> None:
    import ray

    handle = _REGISTERED.pop(job_name, None)
    if handle is not None:
        ray.kill(handle)


def lookup(job_name: str, timeout_s: float = 30.0) -> dict | None:
    """{job, url, token, node_ip, pid} of a registered job, or None when none is registered."""
    import ray

    try:
        handle = ray.get_actor(registry_name(job_name), namespace=REGISTRY_NAMESPACE)
    except ValueError:
        return None
    try:
        return ray.get(handle.get.remote(), timeout=timeout_s)
    except ray.exceptions.RayActorError:
        return None  # the owning driver just exited
