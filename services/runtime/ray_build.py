"""`--mode ray`: the job's parts (fleet, learner group, weight sync), started together."""

from __future__ import annotations

from typing import TYPE_CHECKING

from services.runtime.ray_fleet import RayFleet

if TYPE_CHECKING:  # annotations only: no import cycle, no cost
    from danceopd.config import Config


def build_ray(cfg: Config, pipe, run_id: str):
    from services.runtime.ray_learner import RayLearner
    from services.weights.ray_sync import CollectiveSync, ObjectStoreSync

    # Every actor starts at once, the learner's ranks beside the fleet's members (each start is a
    # process importing torch: in sequence they left a core idle), then both are awaited.
    fleet = RayFleet(cfg, latest=lambda: pipe.weights if pipe.weights and pipe.weights[1] is not None else None,
                     run_id=run_id)
    learner = None
    try:
        learner = RayLearner(cfg, fleet.specs["learner"])
        fleet.started()
        learner.started()
    except BaseException:
        if learner is not None:
            learner.shutdown()
        fleet.shutdown()
        raise
    sync_cls = CollectiveSync if cfg.sync.transport == "collective" else ObjectStoreSync
    return fleet, learner, sync_cls(cfg.sync, cfg.rollout, cfg.deadlines, learner, fleet, pipe)
