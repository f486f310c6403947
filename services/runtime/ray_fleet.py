"""`--mode ray`: the fleet — rollout workers, teacher pools and the router's scorer — and the
deadlines of its remote calls.

The fleet computes and keeps no ledger: tickets, routes, versions, the replay contents and the
latest weights are the driver's `RolloutPipeline`. A flight here is only the refs of one batch on
its way (its rollout, then its scoring), dropped once the batch is routed or lost.

Concurrency rules this file is built around (tests/test_ray_semantics.py pins each):
- calls from one caller to one sequential actor run in submission order, and a call whose
  argument is an unfinished ObjectRef holds up every call behind it. So a rollout's batch goes
  to the scorer only once its meta says it is done.
- a call's cost (about 1-2 ms of CPU on each side here) is per call, not per batch: the orders
  the loop issues to one worker together go in one call, and its batches to the scorer in one.
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
from services.runtime.capacity import autoscaled, fits_now, max_members, most_nodes
from services.runtime.events import Applied, Joined, Lost, NonFinite, RolledOut, Routed, Traced
from services.runtime.failures import RoleFailure, first_line
from services.runtime.groups import ActorGroup
from services.runtime.placement import TEACHER_RESTARTS, check_capacity, role_specs
from services.runtime.remote import died
from services.telemetry.metrics import job_labels

if TYPE_CHECKING:  # annotations only: no import cycle, no cost
    from danceopd.config import Config


@dataclass
class Flight:
    ticket: int
    worker: str
    stage: str  # "rollout" | "route"
    meta: object  # ref of the stage's small answers: a list, one per batch of the call
    batch: object  # ref of the stage's batch
    t0: float  # when the stage started (a queued rollout starts when the one before it ends)
    incarnation: str  # the rollout worker actor the order went to
    teachers: frozenset = frozenset()  # the teachers its routes need
    rolled: object = None  # ref of the rollout batch, kept while scoring: a replaced scorer scores it again
    index: int = 0  # this batch's place in its call (its meta in the list)
    size: int = 1  # batches in its call: the call's deadline is size times a batch's


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
        from danceopd.methods import make_method

        # The teachers a batch's scoring asks: its routes' (hard routing) or every route's (mix).
        mix = make_method(cfg.method).routing == "mix"
        self._teacher_of = {r.name: (frozenset(x.teacher for x in cfg.routing.routes) if mix else frozenset([r.teacher]))
                            for r in cfg.routing.routes}
        most = most_nodes(self.autoscaled())
        if most is not None and all(n >= 0 for _, n in most[0]):  # refuse, before any actor starts, what it never holds
            check_capacity(cfg, [res for res, n in most[0] for _ in range(n)])
        env = {"env_vars": actor_env(cfg)}
        teacher_cls, scorer_cls, worker_cls = ray.remote(TeacherActor), ray.remote(ScorerActor), ray.remote(RolloutWorkerActor)

        self.teachers: dict[str, ActorGroup] = {}
        for role in (r for r in specs if r.startswith("teacher:")):
            teacher = role.split(":", 1)[1]
            # No Ray-side restarts: a dead replica is this fleet's to replace, so it is counted,
            # blamed on the replica and the batches it owed are re-issued.
            self.teachers[teacher] = ActorGroup(role, specs[role], lambda name, opts, t=teacher: teacher_cls.options(
                **opts, runtime_env=env).remote(cfg, t, int(name.rsplit("-", 1)[1]), labels))
        self.scorer = ActorGroup("router", specs["router"], lambda name, opts: scorer_cls.options(
            **opts, runtime_env=env).remote(cfg.routing.routes, cfg.method, {t: self._pool(t) for t in self.teachers}, name, labels))
        self.rollout = ActorGroup("rollout", specs["rollout"], lambda name, opts: worker_cls.options(
            **opts, runtime_env=env).remote(cfg, name, labels, self.latest()), probe=lambda actor: actor.get_version.remote())
        self.flights: dict[int, Flight] = {}
        self.draining: set[str] = set()
        self._versions: dict[str, int] = {}
        self.gave_up: collections.Counter = collections.Counter()  # role -> pending members removed unplaced
        # Every member, at the start too, joins through the pending path: one that dies while
        # starting is a restart of its role's budget, and none blocks the loop. The teachers
        # and the scorer are awaited here (nothing is routed without them); workers join as
        # they come up.
        for g in (*self.teachers.values(), self.rollout):
            for _ in range(g.spec.members):
                g.add_later()
        self.scorer.add_later("router-0")
        # A backstop: hung or dying starts exhaust their restart budgets well before it.
        self._start_wait_s = self.dl.placement_s + (TEACHER_RESTARTS + 1) * (self.dl.start_s + 10.0)
        self._start_deadline = time.perf_counter() + self._start_wait_s

    def started(self) -> RayFleet:
        """Wait for the teachers and the scorer the constructor launched (the learner starts
        meanwhile)."""
        while not (self.scorer.members and all(g.members for g in self.teachers.values())):
            self._poll_members()
            if time.perf_counter() > self._start_deadline:
                raise RoleFailure(f"router (starting): the teachers and the router did not start within {self._start_wait_s:g} s")
            time.sleep(0.02)
        return self

    def autoscaled(self) -> bool:
        return autoscaled(self.cfg.autoscale.cluster_autoscaler)

    def max_members(self, role: str) -> tuple[int, str] | None:
        """How many members of `role` the cluster can ever hold with nothing else on it (None:
        no bound known)."""
        return max_members(self.specs[role].bundle, most_nodes(self.autoscaled()))

    def _groups_flat(self) -> list[ActorGroup]:
        return [self.rollout, *self.teachers.values(), self.scorer]

    def _pool(self, teacher: str, names=None) -> RayTeacherPool:
        g = self.teachers[teacher]
        names = g.names() if names is None else names
        return RayTeacherPool(teacher, {n: g.members[n].actor for n in names}, self.dl.teacher_s)

    # ---- data path -------------------------------------------------------------------------
    def workers(self) -> list[str]:
        return [n for n in self.rollout.names() if n not in self.draining]

    def worker_versions(self) -> dict[str, int]:
        return dict(self._versions)

    def worker_handles(self) -> dict[str, tuple[object, str]]:
        """Live (not draining) workers, (actor, incarnation): the ones a weight push goes to."""
        return {n: (self.rollout.members[n].actor, self.rollout.members[n].incarnation) for n in self.workers()}

    def submit(self, worker: str, orders: list) -> None:
        m = self.rollout.members[worker]
        meta, *batches = m.actor.rollout_meta.options(num_returns=1 + len(orders)).remote(orders, self.latest())
        now = time.perf_counter()
        for i, (order, batch) in enumerate(zip(orders, batches)):
            teachers = frozenset().union(*(self._teacher_of[it.route] for it in order.items))
            self.flights[order.ticket] = Flight(order.ticket, worker, "rollout", meta, batch, now, m.incarnation,
                                                teachers, index=i, size=len(orders))

    def poll(self, timeout: float, wake: list = ()) -> list:
        """Advance every flight whose stage finished: rollout -> scoring -> Routed; failures and
        expired deadlines become Lost/Joined events (or one clear error)."""
        events = self._poll_members()
        by_ref: dict = {}  # a call's meta ref -> its flights
        for f in self.flights.values():
            if f.meta is not None:
                by_ref.setdefault(f.meta, []).append(f)
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
            current = [f for f in by_ref[ref] if self._on_call(f, ref)]
            if ref in metas:
                answers = metas[ref]
            else:
                try:
                    answers = ray.get(ref)
                except Exception as e:  # noqa: BLE001 — sorted by stage and type below
                    for f in current:
                        if self._on_call(f, ref):  # the first failure may cost the rest (a dead worker or scorer)
                            events += self._stage_failed(f, e)
                    continue
            rolled = []
            for f in current:
                meta = answers[f.index]
                if f.stage == "rollout":
                    if meta["applied"] is not None:
                        a = meta["applied"]
                        events.append(Applied(f.worker, a["version"], a["transfer_s"], a["bytes"]))
                    f.stage, f.rolled = "route", f.batch
                    rolled.append(f)
                    events.append(RolledOut(f.ticket))
                    if meta.get("traces"):
                        events.append(Traced(meta["traces"]))
                else:
                    del self.flights[f.ticket]
                    bad = meta.get("nonfinite")  # NaN/Inf in a teacher answer: no batch, the loop drops it
                    events.append(NonFinite(f.ticket, *bad) if bad else Routed(f.ticket, f.batch, meta["version"]))
            if rolled:
                self._started_next(rolled[0].worker, ref, now)
                self._route(rolled, now)
        return events + self._expired(now)

    def _on_call(self, f: Flight, ref) -> bool:
        """`f` still waits on the call of `ref`: not lost with its worker, nor parked or re-scored
        after a scorer restart, earlier in this poll."""
        return self.flights.get(f.ticket) is f and f.meta == ref

    def _route(self, flights: list[Flight], now: float) -> None:
        """Send rolled-out batches (one call's) to the scorer in one call, or park them (no refs)
        while the scorer or one of their teachers has no live member: a lost node's replacements
        are still pending."""
        teachers = frozenset().union(*(f.teachers for f in flights))
        if self.scorer.members and all(self.teachers[t].members for t in teachers):
            meta, *batches = self.scorer.only.route_meta.options(num_returns=1 + len(flights)).remote(
                *[f.rolled for f in flights])
            for i, (f, batch) in enumerate(zip(flights, batches)):
                f.meta, f.batch, f.index, f.size = meta, batch, i, len(flights)
        else:
            for f in flights:
                f.meta = f.batch = None
        for f in flights:
            f.t0 = now

    def _route_parked(self) -> None:
        now = time.perf_counter()
        for f in self.flights.values():
            if f.stage == "route" and f.meta is None:
                self._route([f], now)

    def _started_next(self, worker: str, after, now: float) -> None:
        """The worker's next queued call (after the one whose meta ref is `after`) starts now:
        its deadline counts from here."""
        queued = [f for f in self.flights.values() if f.worker == worker and f.stage == "rollout" and f.meta != after]
        if queued:
            nxt = min(queued, key=lambda f: f.ticket).meta
            for f in queued:
                if f.meta == nxt:
                    f.t0 = max(f.t0, now)

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
                self._teacher_failed(cause.teacher, cause.replica, cause.cause)  # else: already replaced
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
            if f.stage == "rollout" and age > self.dl.rollout_s * f.size:
                per = f" ({f.size} in the call)" if f.size > 1 else ""
                events += self._worker_failed(f.worker, f"no batch within deadlines.rollout_s={self.dl.rollout_s:g}{per}",
                                              f.incarnation)
            elif f.stage == "route" and f.meta is not None and age > self.dl.route_s * f.size:
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
        self.rollout.restart_later(worker, cause)  # created with the driver's latest weights; joins when up
        self._versions.pop(worker, None)
        return events

    def _teacher_failed(self, teacher: str, replica: str, cause: str = "") -> None:
        print(f"teacher {replica}: {cause or 'failed'}; restarting", flush=True)
        self.teachers[teacher].restart_later(replica, cause)
        self._set_pool(teacher)  # the live replicas; the replacement is added once it answers

    def _set_pool(self, teacher: str, names=None) -> None:
        if not self.scorer.members:
            return  # the scorer being replaced is built with the current pools
        try:
            ray.get(self.scorer.only.set_pool.remote(teacher, self._pool(teacher, names)), timeout=self.dl.route_s)
        except Exception as e:  # noqa: BLE001
            if not died(e):
                raise RoleFailure(f"router: set_pool failed: {first_line(e)}") from None
            self._scorer_failed(f"died ({type(e).__name__})")

    def _scorer_failed(self, cause: str) -> None:
        """Replace the scorer; once the new one answers it scores again every batch the dead one
        held (their rollout refs): until then they are parked."""
        print(f"router: {cause}; restarting", flush=True)
        self.scorer.restart_later("router-0", cause)
        for f in self.flights.values():
            if f.stage == "route":
                f.meta = f.batch = None

    # ---- growing the fleet -------------------------------------------------------------------
    def _poll_members(self) -> list:
        """Pending members the cluster placed start; started ones that answered join (a worker
        as Joined, a teacher replica into its pool, the scorer takes the parked batches); one that
        died or failed while starting is restarted within its budget; one never placed within
        deadlines.placement_s is removed cleanly (nothing stays reserved)."""
        events, joined_any = [], False
        for g in self._groups_flat():
            if not g.pending:
                continue
            joined, failed, expired = g.poll_pending(self.dl.placement_s, self.dl.start_s)
            for name, e in failed:
                cause = f"died while starting ({type(e).__name__})" if died(e) else f"failed to start ({first_line(e)})"
                print(f"{g.role} {name}: {cause}; restarting", flush=True)
                g.restart_later(name, cause)
            for name in expired:
                self.gave_up[g.role] += 1
                print(f"{g.role} {name}: not placed within deadlines.placement_s={self.dl.placement_s:g} "
                      "(the cluster lacks the resources); removed", flush=True)
            if g is self.rollout:
                latest = self.latest()
                for m, version in joined:
                    # `object_store`: its next order carries the latest weights, applied first.
                    version = max(version, latest[0]) if latest else version
                    self._versions[m.name] = version
                    events.append(Joined(m.name, version))
            elif joined:  # a teacher replica into its pool; a new scorer gets every pool as it is now
                for teacher in (self.teachers if g is self.scorer else [g.role.split(":", 1)[1]]):
                    self._set_pool(teacher)
            joined_any |= bool(joined)
            if not g.members and not g.pending:
                raise RoleFailure(f"{g.role}: no member left (the last was not placed within "
                                  f"deadlines.placement_s={self.dl.placement_s:g})")
        if joined_any:
            self._route_parked()
        return events

    def pending_counts(self) -> dict[str, int]:
        return {"rollout": len(self.rollout.pending), "teacher": sum(len(g.pending) for g in self.teachers.values())}

    # ---- the fleet ----------------------------------------------------------------------------
    def counts(self) -> dict:
        return {"rollout": len(self.rollout.members), "learner": self.cfg.learner.world_size,
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
        if self.rollout.pending:
            return False
        limit = self.max_members("rollout")
        if limit is not None and len(self.rollout.members) >= limit[0]:
            return False
        if self.autoscaled():
            return True  # a pending member is the autoscaler's cue to add a node
        return fits_now(self.specs["rollout"].bundle)

    def scale(self, rollout_workers: int | None, teachers: dict) -> list:
        """Growing never waits for the cluster: new workers are pending until placed (`poll`
        reports them Joined) and are removed cleanly if they never are."""
        if rollout_workers is not None:
            active = self.workers()
            grow = rollout_workers - len(active) - len(self.rollout.pending)
            if grow > 0:
                for _ in range(grow):
                    self.rollout.add_later()
            else:
                cancel = min(-grow, len(self.rollout.pending))
                self.rollout.cancel_pending(cancel)
                for name in active[rollout_workers:]:
                    self.draining.add(name)  # finishes its in-flight batches, then leaves
        for route, count in teachers.items():
            group = self.teachers[self.cfg.route(route).teacher]
            grow = count - len(group.members) - len(group.pending)
            for _ in range(grow):
                group.add_later()  # joins its pool once it answers: the loop never waits for it
            if grow < 0:
                group.cancel_pending(min(-grow, len(group.pending)))
            keep = group.names()[:count]
            if len(keep) < len(group.members):
                # The scorer swaps pools between asks, so no ask is in flight on a removed replica
                # once the swap is acknowledged and the replica's queue is empty.
                self._set_pool(self.cfg.route(route).teacher, keep)
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

