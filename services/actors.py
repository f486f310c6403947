"""Ray at the edge: the plain component classes deployed as actors, and one small actor-group
abstraction (create, probe, restart with backoff, remove) shared by every role."""

from __future__ import annotations

import collections
import os
import socket
import time
from dataclasses import dataclass, field

import numpy as np
import ray
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rollout_workers.worker import RolloutWorker
from router.router import Router
from router.teacher import Teacher
from services.metrics import ActorMetrics
from services.replay import ReplayQueue
from services.weight_store import WeightStore


def actor_env(cfg) -> dict:
    env = {"RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    if cfg.learner.num_gpus == 0 and cfg.rollout.num_gpus == 0:
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed would otherwise probe for CUDA
    return env


class WeightGroupMember:
    """The `collective` transport's side of an actor: join the current epoch's group, then
    send (learner rank 0) or receive (rollout workers) bucketed broadcasts."""

    weight_group = None

    def join_weight_group(self, backend: str, addr: str, port: int, rank: int, world: int, epoch: int, timeout_s: float) -> int:
        from danceopd.collective import make_group

        if self.weight_group is not None:
            self.weight_group.close()
        self.weight_group = make_group(backend, addr, port, rank, world, epoch, timeout_s)
        return epoch


class RolloutWorkerActor(WeightGroupMember, RolloutWorker):
    """A rollout worker that pulls the latest weights from the store when it starts, so a new
    or restarted worker never rolls out with initial weights; records its metrics."""

    def __init__(self, cfg, worker_id: str, store):
        super().__init__(cfg, worker_id)
        self.metrics = ActorMetrics("rollout", worker_id)
        self.t_start = time.perf_counter()
        latest = ray.get(store.latest.remote())
        if latest is not None and latest[1] is not None:  # `collective` stores no payload: it broadcasts
            version, (ref,) = latest
            self.set_weights(ray.get(ref), version)

    def rollout(self, order):
        t0, nfe0 = time.perf_counter(), self.stats["nfe"]
        rb = super().rollout(order)
        per_route = collections.Counter(it.route for it in order.items)
        nfe = self.stats["nfe"] - nfe0
        for route, n in per_route.items():
            self.metrics.inc("danceopd_rollout_samples", n, route=route)
            self.metrics.inc("danceopd_rollout_nfes", nfe * n / len(order.items), route=route)
        self.metrics.observe("danceopd_rollout_latency_seconds", time.perf_counter() - t0)
        wall = max(time.perf_counter() - self.t_start, 1e-9)
        self.metrics.set("danceopd_rollout_idle_ratio", max(0.0, 1 - self.stats["busy_s"] / wall))
        return rb

    def pid(self) -> int:
        return os.getpid()

    def receive_weights(self) -> int:
        """Receive a broadcast and apply it (between batches: actor calls never interleave)."""
        from danceopd.collective import BucketBroadcaster
        from danceopd.lora import trainable_state_dict

        version, state = BucketBroadcaster().recv(self.weight_group, trainable_state_dict(self.model))
        return self.set_weights(state, version)


class TeacherActor(Teacher):
    def __init__(self, cfg, teacher_name: str, replica: int = 0):
        super().__init__(cfg, teacher_name, replica)
        self.metrics = ActorMetrics("teacher", self.teacher_id)

    def query(self, state, sigma, cond, cfg_scale: float, route: str = ""):
        t0 = time.perf_counter()
        out = super().query(state, sigma, cond, cfg_scale, route)
        self.metrics.inc("danceopd_teacher_queries", len(out), teacher=self.name, route=route)
        self.metrics.observe("danceopd_teacher_latency_seconds", time.perf_counter() - t0, teacher=self.name)
        return out


class RouterActor(Router):
    def __init__(self, cfg, dataset, pools):
        super().__init__(cfg, dataset, pools)
        self.metrics = ActorMetrics("router", "router-0")

    def route(self, rb):
        routes = collections.Counter(rb.column("route").to_pylist())
        for r in self.routes:  # rows waiting for a teacher answer while this batch is routed
            self.metrics.set("danceopd_router_backlog", routes.get(r, 0), route=r)
        try:
            return super().route(rb)
        finally:
            for r in self.routes:
                self.metrics.set("danceopd_router_backlog", 0, route=r)


class ReplayQueueActor(ReplayQueue):
    def __init__(self, *args):
        super().__init__(*args)
        self.metrics = ActorMetrics("replay", "replay-0")
        self._reported_drops: dict[str, int] = {}
        self._report()

    def _report(self) -> None:
        # Gauges are re-set on every change: Ray's exporter can drop a gauge set only once.
        self.metrics.set("danceopd_replay_capacity", self.capacity)
        self.metrics.set("danceopd_replay_depth", self.depth())
        for reason, n in self.dropped.items():
            new = n - self._reported_drops.get(reason, 0)
            if new:
                self.metrics.inc("danceopd_dropped_samples", new, reason=reason)
                self._reported_drops[reason] = n

    def put(self, rb):
        ok = super().put(rb)
        self._report()
        return ok

    def take(self, n, learner_version):
        out = super().take(n, learner_version)
        self._report()
        for b in out:
            self.metrics.observe("danceopd_policy_lag", learner_version - min(b.column("policy_version").to_pylist()))
        return out

    def purge(self, learner_version):
        depth = super().purge(learner_version)
        self._report()
        return depth

    def drain(self, reason):
        n = super().drain(reason)
        self._report()
        return n


class RayTeacherPool:
    """A teacher's replicas, load-balanced: each query is split evenly across them."""

    def __init__(self, actors: list):
        self.actors = list(actors)

    def query(self, state, sigma, cond, cfg_scale: float, route: str = "") -> np.ndarray:
        parts = [p for p in np.array_split(np.arange(len(state)), len(self.actors)) if len(p)]
        refs = [a.query.remote(state[p], sigma[p], cond[p], cfg_scale, route) for a, p in zip(self.actors, parts)]
        return np.concatenate(ray.get(refs))


@dataclass
class Member:
    name: str
    actor: object
    pg: object = None
    restarts: int = 0
    started: float = field(default_factory=time.time)


class ActorGroup:
    """Named actors of one role, each in its own placement group so the group can grow and
    shrink one member at a time. `make(name, pg)` creates the actor."""

    def __init__(self, role: str, make, bundle: dict, max_restarts: int = 3):
        self.role = role
        self.make = make
        self.bundle = {k: v for k, v in bundle.items() if v}
        self.max_restarts = max_restarts
        self.members: dict[str, Member] = {}
        self.restarts_total = 0
        self._next = 0

    def add(self, name: str | None = None) -> Member:
        name = name or f"{self.role}-{self._next}"
        self._next += 1
        pg = placement_group([self.bundle or {"CPU": 0.01}], strategy="PACK")
        ray.get(pg.ready(), timeout=300)
        m = Member(name, self.make(name, pg), pg)
        self.members[name] = m
        return m

    def remove(self, name: str) -> None:
        m = self.members.pop(name)
        ray.kill(m.actor, no_restart=True)
        remove_placement_group(m.pg)

    def restart(self, name: str) -> Member:
        """Replace a dead member (same name, same placement group) after a backoff."""
        m = self.members[name]
        if m.restarts >= self.max_restarts:
            raise RuntimeError(f"{self.role} {name}: died {m.restarts + 1} times (max_restarts={self.max_restarts})")
        time.sleep(min(0.5 * 2 ** m.restarts, 10.0))
        m.restarts += 1
        self.restarts_total += 1
        m.actor = self.make(name, m.pg)
        m.started = time.time()
        return m

    def probe(self, timeout: float = 10.0) -> list[str]:
        """Names of members that do not answer a ping."""
        refs = {n: m.actor.__ray_ready__.remote() for n, m in self.members.items()}
        dead = []
        for n, r in refs.items():
            try:
                ray.get(r, timeout=timeout)
            except Exception:  # noqa: BLE001 — any failure to answer means unhealthy
                dead.append(n)
        return dead

    def names(self) -> list[str]:
        return list(self.members)

    def shutdown(self) -> None:
        for n in list(self.members):
            self.remove(n)


def _on(pg, bundle: int = 0):
    return PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=bundle)


