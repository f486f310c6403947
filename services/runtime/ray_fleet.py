"""`--mode ray`: the fleet of actor groups, the DeepSpeed learner group, and their deadlines.

Concurrency rules this file is built around (tests/test_ray_semantics.py pins each):
- calls from one caller to one sequential actor run in submission order, and a call whose
  argument is an unfinished ObjectRef holds up every call behind it. So the loop never hands an
  actor an unfinished ref on the data path: a rollout's batch goes to the router only once its
  meta says it is done, and a routed batch goes to the replay queue only in ticket order, done.
- calls to different actors run concurrently: N rollout workers roll out at once.
- the router is a threaded actor: batches from the one caller (this loop) are routed
  concurrently, and inside one batch every route's pool is asked before any answer is awaited.
Every remote wait has a deadline (`deadlines.*`, `sync.timeout_s`); an expired one is the
failure of the actor that owes the answer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import ray

from danceopd.dataset import Dataset
from router.router import TeacherFailure
from services.runtime.actors import (
    RayTeacherPool,
    ReplayQueueActor,
    RolloutWorkerActor,
    RouterActor,
    TeacherActor,
    actor_env,
    free_port,
    learner_rank_actor,
)
from services.runtime.events import Joined, Lost, RolledOut, Routed
from services.runtime.groups import ActorGroup, on
from services.runtime.placement import role_specs
from services.weights.store import WeightStore


@dataclass
class Flight:
    ticket: int
    worker: str
    stage: str  # "rollout" | "route"
    meta: object  # ref of the stage's small answer
    batch: object  # ref of the stage's batch
    t0: float  # when the stage started (a queued rollout starts when the one before it ends)


def _first_line(e: BaseException) -> str:
    cause = getattr(e, "cause", None) or e
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"


class RayFleet:
    mode = "ray"

    def __init__(self, cfg):
        self.cfg = cfg
        self.dl = cfg.deadlines
        dataset = Dataset.load(cfg.resolve(cfg.data.path))
        dataset.check_routes(cfg.routing.routes)
        self.specs = specs = role_specs(cfg)
        env = {"env_vars": actor_env(cfg)}

        self.store = ActorGroup("weight_store", specs["weight_store"],
                                lambda name, opts: ray.remote(WeightStore).options(**opts).remote())
        self.store.add()
        self.teachers: dict[str, ActorGroup] = {}
        for role in (r for r in specs if r.startswith("teacher:")):
            name = role.split(":", 1)[1]
            # Teachers are stateless: Ray itself restarts a dead one and retries its query.
            self.teachers[name] = ActorGroup(role, specs[role], self._teacher_maker(name, env))
            for _ in range(specs[role].members):
                self.teachers[name].add()
        router_cls = ray.remote(RouterActor)
        self.router = ActorGroup("router", specs["router"], lambda name, opts: router_cls.options(
            **opts, runtime_env=env).remote(cfg, dataset, {t: self._pool(t) for t in self.teachers}))
        self.router.add()
        replay_cls = ray.remote(ReplayQueueActor)
        spill = cfg.replay.spill_dir and str(cfg.resolve(cfg.replay.spill_dir))
        self.replay = ActorGroup("replay", specs["replay"], lambda name, opts: replay_cls.options(**opts).remote(
            cfg.replay.capacity, cfg.sync.max_policy_lag, spill, cfg.routing.granularity == "update"))
        self.replay.add()
        worker_cls = ray.remote(RolloutWorkerActor)
        store = self.store.only
        self.rollout = ActorGroup("rollout", specs["rollout"], lambda name, opts: worker_cls.options(
            **opts, runtime_env=env).remote(cfg, name, store))
        for _ in range(specs["rollout"].members):
            self.rollout.add()
        self.flights: dict[int, Flight] = {}
        self.draining: set[str] = set()
        self._versions = dict(zip(self.rollout.names(), ray.get([a.get_version.remote() for a in self.rollout.actors()])))

    def _teacher_maker(self, teacher: str, env: dict):
        cls = ray.remote(TeacherActor)

        def make(name, opts):
            replica = int(name.rsplit("-", 1)[1])
            return cls.options(**opts, max_restarts=3, max_task_retries=3, runtime_env=env).remote(self.cfg, teacher, replica)
        return make

    def _pool(self, teacher: str) -> RayTeacherPool:
        g = self.teachers[teacher]
        return RayTeacherPool(teacher, {n: m.actor for n, m in g.members.items()}, self.dl.teacher_s)

    # ---- data path -------------------------------------------------------------------------
    def workers(self) -> list[str]:
        return [n for n in self.rollout.names() if n not in self.draining]

    def worker_versions(self) -> dict[str, int]:
        return dict(self._versions)

    def worker_actors(self) -> dict[str, object]:
        """Live (not draining) workers: the ones a weight push goes to."""
        return {n: self.rollout.members[n].actor for n in self.workers()}

    def next_orders(self, n: int, owed: list[str] = ()) -> list:
        return ray.get(self.router.only.next_orders.remote(n, self.cfg.rollout.batch_size, list(owed)), timeout=self.dl.route_s)

    def submit(self, worker: str, order) -> None:
        actor = self.rollout.members[worker].actor
        meta, batch = actor.rollout_meta.options(num_returns=2).remote(order)
        self.flights[order.ticket] = Flight(order.ticket, worker, "rollout", meta, batch, time.perf_counter())

    def poll(self, timeout: float, learner=None) -> list:
        """Advance every flight whose stage finished: rollout -> route -> Routed; failures and
        expired deadlines become Lost/Joined events (or one clear error)."""
        by_ref = {f.meta: f for f in self.flights.values()}
        extra = learner.pending() if learner is not None else []
        if not by_ref and not extra:
            time.sleep(min(timeout, 0.01))
            return []
        ray.wait(list(by_ref) + extra, num_returns=1, timeout=timeout)
        if not by_ref:
            return []
        done, _ = ray.wait(list(by_ref), num_returns=len(by_ref), timeout=0)
        events, now = [], time.perf_counter()
        for ref in done:
            f = by_ref[ref]
            if f.ticket not in self.flights:
                continue  # lost together with its worker earlier in this poll
            try:
                ray.get(ref)
            except Exception as e:  # noqa: BLE001 — sorted by stage and type below
                events += self._stage_failed(f, e)
                continue
            if f.stage == "rollout":
                self._started_next(f.worker, f.ticket, now)
                f.stage, f.t0 = "route", now
                f.meta, f.batch = self.router.only.route_meta.options(num_returns=2).remote(f.batch)
                events.append(RolledOut(f.ticket))
            else:
                del self.flights[f.ticket]
                events.append(Routed(f.ticket, f.batch))
        return events + self._expired(now)

    def _started_next(self, worker: str, after: int, now: float) -> None:
        """The worker's next queued rollout starts now: its deadline counts from here."""
        queued = [f for f in self.flights.values() if f.worker == worker and f.stage == "rollout" and f.ticket != after]
        if queued:
            nxt = min(queued, key=lambda f: f.ticket)
            nxt.t0 = max(nxt.t0, now)

    def _stage_failed(self, f: Flight, e: BaseException) -> list:
        if f.stage == "rollout":
            if isinstance(e, ray.exceptions.RayActorError):
                return self._worker_failed(f.worker, f"died ({type(e).__name__})")
            raise RuntimeError(f"rollout worker {f.worker}: ticket {f.ticket} failed: {_first_line(e)}") from None
        cause = getattr(e, "cause", None)
        if isinstance(cause, TeacherFailure):
            del self.flights[f.ticket]
            member = self.teachers[cause.teacher].members.get(cause.replica)
            if member is not None and member.actor._actor_id.hex() == cause.incarnation:
                self._restart_teacher(cause.teacher, cause.replica)  # else: already replaced
            return [Lost(f.ticket, cause.replica, cause.cause)]
        if isinstance(e, ray.exceptions.RayActorError):
            raise RuntimeError(f"router: died while routing ticket {f.ticket} ({type(e).__name__})") from None
        raise RuntimeError(f"router: ticket {f.ticket} failed: {_first_line(e)}") from None

    def _expired(self, now: float) -> list:
        events = []
        for f in list(self.flights.values()):
            if f.ticket not in self.flights:
                continue
            age = now - f.t0
            if f.stage == "rollout" and age > self.dl.rollout_s:
                events += self._worker_failed(f.worker, f"no batch within deadlines.rollout_s={self.dl.rollout_s:g}")
            elif f.stage == "route" and age > self.dl.route_s:
                raise TimeoutError(f"router: ticket {f.ticket} not routed within deadlines.route_s={self.dl.route_s:g}")
        return events

    def _worker_failed(self, worker: str, cause: str) -> list:
        """One failure, one restart: every rollout of the worker still owed is lost."""
        lost = [t for t, f in self.flights.items() if f.worker == worker and f.stage == "rollout"]
        for t in lost:
            del self.flights[t]
        print(f"rollout worker {worker}: {cause}; restarting", flush=True)
        if worker in self.draining:
            self.rollout.remove(worker)
            self.draining.discard(worker)
            return [Lost(t, worker, cause) for t in lost]
        m = self.rollout.restart(worker)
        version = ray.get(m.actor.get_version.remote(), timeout=self.cfg.sync.timeout_s)  # up, latest weights pulled
        self._versions[worker] = version
        return [Lost(t, worker, cause) for t in lost] + [Joined(worker, version)]

    def _restart_teacher(self, teacher: str, replica: str) -> None:
        print(f"teacher {replica}: failed; restarting", flush=True)
        self.teachers[teacher].restart(replica)
        ray.get(self.router.only.set_pool.remote(teacher, self._pool(teacher)), timeout=self.dl.route_s)

    # ---- replay queue -----------------------------------------------------------------------
    def replay_put(self, handles: list) -> None:
        # No round trip: calls from one caller run in order, so the next take sees them.
        for ref in handles:
            self.replay.only.put.remote(ref)

    def replay_take(self, n: int, version: int):
        shards = self.cfg.learner.world_size
        refs = self.replay.only.take_sharded.options(num_returns=shards + 1).remote(n, version, shards)
        return refs[1:], self._get(refs[0], "replay queue")

    def replay_purge(self, version: int) -> dict:
        return self._get(self.replay.only.purge.remote(version), "replay queue")

    def replay_drain(self) -> dict[int, int]:
        return self._get(self.replay.only.drain.remote("unconsumed"), "replay queue")

    def replay_stats(self) -> dict:
        return self._get(self.replay.only.stats.remote(), "replay queue")

    def _get(self, ref, who: str):
        try:
            return ray.get(ref, timeout=self.dl.replay_s)
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError(f"{who}: no answer within deadlines.replay_s={self.dl.replay_s:g}") from None

    # ---- router state (checkpoints) -------------------------------------------------------
    def router_state_before(self, ticket: int) -> dict:
        return ray.get(self.router.only.state_before.remote(ticket), timeout=self.dl.route_s)

    def router_forget_before(self, ticket: int) -> None:
        self.router.only.forget_before.remote(ticket)

    def router_load(self, state: dict) -> None:
        ray.get(self.router.only.load_state_dict.remote(state), timeout=self.dl.route_s)

    # ---- the fleet ----------------------------------------------------------------------------
    def counts(self) -> dict:
        return {"rollout": len(self.rollout.members), "learner": self.cfg.learner.world_size,
                "teacher": sum(len(g.members) for g in self.teachers.values())}

    def teacher_counts(self) -> dict[str, int]:
        return {r.name: len(self.teachers[r.teacher].members) for r in self.cfg.routing.routes}

    def restarts(self) -> dict:
        return {"rollout": self.rollout.restarts_total,
                "teacher": sum(g.restarts_total for g in self.teachers.values())}

    def busy_stats(self) -> dict:
        groups = {"rollout": self.rollout.actors(), "teacher": [a for g in self.teachers.values() for a in g.actors()],
                  "router": self.router.actors()}
        return {role: ray.get([a.get_stats.remote() for a in actors]) for role, actors in groups.items()}

    def can_grow(self) -> bool:
        spec = self.specs["rollout"]
        free = ray.available_resources()
        return free.get("CPU", 0) >= spec.num_cpus and free.get("GPU", 0) >= spec.num_gpus

    def scale(self, rollout_workers: int | None, teachers: dict) -> list:
        joined = []
        if rollout_workers is not None:
            active = self.workers()
            new = [self.rollout.add() for _ in range(rollout_workers - len(active))]
            for m, v in zip(new, ray.get([m.actor.get_version.remote() for m in new])):
                self._versions[m.name] = v
                joined.append(Joined(m.name, v))
            for name in active[rollout_workers:]:
                self.draining.add(name)  # finishes its in-flight batches, then leaves
        for route, count in teachers.items():
            teacher = self.cfg.route(route).teacher
            group = self.teachers[teacher]
            while len(group.members) < count:
                group.add()
            keep = group.names()[:count]
            # The router swaps pools between asks, so no ask is in flight on a removed replica
            # once the swap is acknowledged and the replica's queue is empty.
            pool = RayTeacherPool(teacher, {n: group.members[n].actor for n in keep}, self.dl.teacher_s)
            ray.get(self.router.only.set_pool.remote(teacher, pool), timeout=self.dl.route_s)
            for name in group.names()[count:]:
                group.remove(name)
        return joined

    def retire_drained(self, busy: set[str]) -> None:
        for name in [w for w in self.draining if w not in busy]:
            self.rollout.remove(name)
            self._versions.pop(name, None)
            self.draining.discard(name)

    def shutdown(self) -> None:
        for g in (self.rollout, *self.teachers.values(), self.router, self.replay, self.store):
            g.shutdown()


