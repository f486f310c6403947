"""`--mode ray`: the fleet — rollout workers, teacher pools and the router's scorer — and the
deadlines of its remote calls.

The fleet computes and keeps no ledger: tickets, routes, versions, the replay contents and the
latest weights are the driver's `RolloutPipeline`. A flight here is only the refs of one batch on
its way (its rollout, then its scoring), dropped once the batch is routed or lost.

Concurrency rules this file is built around (tests/test_ray_semantics.py pins each):
- calls from one caller to one sequential actor run in submission order, and a call whose
  argument is an unfinished ObjectRef holds up every call behind it. So a rollout's batch goes
  to the scorer only once its meta says it is done.
- calls to different actors run concurrently: N rollout workers roll out at once.
- the scorer is a threaded actor: batches from the one caller (this loop) are scored
  concurrently, and inside one batch every route's pool is asked before any answer is awaited.
Every remote wait has a deadline (`deadlines.*`, `sync.timeout_s`); an expired one is the
failure of the actor that owes the answer.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import ray

from router.scoring import TeacherFailure
from services.runtime.actors import RayTeacherPool, RolloutWorkerActor, ScorerActor, TeacherActor, actor_env
from services.runtime.events import Applied, Joined, Lost, RolledOut, Routed
from services.runtime.failures import RoleFailure, first_line
from services.runtime.groups import ActorGroup, Member
from services.runtime.placement import check_capacity, placeable, reserved_by_others, role_specs
from services.telemetry.metrics import job_labels

if TYPE_CHECKING:  # annotations only: no import cycle, no cost
    from danceopd.config import Config


@dataclass
class Flight:
    ticket: int
    worker: str
    stage: str  # "rollout" | "route"
    meta: object  # ref of the stage's small answer
    batch: object  # ref of the stage's batch
    t0: float  # when the stage started (a queued rollout starts when the one before it ends)
    incarnation: str  # the rollout worker actor the order went to
    rolled: object = None  # ref of the rollout batch, kept while scoring: a replaced scorer scores it again


def call(ref, who: str, timeout: float):
    """ray.get with a deadline; a timeout or an error is one line naming `who`."""
    try:
        return ray.get(ref, timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        raise RoleFailure(f"{who}: no answer within {timeout:g} s") from None
    except ray.exceptions.RayError as e:
        raise RoleFailure(f"{who}: {first_line(e)}") from None


def died(e: BaseException) -> bool:
    return isinstance(e, (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError))


class RayFleet:
    """Failures are sorted to the actor that owes the answer: a rollout worker, a teacher replica
    or the scorer is replaced (one restart of its budget per death); a worker's tickets are lost
    (re-issued), a scorer's are scored again. `latest()` gives the driver's latest weights
    (version, [ref]) that a new or restarted worker starts with. Every actor's metrics carry the
    job's name and `run_id`."""

    mode = "ray"

    def __init__(self, cfg: Config, latest, run_id: str):
        self.cfg, self.dl = cfg, cfg.deadlines
        self.latest = latest
        labels = job_labels(cfg.job.name, run_id)
        self.specs = specs = role_specs(cfg)
        check_capacity(cfg, [n["Resources"] for n in ray.nodes() if n.get("Alive")])  # before any actor starts
        env = {"env_vars": actor_env(cfg)}
        teacher_cls, scorer_cls, worker_cls = ray.remote(TeacherActor), ray.remote(ScorerActor), ray.remote(RolloutWorkerActor)

        self.teachers: dict[str, ActorGroup] = {}
        for role in (r for r in specs if r.startswith("teacher:")):
            teacher = role.split(":", 1)[1]
            # No Ray-side restarts: a dead replica is this fleet's to replace, so it is counted,
            # blamed on the replica and the batches it owed are re-issued.
            self.teachers[teacher] = ActorGroup(role, specs[role], lambda name, opts, t=teacher: teacher_cls.options(
                **opts, runtime_env=env).remote(cfg, t, int(name.rsplit("-", 1)[1]), labels))
            for _ in range(specs[role].members):
                self.teachers[teacher].add()
        self.scorer = ActorGroup("router", specs["router"], lambda name, opts: scorer_cls.options(
            **opts, runtime_env=env).remote(cfg.routing.routes, cfg.method, {t: self._pool(t) for t in self.teachers}, name, labels))
        self.scorer.add()
        self.rollout = ActorGroup("rollout", specs["rollout"], lambda name, opts: worker_cls.options(
            **opts, runtime_env=env).remote(cfg, name, labels, self.latest()))
        for _ in range(specs["rollout"].members):
            self.rollout.add()
        self.flights: dict[int, Flight] = {}
        self.draining: set[str] = set()
        self._joining: dict[str, object] = {}  # placed new worker -> its get_version ref
        self.gave_up: collections.Counter = collections.Counter()  # role -> pending members removed unplaced
        # Asked last, so every actor starts at once.
        self._versions = {n: call(m.actor.get_version.remote(), f"rollout {n} (starting)", cfg.sync.timeout_s + 600)
                          for n, m in self.rollout.members.items()}
        call(self.scorer.only.get_stats.remote(), "router (starting)", cfg.sync.timeout_s + 600)

    def _pool(self, teacher: str) -> RayTeacherPool:
        g = self.teachers[teacher]
        return RayTeacherPool(teacher, {n: m.actor for n, m in g.members.items()}, self.dl.teacher_s)

    # ---- data path -------------------------------------------------------------------------
    def workers(self) -> list[str]:
        return [n for n in self.rollout.names() if n not in self.draining and n not in self._joining]

    def worker_versions(self) -> dict[str, int]:
        return dict(self._versions)

    def worker_handles(self) -> dict[str, tuple[object, str]]:
        """Live (not draining) workers, (actor, incarnation): the ones a weight push goes to."""
        return {n: (self.rollout.members[n].actor, self.rollout.members[n].incarnation) for n in self.workers()}

    def submit(self, worker: str, order) -> None:
        m = self.rollout.members[worker]
        meta, batch = m.actor.rollout_meta.options(num_returns=2).remote(order, self.latest())
        self.flights[order.ticket] = Flight(order.ticket, worker, "rollout", meta, batch, time.perf_counter(), m.incarnation)

    def poll(self, timeout: float, wake: list = ()) -> list:
        """Advance every flight whose stage finished: rollout -> scoring -> Routed; failures and
        expired deadlines become Lost/Joined events (or one clear error)."""
        events = self._poll_joining()
        by_ref = {f.meta: f for f in self.flights.values()}
        if not by_ref and not wake:
            time.sleep(min(timeout, 0.01))
            return events
        refs = list(by_ref)
        done = ray.wait(refs, num_returns=len(refs), timeout=0)[0] if refs else []
        if not done:  # nothing finished yet: sleep until a stage (or a `wake` ref) does
            ray.wait(refs + list(wake), num_returns=1, timeout=timeout)
            done = ray.wait(refs, num_returns=len(refs), timeout=0)[0] if refs else []
        now = time.perf_counter()
        try:
            metas = dict(zip(done, ray.get(done)))  # one call for every finished stage
        except Exception:  # noqa: BLE001 — one of them failed: sorted ref by ref below
            metas = {}
        for ref in done:
            f = by_ref[ref]
            if self.flights.get(f.ticket) is not f or f.meta != ref:
                continue  # lost with its worker, or re-scored after a scorer restart, earlier in this poll
            if ref in metas:
                meta = metas[ref]
            else:
                try:
                    meta = ray.get(ref)
                except Exception as e:  # noqa: BLE001 — sorted by stage and type below
                    events += self._stage_failed(f, e)
                    continue
            if f.stage == "rollout":
                self._started_next(f.worker, f.ticket, now)
                if meta["applied"] is not None:
                    a = meta["applied"]
                    events.append(Applied(f.worker, a["version"], a["transfer_s"], a["bytes"]))
                f.stage, f.t0, f.rolled = "route", now, f.batch
                f.meta, f.batch = self.scorer.only.route_meta.options(num_returns=2).remote(f.rolled)
                events.append(RolledOut(f.ticket))
            else:
                del self.flights[f.ticket]
                events.append(Routed(f.ticket, f.batch, meta["version"]))
        return events + self._expired(now)

    def _started_next(self, worker: str, after: int, now: float) -> None:
        """The worker's next queued rollout starts now: its deadline counts from here."""
        queued = [f for f in self.flights.values() if f.worker == worker and f.stage == "rollout" and f.ticket != after]
        if queued:
            nxt = min(queued, key=lambda f: f.ticket)
            nxt.t0 = max(nxt.t0, now)

    def _stage_failed(self, f: Flight, e: BaseException) -> list:
        if f.stage == "rollout":
            if died(e):
                return self._worker_failed(f.worker, f"died ({type(e).__name__})", f.incarnation)
            raise RoleFailure(f"rollout {f.worker}: ticket {f.ticket} failed: {first_line(e)}")
        cause = getattr(e, "cause", None)
        if isinstance(cause, TeacherFailure):
            del self.flights[f.ticket]
            member = self.teachers[cause.teacher].members.get(cause.replica)
            if member is not None and member.incarnation == cause.incarnation:
                self._restart_teacher(cause.teacher, cause.replica, cause.cause)  # else: already replaced
            return [Lost(f.ticket, cause.replica, cause.cause)]
        if died(e):
            self._scorer_failed(f"died while scoring ticket {f.ticket} ({type(e).__name__})")
            return []
        raise RoleFailure(f"router: ticket {f.ticket} failed: {first_line(e)}")

    def _expired(self, now: float) -> list:
        events = []
        for f in list(self.flights.values()):
            if self.flights.get(f.ticket) is not f:
                continue
            age = now - f.t0
            if f.stage == "rollout" and age > self.dl.rollout_s:
                events += self._worker_failed(f.worker, f"no batch within deadlines.rollout_s={self.dl.rollout_s:g}",
                                              f.incarnation)
            elif f.stage == "route" and age > self.dl.route_s:
                self._scorer_failed(f"ticket {f.ticket} not scored within deadlines.route_s={self.dl.route_s:g}")
        return events

    def _worker_failed(self, worker: str, cause: str, incarnation: str) -> list:
        """One death, one restart: every rollout the dead incarnation still owed is lost."""
        lost = [t for t, f in self.flights.items() if f.worker == worker and f.stage == "rollout"
                and f.incarnation == incarnation]
        for t in lost:
            del self.flights[t]
        events = [Lost(t, worker, cause) for t in lost]
        m = self.rollout.members.get(worker)
        if m is None or m.incarnation != incarnation:
            return events  # that incarnation was already replaced (or removed)
        if worker in self.draining:
            self.rollout.remove(worker)
            self.draining.discard(worker)
            return events
        print(f"rollout {worker}: {cause}; restarting", flush=True)
        m = self.rollout.restart(worker, cause)  # created with the driver's latest weights
        version = call(m.actor.get_version.remote(), f"rollout {worker} (restarted)", self.cfg.sync.timeout_s)
        self._versions[worker] = version
        return events + [Joined(worker, version)]

    def _restart_teacher(self, teacher: str, replica: str, cause: str = "") -> None:
        print(f"teacher {replica}: {cause or 'failed'}; restarting", flush=True)
        m = self.teachers[teacher].restart(replica, cause)
        # Up before it is asked anything: its start-up must not count against deadlines.teacher_s.
        call(m.actor.get_stats.remote(), f"teacher {replica} (restarted)", self.cfg.sync.timeout_s)
        self._set_pool(teacher, self._pool(teacher))

    def _set_pool(self, teacher: str, pool) -> None:
        try:
            ray.get(self.scorer.only.set_pool.remote(teacher, pool), timeout=self.dl.route_s)
        except Exception as e:  # noqa: BLE001
            if not died(e):
                raise RoleFailure(f"router: set_pool failed: {first_line(e)}") from None
            self._scorer_failed(f"died ({type(e).__name__})")  # the new scorer is built with the current pools

    def _scorer_failed(self, cause: str) -> None:
        """Replace the scorer; it scores again every batch the dead one held (their rollout refs)."""
        print(f"router: {cause}; restarting", flush=True)
        m = self.scorer.restart("router-0", cause)
        now = time.perf_counter()
        for f in self.flights.values():
            if f.stage == "route":
                f.meta, f.batch = m.actor.route_meta.options(num_returns=2).remote(f.rolled)
                f.t0 = now

    # ---- growing the fleet -------------------------------------------------------------------
    def _poll_joining(self) -> list:
        """Pending workers the cluster placed start; placed ones that answered join; ones never
        placed within deadlines.placement_s are removed cleanly (nothing stays reserved)."""
        events = []
        if self.rollout.pending:
            placed, expired = self.rollout.poll_pending(self.dl.placement_s)
            for m in placed:
                self._joining[m.name] = m.actor.get_version.remote()
            for name in expired:
                self.gave_up["rollout"] += 1
                print(f"rollout {name}: not placed within deadlines.placement_s={self.dl.placement_s:g} "
                      "(the cluster lacks the resources); removed", flush=True)
        if self._joining:
            done, _ = ray.wait(list(self._joining.values()), num_returns=len(self._joining), timeout=0)
            for name, ref in list(self._joining.items()):
                if ref in done:
                    del self._joining[name]
                    try:
                        version = ray.get(ref)
                    except Exception as e:  # noqa: BLE001 — a worker that cannot start is removed, not fatal
                        print(f"rollout {name}: failed to start ({first_line(e)}); removed", flush=True)
                        self.rollout.remove(name)
                        continue
                    self._versions[name] = version
                    events.append(Joined(name, version))
        return events

    def pending_counts(self) -> dict[str, int]:
        return {"rollout": len(self.rollout.pending) + len(self._joining)}

    # ---- the fleet ----------------------------------------------------------------------------
    def counts(self) -> dict:
        return {"rollout": len(self.rollout.members) - len(self._joining), "learner": self.cfg.learner.world_size,
                "teacher": sum(len(g.members) for g in self.teachers.values())}

    def teacher_counts(self) -> dict[str, int]:
        return {r.name: len(self.teachers[r.teacher].members) for r in self.cfg.routing.routes}

    def _groups(self) -> dict[str, list[ActorGroup]]:
        return {"rollout": [self.rollout], "teacher": list(self.teachers.values()), "router": [self.scorer]}

    def restarts(self) -> dict:
        return {role: sum(g.restarts_total for g in gs) for role, gs in self._groups().items()}

    def failures(self) -> dict:
        return {role: sum(g.failures_total for g in gs) for role, gs in self._groups().items()}

    def busy_stats(self) -> dict:
        groups = {"rollout": [a for a, _ in self.worker_handles().values()],
                  "teacher": [a for g in self.teachers.values() for a in g.actors()], "router": self.scorer.actors()}
        out = {}
        for role, actors in groups.items():
            try:
                out[role] = ray.get([a.get_stats.remote() for a in actors], timeout=self.cfg.sync.timeout_s)
            except Exception as e:  # noqa: BLE001 — end-of-job statistics are not worth failing the job
                print(f"{role}: statistics unavailable ({first_line(e)})", flush=True)
        return out

    def can_grow(self) -> bool:
        """A rollout worker fits on one node now (free resources per node, not summed) and none is
        still waiting for placement."""
        if self.rollout.pending or self._joining:
            return False
        need = self.specs["rollout"].bundle
        from ray._private.state import available_resources_per_node

        return any(all(free.get(k, 0.0) >= v for k, v in need.items())
                   for free in available_resources_per_node().values())

    def max_rollout_workers(self) -> int:
        """Rollout workers the cluster could ever hold: per node, its total resources less what the
        other roles of this job reserve at most (a bound, not a promise)."""
        return placeable(self.specs["rollout"], [n["Resources"] for n in ray.nodes() if n.get("Alive")],
                         reserved_by_others(self.specs))

    def scale(self, rollout_workers: int | None, teachers: dict) -> list:
        """Growing never waits for the cluster: new workers are pending until placed (`poll`
        reports them Joined) and are removed cleanly if they never are."""
        if rollout_workers is not None:
            active = self.workers()
            waiting = len(self.rollout.pending) + len(self._joining)
            grow = rollout_workers - len(active) - waiting
            if grow > 0:
                for _ in range(grow):
                    m = self.rollout.add_later()
                    if isinstance(m, Member):  # the role reserves nothing: created at once
                        self._joining[m.name] = m.actor.get_version.remote()
            else:
                self.rollout.cancel_pending(-grow)
                for name in active[rollout_workers:]:
                    self.draining.add(name)  # finishes its in-flight batches, then leaves
        for route, count in teachers.items():
            teacher = self.cfg.route(route).teacher
            group = self.teachers[teacher]
            while len(group.members) < count:
                group.add()
            keep = group.names()[:count]
            # The scorer swaps pools between asks, so no ask is in flight on a removed replica
            # once the swap is acknowledged and the replica's queue is empty.
            pool = RayTeacherPool(teacher, {n: group.members[n].actor for n in keep}, self.dl.teacher_s)
            self._set_pool(teacher, pool)
            for name in group.names()[count:]:
                group.remove(name)
        return []

    def retire_drained(self, busy: set[str]) -> None:
        for name in [w for w in self.draining if w not in busy]:
            self.rollout.remove(name)
            self._versions.pop(name, None)
            self.draining.discard(name)

    def shutdown(self) -> None:
        for g in (self.rollout, *self.teachers.values(), self.scorer):
            try:
                g.shutdown()
            except Exception as e:  # noqa: BLE001 — best effort on the way out
                print(f"{g.role}: shutdown: {first_line(e)}", flush=True)


def build_ray(cfg: Config, pipe, run_id: str):
    from services.runtime.ray_learner import RayLearner
    from services.weights.ray_sync import CollectiveSync, ObjectStoreSync

    fleet = RayFleet(cfg, latest=lambda: pipe.weights if pipe.weights and pipe.weights[1] is not None else None,
                     run_id=run_id)
    learner = RayLearner(cfg, fleet.specs["learner"])
    sync_cls = CollectiveSync if cfg.sync.transport == "collective" else ObjectStoreSync
    return fleet, learner, sync_cls(cfg.sync, cfg.rollout, cfg.deadlines, learner, fleet, pipe)