def rollout_group(cfg, store) -> ActorGroup:
    cls = ray.remote(RolloutWorkerActor)
    env = actor_env(cfg)

    def make(name, pg):
        return cls.options(num_cpus=cfg.rollout.num_cpus, num_gpus=cfg.rollout.num_gpus, scheduling_strategy=_on(pg),
                           runtime_env={"env_vars": env}, name=None).remote(cfg, name, store)

    return ActorGroup("rollout", make, {"CPU": cfg.rollout.num_cpus, "GPU": cfg.rollout.num_gpus}, cfg.rollout.max_restarts)


def teacher_group(cfg, teacher: str) -> ActorGroup:
    t = cfg.teacher(teacher)
    cls = ray.remote(TeacherActor)
    env = actor_env(cfg)

    def make(name, pg):
        replica = int(name.rsplit("-", 1)[1])
        # Teachers are stateless: Ray itself restarts them and retries the query.
        return cls.options(num_cpus=t.num_cpus, num_gpus=t.num_gpus, scheduling_strategy=_on(pg),
                           max_restarts=3, max_task_retries=3, runtime_env={"env_vars": env}).remote(cfg, teacher, replica)

    return ActorGroup(f"teacher:{teacher}", make, {"CPU": t.num_cpus, "GPU": t.num_gpus})