class RayLearner:
    """W DeepSpeed ranks (one gang placement group). A step runs while the loop goes on."""

    kind = "deepspeed"

    def __init__(self, cfg, spec):
        from learner.deepspeed_learner import DeepSpeedLearner

        self.cfg = cfg
        env = {"env_vars": actor_env(cfg)}
        cls = ray.remote(learner_rank_actor(DeepSpeedLearner))
        self._addr = None
        self.group = ActorGroup("learner", spec, lambda name, opts: cls.options(**opts, runtime_env=env).remote(
            cfg, int(name.rsplit("-", 1)[1]), cfg.learner.world_size, *self._addr))
        # Rank 0 listens on a free port of its own node: probe it inside rank 0's bundle.
        pg, first = self.group.reserve_gang(cfg.learner.world_size)
        self._addr = ray.get(ray.remote(free_port).options(num_cpus=0, scheduling_strategy=on(pg, first)).remote())
        self.group.add_gang()
        self.ranks = self.group.actors()
        ray.get([r.get_version.remote() for r in self.ranks])  # wait until every rank is up
        self._refs, self._t0 = None, 0.0

    @property
    def busy(self) -> bool:
        return self._refs is not None

    def pending(self) -> list:
        return list(self._refs or [])

    def start_step(self, take) -> None:
        shards, _ = take
        self._t0 = time.perf_counter()
        self._refs = [r.train_step.remote(s) for r, s in zip(self.ranks, shards)]

    def poll_step(self, deadline_s: float) -> dict | None:
        done, _ = ray.wait(self._refs, num_returns=len(self._refs), timeout=0)
        if len(done) < len(self._refs):
            if time.perf_counter() - self._t0 > deadline_s:
                raise TimeoutError(f"learner: step not done within deadlines.learner_step_s={deadline_s:g}")
            return None
        try:
            results = ray.get(self._refs)
        except ray.exceptions.RayError as e:
            raise RuntimeError(f"learner: step failed: {_first_line(e)}") from None
        self._refs = None
        return results[0]

    def export_ref(self):
        """Ref to rank 0's gathered weights, and the other ranks' refs (ZeRO-3 gathers on all)."""
        refs = [r.export_weights.remote() for r in self.ranks]
        return refs[0], refs[1:]

    def export(self) -> dict:
        ref, others = self.export_ref()
        ray.get(others)
        return ray.get(ref)

    def save(self, folder) -> None:
        ray.get([r.save_checkpoint.remote(str(folder)) for r in self.ranks])

    def load(self, folder, weights: dict) -> None:
        ray.get([r.load_checkpoint.remote(str(folder)) for r in self.ranks])

    def load_weights(self, weights: dict) -> None:
        ref = ray.put(weights)
        ray.get([r.load_weights.remote(ref) for r in self.ranks])

    def set_version(self, version: int) -> None:
        ray.get([r.set_version.remote(version) for r in self.ranks])

    def shutdown(self) -> None:
        try:
            ray.get([r.shutdown.remote() for r in self.ranks], timeout=30)
        except Exception:  # noqa: BLE001 — best effort on the way out
            pass
        self.group.shutdown()


def build_ray(cfg):
    from services.weights.ray_sync import CollectiveSync, ObjectStoreSync

    fleet = RayFleet(cfg)
    learner = RayLearner(cfg, fleet.specs["learner"])
    sync_cls = CollectiveSync if cfg.sync.transport == "collective" else ObjectStoreSync
    return fleet, learner, lambda pipeline: sync_cls(cfg, learner, fleet, pipeline)
