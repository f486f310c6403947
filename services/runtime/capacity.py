"""The most a Ray cluster can ever hold: its nodes alive now without an autoscaler, its node
groups at their most with one. Scaling requests and the fleet's start are refused beyond it."""

from __future__ import annotations

import ray

from services.runtime.placement import most_members
from services.runtime.remote import has_autoscaler, node_groups


def autoscaled(mode: str) -> bool:
    """Pending members make the cluster add nodes (`autoscale.cluster_autoscaler`: on|off|auto)."""
    return mode == "on" or (mode == "auto" and has_autoscaler())


def most_nodes(autoscaled: bool) -> tuple[list[tuple[dict, int]], str] | None:
    """The most the cluster can ever have, as (resources of a node, how many) and words for
    messages: without an autoscaler, the nodes alive now; with one, its node groups at their
    most nodes when it reported them (-1: no bound); else None (unknown: the config's caps are
    the only bound)."""
    if not autoscaled:
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        return [(res, 1) for res in nodes], f"the {len(nodes)} node(s) of this cluster (no autoscaler)"
    groups = node_groups()
    if groups is None:
        return None
    words = ", ".join(f"{name} x{'unbounded' if m < 0 else m}" for name, _, m in groups)
    return [(res, m) for _, res, m in groups], f"the autoscaler's node groups at their most ({words})"


def max_members(bundle: dict, most: tuple[list[tuple[dict, int]], str] | None) -> tuple[int, str] | None:
    """How many `bundle`s fit on the cluster's most nodes with nothing else on them, and the words
    for those nodes (None: no bound known)."""
    if most is None:
        return None
    if any(n < 0 and most_members(bundle, [res]) for res, n in most[0]):
        return None  # a group that fits it has no bound
    return most_members(bundle, [res for res, n in most[0] for _ in range(max(n, 0))]), most[1]


def fits_now(bundle: dict) -> bool:
    """One `bundle` fits on one node's free resources now (per node, not summed)."""
    from ray._private.state import available_resources_per_node

    return any(all(free.get(k, 0.0) >= v for k, v in bundle.items()) for free in available_resources_per_node().values())