def make_router(cfg, dataset, pools):
    return ray.remote(RouterActor).options(num_cpus=0.1, runtime_env={"env_vars": actor_env(cfg)}).remote(cfg, dataset, pools)


def make_replay(cfg):
    spill = cfg.replay.spill_dir and str(cfg.resolve(cfg.replay.spill_dir))
    return ray.remote(ReplayQueueActor).options(num_cpus=0).remote(cfg.replay.capacity, cfg.sync.max_policy_lag, spill)


def make_weight_store():
    return ray.remote(WeightStore).options(num_cpus=0).remote()


def learner_rank_actor(base):
    class LearnerRankActor(WeightGroupMember, base):
        def broadcast_weights(self, version: int) -> int:
            """Every rank exports (ZeRO-3 gathers); rank 0 broadcasts to the weight group."""
            from danceopd.collective import BucketBroadcaster

            state = self.export_weights()
            return BucketBroadcaster().send(self.weight_group, state, version) if state is not None else 0

        def free_port(self) -> tuple[str, int]:
            return _free_port()

    return LearnerRankActor


def _free_port() -> tuple[str, int]:
    ip = ray.util.get_node_ip_address()
    with socket.socket() as s:
        s.bind(("", 0))
        return ip, s.getsockname()[1]


class LearnerGroup:
    """W DeepSpeed ranks in one placement group, ranks ordered by node so neighbouring ranks
    share a node (NCCL rings stay local where they can)."""

    def __init__(self, cfg):
        from learner.deepspeed_learner import DeepSpeedLearner

        lc = cfg.learner
        self.world_size = lc.world_size
        bundle = {k: v for k, v in {"CPU": lc.num_cpus, "GPU": lc.num_gpus}.items() if v} or {"CPU": 0.01}
        self.pg = placement_group([bundle] * lc.world_size, strategy="PACK")
        ray.get(self.pg.ready(), timeout=600)
        nodes = placement_group_table(self.pg)["bundles_to_node_id"]
        order = sorted(range(lc.world_size), key=lambda b: (nodes[b], b))
        addr, port = ray.get(ray.remote(_free_port).options(num_cpus=0, scheduling_strategy=_on(self.pg, order[0])).remote())
        cls = ray.remote(learner_rank_actor(DeepSpeedLearner))
        env = actor_env(cfg)
        self.ranks = [
            cls.options(num_cpus=lc.num_cpus, num_gpus=lc.num_gpus, scheduling_strategy=_on(self.pg, b),
                        runtime_env={"env_vars": env}).remote(cfg, rank, lc.world_size, addr, port)
            for rank, b in enumerate(order)
        ]
        ray.get([r.get_version.remote() for r in self.ranks])  # wait until every rank is up

    def train_step(self, micro_batches: list) -> list:
        """Rank r gets its own slice of the micro-batches. Returns per-rank result refs."""
        per_rank = len(micro_batches) // self.world_size
        return [r.train_step.remote(micro_batches[i * per_rank:(i + 1) * per_rank]) for i, r in enumerate(self.ranks)]

    def export_weights(self):
        """Ref to rank 0's gathered weights (every rank takes part: ZeRO-3 gathers)."""
        refs = [r.export_weights.remote() for r in self.ranks]
        return refs[0], refs[1:]

    def save(self, folder: str) -> None:
        ray.get([r.save_checkpoint.remote(folder) for r in self.ranks])

    def load(self, folder: str) -> None:
        ray.get([r.load_checkpoint.remote(folder) for r in self.ranks])

    def shutdown(self) -> None:
        try:
            ray.get([r.shutdown.remote() for r in self.ranks], timeout=30)
        except Exception:  # noqa: BLE001 — best effort on the way out
            pass
        for r in self.ranks:
            ray.kill(r)
        remove_placement_group(self.pg)
