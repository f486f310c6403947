"""The job's condition cache (latent backends), built once before any actor starts; actors only
read it.

Local mode builds it in this process. Ray mode never loads an encoder in the driver (on a
cluster that is the head pod: no GPU, little memory): the driver reads only the cache file's
fingerprint, and when the cache is missing or stale one actor with the rollout role's placement
builds it on a worker node, reporting its progress, and is then removed (its GPU goes back to
the rollout workers). `backend.cache_dir` must therefore be a folder that worker writes and
every role reads: shared storage on a cluster.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

if TYPE_CHECKING:  # annotations only: no import cycle, no cost
    from danceopd.config import Config

PROGRESS_EVERY_S = 1.0  # how often the driver asks the builder how far it is
LOG_EVERY_S = 30.0  # a progress line this often where there is no terminal (a Ray job's log)


def build_condition_cache(cfg: Config, progress: bool = True, force: bool = False, mode: str = "local"):
    """(path, built) of the job's condition cache, built when missing or stale; (None, False) for
    backends without one. `mode` "ray": built by an actor on a worker node (Ray connected)."""
    from danceopd.backends import backend_class

    if not backend_class(cfg.backend.name).condition_cache:
        return None, False
    if mode == "ray":
        return build_on_worker(cfg, progress, force)
    from danceopd.backends import make_backend

    backend = make_backend(cfg)
    with ProgressBar(progress) as update:
        return backend.build_cache(progress=update, force=force)


class ProgressBar:
    """A rich bar of encoded rows on a terminal; `update(done, total)`."""

    def __init__(self, enabled: bool, console: Console | None = None):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("encoding conditions"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                            console=console or Console(stderr=True), disable=not enabled, transient=True)

    def __enter__(self):
        self.bar.__enter__()
        task = self.bar.add_task("cache", total=None)
        return lambda done, total: self.bar.update(task, completed=done, total=total)

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)


class ConditionCacheBuilder:
    """Builds the job's condition cache where it runs: a Ray actor on a worker node, threaded so
    the driver can read its progress while it encodes."""

    def __init__(self, cfg: Config):
        self.cfg, self.done, self.total = cfg, 0, None

    def where(self) -> dict:
        import ray

        return {"node": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(), "pid": os.getpid()}

    def build(self, force: bool) -> dict:
        from danceopd.backends import make_backend

        t0 = time.perf_counter()
        backend = make_backend(self.cfg)
        path, built = backend.build_cache(progress=self._progress, force=force)
        return {"path": str(path), "built": built, "rows": self.total or 0,
                "seconds": round(time.perf_counter() - t0, 1), **self.where()}

    def _progress(self, done: int, total: int) -> None:
        self.done, self.total = done, total

    def progress(self) -> tuple[int, int | None]:
        return self.done, self.total


def build_on_worker(cfg: Config, progress: bool, force: bool) -> tuple[Path, bool]:
    """The Ray driver's side: a no-op when the cache file's fingerprint is current; else one
    ConditionCacheBuilder actor with the rollout role's placement builds it."""
    import ray

    from danceopd.backends import make_backend
    from danceopd.config import ConfigError
    from services.runtime.actors import actor_env
    from services.runtime.failures import RoleFailure, first_line
    from services.runtime.placement import check_capacity, describe, role_specs

    backend = make_backend(cfg)  # its configs only: no weights are loaded
    path, current = backend.cache_status()
    if current and not force:
        return path, False
    # Refused here, in one line naming the field, rather than waiting for a node that never comes.
    check_capacity(cfg, [n["Resources"] for n in ray.nodes() if n.get("Alive")])
    console = Console(stderr=True)
    spec = role_specs(cfg)["rollout"]
    console.print(f"condition cache {path.name}: {'rebuilding' if current else 'missing or stale'}; building it on a "
                  f"worker node with the rollout role's placement ({describe(spec.bundle)})", highlight=False, soft_wrap=True)
    opts = {**spec.actor_options(in_group=False), "max_concurrency": 2, "runtime_env": {"env_vars": actor_env(cfg)}}
    actor = ray.remote(ConditionCacheBuilder).options(**opts).remote(cfg)
    who = "condition cache builder (rollout placement)"
    start_s = cfg.sync.timeout_s + 600  # as long as the fleet gives a member to start
    try:
        try:
            where = ray.get(actor.where.remote(), timeout=start_s)
        except ray.exceptions.GetTimeoutError:
            raise RoleFailure(f"{who}: not placed within {start_s:g} s (no node with {describe(spec.bundle)} came up)") from None
        console.print(f"building the condition cache on {where['host']} (node {where['node'][:8]}) ...",
                      highlight=False, soft_wrap=True)
        ref = actor.build.remote(force)
        t0 = t_log = time.perf_counter()
        with ProgressBar(progress and console.is_terminal, console) as update:
            while not ray.wait([ref], timeout=PROGRESS_EVERY_S)[0]:
                done, total = ray.get(actor.progress.remote())
                update(done, total)
                if progress and not console.is_terminal and time.perf_counter() - t_log >= LOG_EVERY_S:
                    t_log = time.perf_counter()
                    console.print(f"condition cache: {done}/{total or '?'} rows encoded "
                                  f"({time.perf_counter() - t0:.0f} s)", highlight=False)
        res = ray.get(ref)
    except ray.exceptions.RayError as e:
        raise RoleFailure(f"{who}: {first_line(e)}") from None
    finally:
        ray.kill(actor, no_restart=True)  # its resources (a GPU) go to the rollout workers
    built = Path(res["path"])
    console.print(f"condition cache {'built' if res['built'] else 'up to date'} on {res['host']} (node {res['node'][:8]}): "
                  f"{res['rows']} rows in {res['seconds']:g} s -> {built}", highlight=False, soft_wrap=True)
    if not backend.cache_status()[1]:
        raise ConfigError(f"backend.cache_dir: the cache {res['host']} wrote ({built}) is not current here ({path}): "
                          "put backend.cache_dir on storage every node mounts")
    return path, res["built"]
