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

import collections
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
from services.runtime.failures import RoleFailure, first_line
from services.runtime.groups import ActorGroup, Member, on
from services.runtime.placement import check_capacity, role_specs
from services.weights.store import WeightStore


@dataclass
class Flight:
    ticket: int
    worker: str
    stage: str  # "rollout" | "route"
    meta: object  # ref of the stage's small answer
    batch: object  # ref of the stage's batch
    t0: float  # when the stage started (a queued rollout starts when the one before it ends)
    incarnation: str  # the rollout worker actor the order went to
    rolled: object = None  # ref of the rollout batch, kept while routing: a restarted router re-routes it


def call(ref, who: str, timeout: float):
    """ray.get with a deadline; a timeout or an error is one line naming `who`."""
    try:
        return ray.get(ref, timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        raise RoleFailure(f"{who}: no answer within {timeout:g} s") from None
    except ray.exceptions.RayError as e:
        raise RoleFailure(f"{who}: {first_line(e)}") from None


def _died(e: BaseException) -> bool:
    return isinstance(e, (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError))


class RayFleet:
    """Every role but the learner. Failures are sorted to the actor that owes the answer:
    rollout workers and teacher replicas are restarted and their tickets lost (re-issued); the
    router, replay queue and weight store are rebuilt in place from what this controller holds
    (router state after the last hand-out, the refs of queued batches, the latest weights), so
    their death loses nothing. Every restart draws on the member's budget, one per death."""

    mode = "ray"

    def __init__(self, cfg):
        self.cfg = cfg
        self.dl = cfg.deadlines
        dataset = Dataset.load(cfg.resolve(cfg.data.path))
        dataset.check_routes(cfg.routing.routes)
        self.specs = specs = role_specs(cfg)
        check_capacity(cfg, [n["Resources"] for n in ray.nodes() if n.get("Alive")])  # before any actor starts
        env = {"env_vars": actor_env(cfg)}

        self.store = ActorGroup("weight_store", specs["weight_store"],
                                lambda name, opts: ray.remote(WeightStore).options(**opts).remote())
        self.store.add()
        self._store_latest = None  # (version, payload, nbytes) of the last put: a new store gets it
        self.teachers: dict[str, ActorGroup] = {}
        for role in (r for r in specs if r.startswith("teacher:")):
            name = role.split(":", 1)[1]
            self.teachers[name] = ActorGroup(role, specs[role], self._teacher_maker(name, env))
            for _ in range(specs[role].members):
                self.teachers[name].add()
        router_cls = ray.remote(RouterActor)
        self.router = ActorGroup("router", specs["router"], lambda name, opts: router_cls.options(
            **opts, runtime_env=env).remote(cfg, dataset, {t: self._pool(t) for t in self.teachers}))
        self.router.add()
        self._before: dict[int, dict] = {}  # ticket -> router state just before it was handed out
        replay_cls = ray.remote(ReplayQueueActor)
        spill = cfg.replay.spill_dir and str(cfg.resolve(cfg.replay.spill_dir))
        self.replay = ActorGroup("replay", specs["replay"], lambda name, opts: replay_cls.options(**opts).remote(
            cfg.replay.capacity, cfg.sync.max_policy_lag, spill, cfg.routing.granularity == "update"))
        self.replay.add()
        self._routed: dict[str, int] = {}  # routed batch ref (hex) -> ticket, until it is put
        self._in_replay: dict[int, object] = {}  # ticket -> ref of a batch in the replay queue
        self._puts: list = []  # put acknowledgements not yet checked
        worker_cls = ray.remote(RolloutWorkerActor)
        self.rollout = ActorGroup("rollout", specs["rollout"], lambda name, opts: worker_cls.options(
            **opts, runtime_env=env).remote(cfg, name, self.store.only))
        for _ in range(specs["rollout"].members):
            self.rollout.add()
        self.flights: dict[int, Flight] = {}
        self.draining: set[str] = set()
        self._joining: dict[str, object] = {}  # placed new worker -> its get_version ref
        self._deferred: list = []  # events from failures found outside poll (weight-sync acks)
        self.gave_up: collections.Counter = collections.Counter()  # role -> pending members removed unplaced
        # Asked last, so every actor starts at once.
        self._router_state = call(self.router.only.state_dict.remote(), "router", self.dl.route_s)
        self._versions = {n: call(m.actor.get_version.remote(), f"rollout {n} (starting)", self.cfg.sync.timeout_s + 600)
                          for n, m in self.rollout.members.items()}

    def _teacher_maker(self, teacher: str, env: dict):
        cls = ray.remote(TeacherActor)

        def make(name, opts):
            replica = int(name.rsplit("-", 1)[1])
            # No Ray-side restarts: a dead replica is this fleet's to replace, so it is counted,
            # blamed on the replica and the batches it owed are re-issued.
            return cls.options(**opts, runtime_env=env).remote(self.cfg, teacher, replica)
        return make

    def _pool(self, teacher: str) -> RayTeacherPool:
        g = self.teachers[teacher]
        return RayTeacherPool(teacher, {n: m.actor for n, m in g.members.items()}, self.dl.teacher_s)

    def _until_answered(self, who: str, deadline: str, timeout: float, attempt, rebuild):
        """`attempt(timeout)`: one remote call of a singleton, waited on. A dead singleton is
        rebuilt (`rebuild(cause)`) and the call tried again until its restart budget ends; a
        timeout or any other error is one line naming `who`."""
        while True:
            try:
                return attempt(timeout)
            except ray.exceptions.GetTimeoutError:
                raise RoleFailure(f"{who}: no answer within {deadline}={timeout:g}") from None
            except RoleFailure:
                raise
            except Exception as e:  # noqa: BLE001 — sorted: a death is rebuilt, anything else is one line
                if not _died(e):
                    raise RoleFailure(f"{who}: {first_line(e)}") from None
                rebuild(f"died ({type(e).__name__})")

    # ---- data path -------------------------------------------------------------------------
    def workers(self) -> list[str]:
        return [n for n in self.rollout.names() if n not in self.draining and n not in self._joining]

    def worker_versions(self) -> dict[str, int]:
        return dict(self._versions)

    def worker_actors(self) -> dict[str, object]:
        """Live (not draining) workers: the ones a weight push goes to."""
        return {n: self.rollout.members[n].actor for n in self.workers()}

    def next_orders(self, n: int, owed: list[str] = ()) -> list:
        def attempt(timeout):
            return ray.get(self.router.only.next_orders_with_state.remote(n, self.cfg.rollout.batch_size, list(owed)),
                           timeout=timeout)

        orders, before, after = self._until_answered("router", "deadlines.route_s", self.dl.route_s, attempt,
                                                     self._router_failed)
        self._before.update({o.ticket: b for o, b in zip(orders, before)})
        self._router_state = after
        return orders

    def submit(self, worker: str, order) -> None:
        m = self.rollout.members[worker]
        meta, batch = m.actor.rollout_meta.options(num_returns=2).remote(order)
        self.flights[order.ticket] = Flight(order.ticket, worker, "rollout", meta, batch, time.perf_counter(), m.incarnation)

    def poll(self, timeout: float, learner=None) -> list:
        """Advance every flight whose stage finished: rollout -> route -> Routed; failures and
        expired deadlines become Lost/Joined events (or one clear error)."""
        events, self._deferred = self._deferred + self._poll_joining(), []
        by_ref = {f.meta: f for f in self.flights.values()}
        extra = learner.pending() if learner is not None else []
        if not by_ref and not extra:
            time.sleep(min(timeout, 0.01))
            return events
        ray.wait(list(by_ref) + extra, num_returns=1, timeout=timeout)
        if not by_ref:
            return events
        done, _ = ray.wait(list(by_ref), num_returns=len(by_ref), timeout=0)
        now = time.perf_counter()
        for ref in done:
            f = by_ref[ref]
            if self.flights.get(f.ticket) is not f or f.meta != ref:
                continue  # lost with its worker, or re-routed after a router restart, earlier in this poll
            try:
                ray.get(ref)
            except Exception as e:  # noqa: BLE001 — sorted by stage and type below
                events += self._stage_failed(f, e)
                continue
            if f.stage == "rollout":
                self._started_next(f.worker, f.ticket, now)
                f.stage, f.t0, f.rolled = "route", now, f.batch
                f.meta, f.batch = self.router.only.route_meta.options(num_returns=2).remote(f.rolled)
                events.append(RolledOut(f.ticket))
            else:
                del self.flights[f.ticket]
                self._routed[f.batch.hex()] = f.ticket
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
            if _died(e):
                return self._worker_failed(f.worker, f"died ({type(e).__name__})", f.incarnation)
            raise RoleFailure(f"rollout {f.worker}: ticket {f.ticket} failed: {first_line(e)}")
        cause = getattr(e, "cause", None)
        if isinstance(cause, TeacherFailure):
            del self.flights[f.ticket]
            member = self.teachers[cause.teacher].members.get(cause.replica)
            if member is not None and member.incarnation == cause.incarnation:
                self._restart_teacher(cause.teacher, cause.replica, cause.cause)  # else: already replaced
            return [Lost(f.ticket, cause.replica, cause.cause)]
        if _died(e):
            self._router_failed(f"died while routing ticket {f.ticket} ({type(e).__name__})")
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
                self._router_failed(f"ticket {f.ticket} not routed within deadlines.route_s={self.dl.route_s:g}")
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
        m = self.rollout.restart(worker, cause)
        # Up, with the latest weights pulled from the store.
        version = call(m.actor.get_version.remote(), f"rollout {worker} (restarted)", self.cfg.sync.timeout_s)
        self._versions[worker] = version
        return events + [Joined(worker, version)]

    def worker_failed(self, worker: str, cause: str, incarnation: str) -> None:
        """A failure found outside `poll` (a weight-sync acknowledgement): reported by the next poll."""
        self._deferred += self._worker_failed(worker, cause, incarnation)

    def _restart_teacher(self, teacher: str, replica: str, cause: str = "") -> None:
        print(f"teacher {replica}: {cause or 'failed'}; restarting", flush=True)
        m = self.teachers[teacher].restart(replica, cause)
        # Up before it is asked anything: its start-up must not count against deadlines.teacher_s.
        call(m.actor.get_stats.remote(), f"teacher {replica} (restarted)", self.cfg.sync.timeout_s)
        self._router_set_pool(teacher, self._pool(teacher))

    def _router_set_pool(self, teacher: str, pool) -> None:
        try:
            ray.get(self.router.only.set_pool.remote(teacher, pool), timeout=self.dl.route_s)
        except Exception as e:  # noqa: BLE001
            if not _died(e):
                raise RoleFailure(f"router: set_pool failed: {first_line(e)}") from None
            self._router_failed(f"died ({type(e).__name__})")  # the new router is built with the current pools

    def _router_failed(self, cause: str) -> None:
        """Rebuild the router from the state after the last hand-out; re-route what it held."""
        print(f"router: {cause}; restarting", flush=True)
        m = self.router.restart("router-0", cause)
        call(m.actor.load_state_dict.remote(self._router_state), "router (restarted)", self.dl.route_s)
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

    # ---- replay queue -----------------------------------------------------------------------
    def replay_put(self, handles: list) -> None:
        # No round trip: calls from one caller run in order, so the next take sees them; the
        # acknowledgements are checked before that take.
        for ref in handles:
            self._in_replay[self._routed.pop(ref.hex())] = ref
            self._puts.append(self.replay.only.put.remote(ref))

    def _replay(self, method: str, *args, num_returns: int = 1):
        """Call the replay queue; a dead one is rebuilt from the queued refs and the call retried."""
        def attempt(timeout):
            self._check_puts()
            refs = getattr(self.replay.only, method).options(num_returns=num_returns).remote(*args)
            out = ray.get(refs[0] if num_returns > 1 else refs, timeout=timeout)
            return (out, refs[1:]) if num_returns > 1 else out

        return self._until_answered(f"replay queue ({method})", "deadlines.replay_s", self.dl.replay_s, attempt,
                                    self._replay_failed)

    def _check_puts(self) -> None:
        puts, self._puts = self._puts, []
        for ok in ray.get(puts, timeout=self.dl.replay_s):
            if not ok:
                raise RoleFailure("replay queue: refused a batch although the pipeline respects its capacity")

    def _replay_failed(self, cause: str) -> None:
        print(f"replay queue: {cause}; restarting", flush=True)
        m = self.replay.restart("replay-0", cause)
        self._puts = [m.actor.put.remote(ref) for _, ref in sorted(self._in_replay.items())]

    def _forget_replayed(self, tickets) -> None:
        for t in tickets:
            self._in_replay.pop(t, None)

    def replay_take(self, n: int, version: int):
        meta, shards = self._replay("take_sharded", n, version, self.cfg.learner.world_size,
                                    num_returns=self.cfg.learner.world_size + 1)
        self._forget_replayed([*meta["tickets"], *meta["dropped"]])
        return shards, meta

    def replay_purge(self, version: int) -> dict:
        out = self._replay("purge", version)
        self._forget_replayed(out["dropped"])
        return out

    def replay_drain(self) -> dict[int, int]:
        out = self._replay("drain", "unconsumed")
        self._forget_replayed(out)
        return out

    def replay_stats(self) -> dict:
        return self._replay("stats")

    # ---- weight store -------------------------------------------------------------------------
    def store_put(self, version: int, payload, nbytes: int = 0) -> None:
        self._store("put", version, payload, nbytes)
        self._store_latest = (version, payload, nbytes)  # after the put: a rebuilt store gets the last one stored

    def store_version(self) -> int:
        return self._store("get_version")

    def _store(self, method: str, *args):
        return self._until_answered(f"weight store ({method})", "sync.timeout_s", self.cfg.sync.timeout_s,
                                    lambda t: ray.get(getattr(self.store.only, method).remote(*args), timeout=t),
                                    self._store_failed)

    def _store_failed(self, cause: str) -> None:
        print(f"weight store: {cause}; restarting", flush=True)
        m = self.store.restart("weight_store-0", cause)
        if self._store_latest is not None:
            call(m.actor.put.remote(*self._store_latest), "weight store (restarted)", self.cfg.sync.timeout_s)

    # ---- router state (checkpoints) -------------------------------------------------------
    def router_state_before(self, ticket: int) -> dict:
        return self._before.get(ticket) or self._router_state

    def router_forget_before(self, ticket: int) -> None:
        for t in [t for t in self._before if t < ticket]:
            del self._before[t]

    def router_load(self, state: dict) -> None:
        call(self.router.only.load_state_dict.remote(state), "router", self.dl.route_s)
        self._router_state, self._before = state, {}

    # ---- the fleet ----------------------------------------------------------------------------
    def counts(self) -> dict:
        return {"rollout": len(self.rollout.members) - len(self._joining), "learner": self.cfg.learner.world_size,
                "teacher": sum(len(g.members) for g in self.teachers.values())}

    def teacher_counts(self) -> dict[str, int]:
        return {r.name: len(self.teachers[r.teacher].members) for r in self.cfg.routing.routes}

    def restarts(self) -> dict:
        return {"rollout": self.rollout.restarts_total,
                "teacher": sum(g.restarts_total for g in self.teachers.values()),
                "router": self.router.restarts_total, "replay": self.replay.restarts_total,
                "weight_store": self.store.restarts_total}

    def failures(self) -> dict:
        groups = {"rollout": [self.rollout], "teacher": list(self.teachers.values()), "router": [self.router],
                  "replay": [self.replay], "weight_store": [self.store]}
        return {role: sum(g.failures_total for g in gs) for role, gs in groups.items()}

    def busy_stats(self) -> dict:
        groups = {"rollout": self.worker_actors().values(),
                  "teacher": [a for g in self.teachers.values() for a in g.actors()], "router": self.router.actors()}
        out = {}
        for role, actors in groups.items():
            try:
                out[role] = ray.get([a.get_stats.remote() for a in actors], timeout=self.dl.replay_s)
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
            # The router swaps pools between asks, so no ask is in flight on a removed replica
            # once the swap is acknowledged and the replica's queue is empty.
            pool = RayTeacherPool(teacher, {n: group.members[n].actor for n in keep}, self.dl.teacher_s)
            self._router_set_pool(teacher, pool)
            for name in group.names()[count:]:
                group.remove(name)
        return []

    def retire_drained(self, busy: set[str]) -> None:
        for name in [w for w in self.draining if w not in busy]:
            self.rollout.remove(name)
            self._versions.pop(name, None)
            self.draining.discard(name)

    def shutdown(self) -> None:
        for g in (self.rollout, *self.teachers.values(), self.router, self.replay, self.store):
            try:
                g.shutdown()
            except Exception as e:  # noqa: BLE001 — best effort on the way out
                print(f"{g.role}: shutdown: {first_line(e)}", flush=True)


def reserved_by_others(specs: dict) -> dict[str, float]:
    out: collections.Counter = collections.Counter()
    for role, spec in specs.items():
        if role != "rollout":
            for k, v in spec.bundle.items():
                out[k] += v * spec.members
    return dict(out)


def placeable(spec, nodes: list[dict], reserved: dict[str, float]) -> int:
    """Members of `spec` that `nodes` (each node's total resources) can hold once `reserved`
    is taken out of the whole cluster."""
    need = spec.bundle
    if not need:
        return 10**6
    per_node = sum(min(int(node.get(k, 0.0) // v) for k, v in need.items()) for node in nodes)
    left = min(int(max(0.0, sum(n.get(k, 0.0) for n in nodes) - reserved.get(k, 0.0)) // v) for k, v in need.items())
    return min(per_node, left)


class RayLearner:
    """W DeepSpeed ranks (one gang placement group). A step runs while the loop goes on.

    A rank cannot be rebuilt in place (its peers hold collective state), so a dead or failing
    rank ends the job at once, with one line naming the rank: its refs fail as soon as Ray
    sees the death, without waiting for the survivors' collective timeout. `--resume auto`
    continues from the last checkpoint."""

    kind = "deepspeed"

    def __init__(self, cfg, spec):
        from learner.deepspeed_learner import DeepSpeedLearner

        self.cfg = cfg
        env = {"env_vars": actor_env(cfg)}
        cls = ray.remote(learner_rank_actor(DeepSpeedLearner))
        self._addr = None
        self.failed: str | None = None
        self.group = ActorGroup("learner", spec, lambda name, opts: cls.options(**opts, runtime_env=env).remote(
            cfg, int(name.rsplit("-", 1)[1]), cfg.learner.world_size, *self._addr))
        # Rank 0 listens on a free port of its own node: probe it inside rank 0's bundle.
        pg, first = self.group.reserve_gang(cfg.learner.world_size)
        self._addr = ray.get(ray.remote(free_port).options(num_cpus=0, scheduling_strategy=on(pg, first)).remote())
        self.group.add_gang()
        self.ranks = self.group.actors()
        self.wait([r.get_version.remote() for r in self.ranks], "starting", cfg.sync.timeout_s + 600)
        self._refs, self._t0 = None, 0.0

    def _fail(self, rank: int, what: str, e: BaseException):
        cause = f"died ({type(e).__name__})" if isinstance(e, ray.exceptions.RayActorError) else first_line(e)
        self.failed = f"learner learner-{rank}: {what}: {cause}"
        raise RoleFailure(self.failed + " (a rank cannot be rebuilt in place; rerun with --resume auto)") from None

    def wait(self, refs: list, what: str, timeout: float, fetch: bool = True) -> list | None:
        """Wait for one call per rank (rank order); the first failure names its rank at once."""
        t0, left = time.perf_counter(), dict(zip(refs, range(len(refs))))
        while left:
            done, _ = ray.wait(list(left), num_returns=1, timeout=max(0.0, timeout - (time.perf_counter() - t0)))
            if not done:
                raise RoleFailure(f"learner learner-{min(left.values())}: {what}: no answer within {timeout:g} s")
            for ref in done:
                rank = left.pop(ref)
                try:
                    ray.get(ref)
                except Exception as e:  # noqa: BLE001
                    self._fail(rank, what, e)
        return ray.get(refs) if fetch else None

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
        for ref in done:  # a failed rank ends the step now, not when its peers' collective times out
            try:
                ray.get(ref)
            except Exception as e:  # noqa: BLE001
                self._fail(self._refs.index(ref), "step failed", e)
        if len(done) < len(self._refs):
            if time.perf_counter() - self._t0 > deadline_s:
                late = min(i for i, r in enumerate(self._refs) if r not in done)
                self.failed = f"learner learner-{late}: step not done within deadlines.learner_step_s={deadline_s:g}"
                raise RoleFailure(self.failed)
            return None
        results = ray.get(self._refs)
        self._refs = None
        return results[0]

    def export_ref(self):
        """Ref to rank 0's gathered weights, and the other ranks' refs (ZeRO-3 gathers on all)."""
        refs = [r.export_weights.remote() for r in self.ranks]
        return refs[0], refs[1:]

    def export(self) -> dict:
        refs = [r.export_weights.remote() for r in self.ranks]
        return self.wait(refs, "exporting weights", self.cfg.sync.timeout_s)[0]

    def _all(self, method: str, *args, timeout: float | None = None) -> list:
        refs = [getattr(r, method).remote(*args) for r in self.ranks]
        return self.wait(refs, method.replace("_", " "), timeout or self.cfg.deadlines.learner_step_s)

    def save(self, folder) -> None:
        self._all("save_checkpoint", str(folder))

    def load(self, folder, weights: dict) -> None:
        self._all("load_checkpoint", str(folder))

    def load_weights(self, weights: dict) -> None:
        self._all("load_weights", ray.put(weights))

    def set_version(self, version: int) -> None:
        self._all("set_version", version)

    def shutdown(self) -> None:
        if self.failed is None:  # peers of a failed rank may hang in a collective: just kill them
            try:
                ray.get([r.shutdown.remote() for r in self.ranks], timeout=30)
            except Exception:  # noqa: BLE001 — best effort on the way out
                pass
        self.group.shutdown()


class RayEvaluation:
    """The evaluator in an actor of its own, off the learner's path: the learner only exports its
    weights into the object store (as for a weight push) and the actor samples and scores them.
    One evaluation runs and at most one waits, the newest (an older waiting one is skipped), so a
    slow evaluator never holds more than two weight versions. A failed evaluator stops evaluating
    (one line), never the job."""

    where = "evaluator actor"

    def __init__(self, cfg):
        from danceopd.evaluate import Evaluator

        spec = role_specs(cfg)["evaluator"]
        opts = {"num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus, "runtime_env": {"env_vars": actor_env(cfg)}}
        self.actor = ray.remote(Evaluator).options(**opts).remote(cfg)
        self.running = self.waiting = None  # (step, ref of its result) / (step, ref of its weights)
        self.skipped, self.failed = 0, None

    def submit(self, step: int, learner: RayLearner) -> None:
        if self.failed:
            return
        weights, _ = learner.export_ref()  # queued on the ranks before their next step
        if self.running is None:
            self.running = (step, self.actor.evaluate.remote(weights, step))
        else:
            self.skipped += self.waiting is not None
            self.waiting = (step, weights)

    def poll(self, wait_s: float = 0.0) -> list[dict]:
        """Finished evaluations; with `wait_s`, wait up to that long for every outstanding one."""
        out, t0 = [], time.perf_counter()
        while self.running is not None:
            step, ref = self.running
            done, _ = ray.wait([ref], timeout=max(0.0, wait_s - (time.perf_counter() - t0)))
            if not done:
                if wait_s:
                    print(f"evaluation of step {step}: not done within {wait_s:g} s; finishing without it", flush=True)
                break
            self.running = None
            try:
                out.append(ray.get(ref))
            except Exception as e:  # noqa: BLE001 — evaluation is not worth the job
                self.failed, self.waiting = first_line(e), None
                print(f"evaluator: step {step} failed, evaluation stops: {self.failed}", flush=True)
                break
            if self.waiting is not None:
                (wstep, weights), self.waiting = self.waiting, None
                self.running = (wstep, self.actor.evaluate.remote(weights, wstep))
        return out

    def shutdown(self) -> None:
        ray.kill(self.actor, no_restart=True)


def build_ray(cfg):
    from services.weights.ray_sync import CollectiveSync, ObjectStoreSync

    fleet = RayFleet(cfg)
    learner = RayLearner(cfg, fleet.specs["learner"])
    sync_cls = CollectiveSync if cfg.sync.transport == "collective" else ObjectStoreSync
    return fleet, learner, lambda pipeline: sync_cls(cfg, learner, fleet, pipeline)
