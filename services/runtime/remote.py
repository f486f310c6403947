"""The cluster as the fleet sees it: which errors mean an actor died, and whether Ray's
autoscaler runs."""

from __future__ import annotations

import ray


def died(e: BaseException) -> bool:
    return isinstance(e, (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError))


def has_autoscaler() -> bool:
    """The cluster runs Ray's autoscaler (its monitor publishes a status in the GCS): pending
    placement groups then ask it for nodes, so the nodes alive now are no bound."""
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    try:
        return _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS) is not None
    except Exception:  # noqa: BLE001 — an older or different GCS: assume a fixed cluster
        return False
