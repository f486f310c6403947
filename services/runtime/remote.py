"""The cluster as the fleet sees it: which errors mean an actor died, and whether Ray's
autoscaler runs."""

from __future__ import annotations

import json

import ray


def died(e: BaseException) -> bool:
    return isinstance(e, (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError))


def has_autoscaler() -> bool:
    """The cluster runs Ray's autoscaler: pending placement groups then ask it for nodes, so the
    nodes alive now are no bound. Read from the status its monitor publishes in the GCS: every
    cluster runs a monitor, but one without an autoscaler config uses a read-only provider whose
    node types are the nodes themselves (`node_<id>`); an autoscaler's are its node types. A
    cluster that publishes no such status counts as fixed (the safe side: refuse early)."""
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    try:
        raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
        report = (json.loads(raw).get("autoscaler_report") or {}) if raw else {}
    except Exception:  # noqa: BLE001 — an older or different GCS: assume a fixed cluster
        return False
    types = report.get("node_type_mapping") or {}
    launchable = (report.get("node_availability_summary") or {}).get("node_availabilities") or {}
    return bool(launchable) or any(t != f"node_{n}" for n, t in types.items())


def node_groups() -> list[tuple[str, dict, int]] | None:
    """The autoscaler's node groups as it reported them to the GCS: (name, resources of one
    node, most nodes; -1 = no bound), or None when none was reported. Ray's v2 autoscaler
    reports them (Ray Data reads the same record to bound its requests); Ray 2.60's KubeRay
    autoscaler does not yet, so there the config's own caps are the only bound."""
    from ray._private.state import state

    try:
        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001 — an older or different GCS: nothing known
        return None
    if config is None or not config.node_group_configs:
        return None
    return [(g.name, {k: float(v) for k, v in g.resources.items()}, int(g.max_count)) for g in config.node_group_configs]
