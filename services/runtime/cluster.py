"""Join a Ray cluster, or start a local one sized for the job."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import ray

from services.runtime.placement import cpus_needed

if TYPE_CHECKING:  # annotations only: no import cycle, no cost
    from danceopd.config import Config

LOG_DIR = "/tmp/ray/session_latest/logs"  # Ray's log folder of the session this process joined


def connect(cfg: Config, address: str | None) -> bool:
    """Join `address` (`auto`: the running cluster) or start a local cluster sized for the job.
    Returns True when this call connected (and so should disconnect).

    The console stays the job's own: Ray's start-up messages are not shown (logging_level), and
    a local cluster's actor output stays in Ray's log folder (`LOG_DIR`) instead of the console.
    A joined cluster keeps streaming actor output to the driver: that is the Ray job's log."""
    global LOG_DIR
    if ray.is_initialized():
        return False
    env = {"RAY_USAGE_STATS_ENABLED": "0"}
    if address:
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True, logging_level=logging.ERROR)
    else:
        system = {}
        if cfg.replay.spill_dir:  # queued batches are object refs: Ray spills them, here
            system["object_spilling_config"] = json.dumps(
                {"type": "filesystem", "params": {"directory_path": str(cfg.resolve(cfg.replay.spill_dir))}})
        ray.init(address="local", num_cpus=cpus_needed(cfg), include_dashboard=False, runtime_env={"env_vars": env},
                 log_to_driver=False, logging_level=logging.ERROR, _system_config=system or None)
    try:
        LOG_DIR = str(Path(ray._private.worker._global_node.get_session_dir_path()) / "logs")
    except AttributeError:  # the private handle moved: keep the session_latest link
        pass
    _worker_deaths_to_log()
    return True


def _worker_deaths_to_log() -> None:
    """Ray's driver prints every worker death the raylet reports ("(raylet) A worker died or
    was killed ...", a paragraph each) on the console. The fleet already says in one line what
    died and what it did, so those paragraphs go to `LOG_DIR/danceopd-worker-deaths.log`; every
    other raylet message still reaches the console."""
    import ray._private.worker as ray_worker

    show = ray_worker.print_to_stdstream
    if getattr(show, "danceopd", False):
        return

    def routed(data, ignore_prefix):
        if data.get("pid") == "raylet" and all(line.startswith("A worker died or was killed") for line in data["lines"]):
            try:
                with open(Path(LOG_DIR) / "danceopd-worker-deaths.log", "a") as f:
                    f.write("\n".join(data["lines"]) + "\n")
                return
            except OSError:
                pass  # no log folder: the console it is
        show(data, ignore_prefix)

    routed.danceopd = True
    ray_worker.print_to_stdstream = routed  # the listener looks it up at each message
