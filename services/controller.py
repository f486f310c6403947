"""The Ray-mode controller: builds the job from one config, drives the loop, supervises.

The loop, on one screen:
    issue work (router -> rollout worker -> router.route)  while the staleness gate allows
    collect routed batches, in ticket order, into the replay queue
    learner step when a full step of fresh batches is queued
    push weights every `sync_every` steps (weight store + live workers, acknowledged)
    checkpoint every `checkpoint.every` steps
Sync vs async is only the gate: with max_policy_lag = 0 a batch for step s is issued only
once the worker holds version s; with lag L it may be issued L versions early.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from dataclasses import dataclass

import ray

from danceopd.checkpoint import atomic_checkpoint, load_json, prune, save_json, save_tensors
from danceopd.dataset import Dataset
from services.actors import (
    LearnerGroup,
    RayTeacherPool,
    make_replay,
    make_router,
    make_weight_store,
    rollout_group,
    teacher_group,
)
from services.autoscale import AutoscalePolicy
from services.control_api import ControlServer, register, resolve_token, unregister
from services.local import used_teachers
from services.metrics import ControllerMetrics, controller_port
from services.progress import JobLog
from services.weight_store import state_nbytes


@dataclass
class InFlight:
    ticket: int
    worker: str
    samples: int
    ref: object  # RoutedBatch ref


class Controller:
    def __init__(self, cfg, resume_from=None, show_progress: bool = True):
        self.cfg = cfg
        self.per_step = cfg.learner.world_size * cfg.learner.grad_accum
        dataset = Dataset.load(cfg.resolve(cfg.data.path))
        dataset.check_routes(cfg.routing.routes)
        self.store = make_weight_store()
        self.teachers = {}
        pools = {}
        for name in used_teachers(cfg):
            group = teacher_group(cfg, name)
            for _ in range(cfg.teacher(name).replicas):
                group.add()
            self.teachers[name] = group
            pools[name] = RayTeacherPool([m.actor for m in group.members.values()])
        self.router = make_router(cfg, dataset, pools)
        self.replay = make_replay(cfg)
        self.learners = LearnerGroup(cfg)
        self.workers = rollout_group(cfg, self.store)
        self.version = 0
        self.step = 0
        self.worker_version: dict[str, int] = {}
        self.in_flight: dict[int, InFlight] = {}
        self.ready: dict[int, object] = {}  # ticket -> routed batch ref, waiting for its turn
        self.lost_tickets: set[int] = set()
        self.next_put = 0  # next ticket to enter the replay queue (FIFO by ticket)
        self.issued = 0  # tickets handed out
        self.alive_issued = 0  # tickets handed out and not lost
        self.acct = {"produced": 0, "lost": 0}
        self.queued = 0  # batches put into the replay queue and not taken
        self.learning = None  # (start time, per-rank result refs) of the step in progress
        self.max_lag = 0
        self.sync_log: list[dict] = []
        self.pending_syncs: list[dict] = []
        self.nbytes = None
        self.epoch = 0
        self.group_members: set[str] = set()
        self.draining: set[str] = set()  # rollout workers finishing their batches before removal
        self.base_step = 0
        self.base_ticket = 0
        self.learner_busy = 0.0
        self.t_start = time.perf_counter()
        if resume_from:
            self._resume(resume_from)
        self._push_weights()
        for _ in range(cfg.rollout.workers):
            self._add_worker(sync=False)
        if cfg.sync.transport == "collective":
            self._broadcast_weights()  # the workers joined after the first push
        self.log = JobLog(cfg, self.step, show_progress)
        self.t_start = time.perf_counter()  # idle ratios count from here, not from actor start-up
        # observability and control
        self.state = "starting"
        self.last_ckpt = None
        self.commands: queue.Queue = queue.Queue()
        self.stop_requested = threading.Event()
        self.step_times: collections.deque = collections.deque(maxlen=11)
        self.synced_reported = self.restarts_reported = 0
        self._status = {"job": cfg.job.name, "step": self.step, "steps": cfg.learner.steps, "workers": {}}
        self.autoscaler = AutoscalePolicy(cfg.autoscale) if cfg.autoscale.enabled else None
        port = cfg.control.metrics_port if cfg.control.metrics_port is not None else controller_port()
        try:
            self.metrics = ControllerMetrics(port, host=cfg.control.host)
        except OSError:  # the default port is taken (another job on this host): any free port
            self.metrics = ControllerMetrics(0, host=cfg.control.host)
            self.log.console.print(f"[yellow]metrics port {port} is busy; serving on {self.metrics.port}[/]")
        self.metrics.set("danceopd_policy_lag_bound", cfg.sync.max_policy_lag)
        self.metrics.set("danceopd_learner_step", self.step)
        for role in ("rollout", "teacher", "learner"):
            self.metrics.inc("danceopd_restarts", 0, role=role)  # the series exist from the start
        self.token = resolve_token(cfg.control.token_env)
        self.control = ControlServer(cfg.control.host, cfg.control.port, self.token, self.status,
                                     self.request_scale, self.request_stop)
        host, cport = self.control.start()
        self.control_url = f"http://{host}:{cport}"
        register(cfg.job.name, self.control_url, self.token)

    # ---- weights ------------------------------------------------------------------------
    def _push_weights(self) -> None:
        """Export (all ranks: ZeRO-3 gathers), publish to the store, notify live workers. Workers
        apply the version between batches; their acknowledgements are checked in the loop."""
        if self.cfg.sync.transport == "collective":
            return self._broadcast_weights()
        t0 = time.perf_counter()
        ref, others = self.learners.export_weights()
        ray.get(others)
        ray.get(self.store.put.remote(self.version, [ref], 0))
        acks = [m.actor.set_weights.remote(ref, self.version) for m in self.workers.members.values()]
        for m in self.workers.members.values():
            self.worker_version[m.name] = self.version  # every later order runs after the switch
        if self.nbytes is None:
            self.nbytes = state_nbytes(ray.get(ref))
        self.pending_syncs.append({"version": self.version, "t0": t0, "acks": acks})

    def _weight_group_epoch(self) -> None:
        """(Re)build the broadcast group: learner rank 0 + the current rollout workers."""
        self.epoch += 1
        rank0 = self.learners.ranks[0]
        addr, port = ray.get(rank0.free_port.remote())
        workers = [m for n, m in self.workers.members.items() if n not in self.draining]
        backend = "nccl" if self.cfg.learner.num_gpus > 0 and self.cfg.rollout.num_gpus > 0 else "gloo"
        world, timeout = len(workers) + 1, self.cfg.sync.timeout_s
        refs = [rank0.join_weight_group.remote(backend, addr, port, 0, world, self.epoch, timeout)]
        refs += [m.actor.join_weight_group.remote(backend, addr, port, i + 1, world, self.epoch, timeout)
                 for i, m in enumerate(workers)]
        ray.get(refs)
        self.group_members = {m.name for m in workers}

    def _broadcast_weights(self) -> None:
        """`collective`: rank 0 broadcasts in buckets; every worker receives between batches.
        Synchronous and acknowledged; a changed fleet first rebuilds the group."""
        from danceopd.collective import WeightSyncError

        t0 = time.perf_counter()
        if not [n for n in self.workers.members if n not in self.draining]:
            return  # nobody to send to yet; workers joining later trigger a broadcast
        for attempt in range(2):
            if self.group_members != {n for n in self.workers.members if n not in self.draining}:
                self._weight_group_epoch()
            sends = [r.broadcast_weights.remote(self.version) for r in self.learners.ranks]
            recvs = {n: self.workers.members[n].actor.receive_weights.remote() for n in self.group_members}
            try:
                nbytes = ray.get(sends, timeout=self.cfg.sync.timeout_s)[0]
                ray.get(list(recvs.values()), timeout=self.cfg.sync.timeout_s)
                break
            except (WeightSyncError, ray.exceptions.RayError):
                if attempt:
                    raise
                self.group_members = set()  # a member died or timed out: rebuild and resend
        if ray.get(self.store.get_version.remote()) < self.version:
            ray.get(self.store.put.remote(self.version, None, nbytes))
        for n in self.group_members:
            self.worker_version[n] = self.version
        self.nbytes = nbytes
        self.sync_log.append({"version": self.version, "seconds": time.perf_counter() - t0, "bytes": nbytes})

    def _check_syncs(self, block: bool = False) -> None:
        for sync in list(self.pending_syncs):
            timeout = self.cfg.sync.timeout_s if block else 0
            done, pending = ray.wait(sync["acks"], num_returns=len(sync["acks"]), timeout=timeout)
            if not pending:
                self.pending_syncs.remove(sync)
                self.sync_log.append({"version": sync["version"], "seconds": time.perf_counter() - sync["t0"],
                                      "bytes": self.nbytes})
            elif time.perf_counter() - sync["t0"] > self.cfg.sync.timeout_s:
                raise TimeoutError(f"weight sync to version {sync['version']}: {len(pending)} workers did not "
                                   f"acknowledge within sync.timeout_s={self.cfg.sync.timeout_s}")

    def _add_worker(self, name: str | None = None, sync: bool = True) -> str:
        m = self.workers.add(name)
        self.worker_version[m.name] = ray.get(m.actor.get_version.remote())
        if sync and self.cfg.sync.transport == "collective":
            self._broadcast_weights()  # object_store workers pull from the store on start instead
        return m.name

    # ---- rollouts -----------------------------------------------------------------------
    def _gate_allows(self, worker: str) -> bool:
        if len(self.in_flight) + len(self.ready) + self.queued >= self.cfg.replay.capacity:
            return False  # backpressure: the replay queue would overflow
        if self.cfg.sync.on_stale == "drop":
            return True
        # The batch at position p is consumed at step p // per_step; it may be made with
        # version v only if v >= that step - max_policy_lag.
        consume_step = self.alive_issued // self.per_step
        return self.worker_version[worker] >= consume_step - self.cfg.sync.max_policy_lag

    def _issue(self) -> None:
        # Two orders per worker when rollouts may run ahead, so a worker never idles while the
        # controller is busy with a learner step; one when on-policy (lag 0) anyway blocks it.
        depth = 1 if self.cfg.sync.max_policy_lag == 0 else 2
        load = collections.Counter(f.worker for f in self.in_flight.values())
        for name, m in self.workers.members.items():
            if name in self.draining:
                continue
            while load[name] < depth and not self.issued_enough() and self._gate_allows(name):
                load[name] += 1
                self._issue_to(name, m)

    def _issue_to(self, name, m) -> None:
        order = self.router.next_order.remote(self.cfg.rollout.batch_size)
        routed = self.router.route.remote(m.actor.rollout.remote(order))
        ticket = self.issued
        self.in_flight[ticket] = InFlight(ticket, name, self.cfg.rollout.batch_size, routed)
        self.issued += 1
        self.alive_issued += 1
        self.acct["produced"] += self.cfg.rollout.batch_size

    def issued_enough(self) -> bool:
        """Enough batches consumed, queued or on their way for the remaining steps (dropped
        ones no longer count, so `on_stale: drop` issues replacements)."""
        pipeline = self.queued + len(self.in_flight) + len(self.ready)
        return self.step * self.per_step + pipeline >= self.cfg.learner.steps * self.per_step

    def _collect(self, timeout: float) -> None:
        if not self.in_flight:
            return
        refs = {f.ref: t for t, f in self.in_flight.items()}
        wake = list(refs) + (self.learning[1] if self.learning else [])  # a finished step wakes us too
        done, _ = ray.wait(wake, num_returns=1, timeout=timeout)
        for ref in (r for r in done if r in refs):
            f = self.in_flight.pop(refs[ref])
            try:
                ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
                if not self._worker_died(f, e):
                    raise
                continue
            self.ready[f.ticket] = ref
        # FIFO by ticket: the consumption order does not depend on which worker was faster.
        while self.next_put in self.ready or self.next_put in self.lost_tickets:
            if self.next_put in self.ready:
                # No round trip: calls from one caller run in order, so the next take sees it,
                # and the gate never admits more than the queue's capacity.
                self.replay.put.remote(self.ready.pop(self.next_put))
                self.queued += 1
            self.next_put += 1

    def _worker_died(self, f: InFlight, err) -> bool:
        if not isinstance(err, ray.exceptions.RayActorError) and f.worker not in self.workers.probe(timeout=5):
            return False  # a real error in the rollout or routing code: surface it
        self.lost_tickets.add(f.ticket)
        self.alive_issued -= 1
        self.acct["lost"] += f.samples
        self.log.console.print(f"[yellow]rollout worker {f.worker} died ({type(err).__name__}); restarting[/]")
        m = self.workers.restart(f.worker)
        # A restarted worker pulls the latest weights from the store on start (object_store) or
        # gets them in a rebuilt broadcast group (collective).
        self.worker_version[f.worker] = ray.get(m.actor.get_version.remote())
        if self.cfg.sync.transport == "collective":
            self.group_members = set()
            self._broadcast_weights()
        return True

    # ---- learning -----------------------------------------------------------------------
    def _learn(self) -> dict | None:
        """Start a learner step once a full step is queued; return its metrics when it is done.
        The loop keeps issuing and collecting rollouts while the ranks train."""
        if self.learning is None:
            if self.queued < self.per_step:
                return None  # not a full step queued yet: no round trip to the queue
            batches = ray.get(self.replay.take.remote(self.per_step, self.version))
            if not batches:  # stale batches were dropped (on_stale: drop)
                self.queued = ray.get(self.replay.depth.remote())
                return None
            self.queued -= len(batches)
            lag = self.version - min(min(b.column("policy_version").to_pylist()) for b in batches)
            self.max_lag = max(self.max_lag, lag)
            self.learning = (time.perf_counter(), self.learners.train_step(batches))
        t0, refs = self.learning
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        if len(done) < len(refs):
            return None
        results = ray.get(refs)
        self.learning = None
        self.learner_busy += time.perf_counter() - t0
        self.version += 1
        self.step += 1
        return results[0]

    # ---- checkpoints --------------------------------------------------------------------
    def _checkpoint(self) -> str:
        first_unconsumed = self._first_unconsumed_ticket()
        router_state = ray.get(self.router.state_before.remote(first_unconsumed))
        with atomic_checkpoint(self.cfg.output_path, self.step) as tmp:
            self.learners.save(str(tmp / "deepspeed"))
            ref, others = self.learners.export_weights()
            ray.get(others)
            save_tensors(tmp / "model.safetensors", ray.get(ref))
            save_json(tmp / "state.json", {"step": self.step, "version": self.version, "router": router_state,
                                           "weight_version": self.version, "mode": "ray",
                                           "accounting": self.accounting()})
        prune(self.cfg.output_path, self.cfg.checkpoint.keep)
        self.router.forget_before.remote(first_unconsumed)
        return str(self.cfg.output_path / "checkpoints" / f"step-{self.step:08d}")

    def _first_unconsumed_ticket(self) -> int:
        # Tickets enter the queue in order and leave it in order: the consumed ones are the
        # first step*per_step non-lost tickets.
        consumed, t = 0, self.base_ticket
        while consumed < (self.step - self.base_step) * self.per_step:
            if t not in self.lost_tickets:
                consumed += 1
            t += 1
        while t in self.lost_tickets:
            t += 1
        return t

    def _resume(self, path) -> None:
        state = load_json(path / "state.json")
        if state.get("mode") != "ray":
            raise ValueError(f"--resume {path}: a {state.get('mode')} checkpoint cannot resume a ray run")
        self.learners.load(str(path / "deepspeed"))
        self.step = self.version = int(state["step"])
        ray.get(self.router.load_state_dict.remote(state["router"]))
        # Tickets restart at the router's cursor; positions count from the resumed step.
        self.issued = self.next_put = self.base_ticket = int(state["router"]["next_ticket"])
        self.base_step = self.step
        self.alive_issued = self.step * self.per_step

    # ---- the loop -----------------------------------------------------------------------
    def accounting(self) -> dict:
        rs = ray.get(self.replay.stats.remote())
        return {"produced": self.acct["produced"], "consumed": rs["consumed_samples"], "lost": self.acct["lost"],
                "dropped": rs["dropped"], "queued": rs["depth"] * self.cfg.rollout.batch_size,
                "in_flight": sum(f.samples for f in self.in_flight.values()) + len(self.ready) * self.cfg.rollout.batch_size}

    def run(self) -> dict:
        cfg = self.cfg
        self.state = "running"
        while self.step < cfg.learner.steps and not self.stop_requested.is_set():
            self._apply_commands()
            with self.log.timer("issue"):
                self._issue()
            with self.log.timer("collect"):
                if self.in_flight:
                    self._collect(timeout=0.05)
                elif self.learning is not None:
                    ray.wait(self.learning[1], num_returns=len(self.learning[1]), timeout=0.05)
                elif self.queued < self.per_step:
                    if self.cfg.sync.on_stale == "drop":  # stale leftovers must not block issuing
                        self.queued = ray.get(self.replay.purge.remote(self.version))
                    time.sleep(0.01)  # nothing in flight and nothing to learn: a command may come
            with self.log.timer("learn"):
                metrics = self._learn()
            self._check_syncs()
            self._retire_drained()
            if metrics is None:
                continue
            if self.step % cfg.sync.sync_every == 0 and self.step < cfg.learner.steps:
                with self.log.timer("sync"):
                    self._push_weights()
            if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                with self.log.timer("checkpoint"):
                    self.last_ckpt = self._checkpoint()
            self._after_step(metrics)
        self.state = "stopping"
        while self.learning is not None:  # a stop arrived mid-step: finish and count that step
            metrics = self._learn()
            if metrics is not None:
                self._after_step(metrics)
            else:
                time.sleep(0.01)
        if self.last_ckpt is None or not self.last_ckpt.endswith(f"{self.step:08d}"):
            self.last_ckpt = self._checkpoint()  # the final (or graceful-stop) checkpoint
        return self._finish(self.last_ckpt)

    # ---- observability and control ------------------------------------------------------
    def worker_counts(self) -> dict:
        return {"rollout": len(self.workers.members), "learner": self.cfg.learner.world_size,
                "teacher": sum(len(g.members) for g in self.teachers.values())}

    def _after_step(self, metrics: dict) -> None:
        now = time.perf_counter()
        self.step_times.append((now, self.learner_busy))
        (t_old, busy_old), (t_new, busy_new) = self.step_times[0], self.step_times[-1]
        idle = 1 - (busy_new - busy_old) / (t_new - t_old) if t_new > t_old else 0.0
        counts = self.worker_counts()
        samples = self.per_step * self.cfg.rollout.batch_size
        self.log.step(self.step, metrics, samples=samples, lag=self.max_lag, workers=counts)
        m = self.metrics
        m.set("danceopd_learner_step", self.step)
        m.set("danceopd_last_step_timestamp_seconds", time.time())
        for route, loss in metrics["route_loss"].items():
            m.set("danceopd_loss", loss, route=route)
        m.set("danceopd_grad_norm", metrics["grad_norm"])
        m.set("danceopd_learning_rate", metrics["lr"])
        m.inc("danceopd_samples_consumed", samples)
        m.set("danceopd_samples_per_second", self.log.samples_per_s())
        m.set("danceopd_learner_idle_ratio", max(0.0, idle))
        m.set("danceopd_weight_version", self.version)
        for role, n in counts.items():
            m.set("danceopd_workers", n, role=role)
        for s in self.sync_log[self.synced_reported:]:
            m.observe("danceopd_weight_sync_seconds", s["seconds"])
            m.set("danceopd_weight_sync_bytes", s["bytes"])
        self.synced_reported = len(self.sync_log)
        if self.workers.restarts_total > self.restarts_reported:
            m.inc("danceopd_restarts", self.workers.restarts_total - self.restarts_reported, role="rollout")
            self.restarts_reported = self.workers.restarts_total
        self._status = {
            "job": self.cfg.job.name, "state": self.state, "step": self.step, "steps": self.cfg.learner.steps,
            "samples_per_s": round(self.log.samples_per_s(), 3), "lag": self.max_lag,
            "lag_bound": self.cfg.sync.max_policy_lag, "replay_depth": self.queued,
            "learner_idle_ratio": round(max(0.0, idle), 4),
            "workers": {"rollout": counts["rollout"], "learner": counts["learner"],
                        "teacher": {r.name: len(self.teachers[r.teacher].members) for r in self.cfg.routing.routes}},
            "last_checkpoint": self.last_ckpt, "last_step_time": time.time(), "output_dir": str(self.cfg.output_path),
            "restarts": {"rollout": self.workers.restarts_total},
        }
        if self.autoscaler is not None:
            delta = self.autoscaler.observe(self.step, idle, self.queued, self.cfg.replay.capacity,
                                            counts["rollout"] - len(self.draining), self._resources_free())
            if delta:
                self.commands.put(("scale", {"rollout_workers": counts["rollout"] - len(self.draining) + delta}))

    def _resources_free(self) -> bool:
        free = ray.available_resources()
        return free.get("CPU", 0) >= self.cfg.rollout.num_cpus and free.get("GPU", 0) >= self.cfg.rollout.num_gpus

    def status(self) -> dict:
        st = dict(self._status)
        st["state"] = self.state
        st["last_step_age_s"] = round(time.time() - st["last_step_time"], 3) if st.get("last_step_time") else None
        return st

    def request_scale(self, rollout_workers: int | None = None, teachers: dict | None = None) -> dict:
        """Validated here (the caller gets the error), applied by the loop between steps."""
        if rollout_workers is not None and (not isinstance(rollout_workers, int) or rollout_workers < 1):
            raise ValueError(f"rollout_workers: {rollout_workers!r} is not a positive integer")
        routes = {r.name for r in self.cfg.routing.routes}
        for route, n in (teachers or {}).items():
            if route not in routes:
                raise ValueError(f"teachers: unknown route {route!r} (known: {', '.join(sorted(routes))})")
            if not isinstance(n, int) or n < 1:
                raise ValueError(f"teachers.{route}: {n!r} is not a positive integer")
        self.commands.put(("scale", {"rollout_workers": rollout_workers, "teachers": teachers or {}}))
        return {"accepted": True, "rollout_workers": rollout_workers, "teachers": teachers or {}}

    def request_stop(self) -> None:
        self.state = "stopping"
        self.stop_requested.set()

    def _apply_commands(self) -> None:
        while not self.commands.empty():
            _, req = self.commands.get()
            n = req.get("rollout_workers")
            if n is not None:
                active = [w for w in self.workers.names() if w not in self.draining]
                for _ in range(n - len(active)):
                    self._add_worker()
                for name in active[n:] if n < len(active) else []:
                    self.draining.add(name)  # finishes its in-flight batches, then leaves
            for route, count in req.get("teachers", {}).items():
                self._scale_teacher(self.cfg.route(route).teacher, count)
            self.log.console.print(f"scaled: {self.worker_counts()}", highlight=False)

    def _scale_teacher(self, teacher: str, count: int) -> None:
        group = self.teachers[teacher]
        while len(group.members) < count:
            group.add()
        keep = group.names()[:count]
        # The router switches pools between batches, so no query is in flight on a removed replica.
        ray.get(self.router.set_pool.remote(teacher, RayTeacherPool([group.members[n].actor for n in keep])))
        for name in group.names()[count:]:
            group.remove(name)

    def _retire_drained(self) -> None:
        busy = {f.worker for f in self.in_flight.values()}
        for name in [w for w in self.draining if w not in busy]:
            self.workers.remove(name)
            self.worker_version.pop(name, None)
            self.draining.discard(name)

    def _finish(self, last_ckpt) -> dict:
        self._check_syncs(block=True)
        # Let in-flight work land so the accounting closes exactly, then drop what is left.
        while self.in_flight:
            self._collect(timeout=1.0)
        for t in sorted(self.ready):
            ray.get(self.replay.put.remote(self.ready.pop(t)))
        ray.get(self.replay.drain.remote("unconsumed"))
        wall = time.perf_counter() - self.t_start
        acct = self.accounting()
        busy = {"rollout": ray.get([m.actor.get_stats.remote() for m in self.workers.members.values()]),
                "teacher": ray.get([m.actor.get_stats.remote() for g in self.teachers.values() for m in g.members.values()]),
                "router": [ray.get(self.router.get_stats.remote())]}
        idle = {role: round(1 - sum(x["busy_s"] for x in stats) / (len(stats) * max(wall, 1e-9)), 4)
                for role, stats in busy.items() if stats}
        idle["learner"] = round(1 - self.learner_busy / max(wall, 1e-9), 4)
        extra = {"replay": ray.get(self.replay.stats.remote()), "accounting": acct,
                 "restarts": {"rollout": self.workers.restarts_total},
                 "learner_idle_ratio": idle["learner"], "idle_ratio": idle, "wall_s": round(wall, 3),
                 "weight_syncs": len(self.sync_log),
                 "sync_seconds_mean": round(sum(s["seconds"] for s in self.sync_log) / max(len(self.sync_log), 1), 5),
                 "sync_bytes": self.sync_log[-1]["bytes"] if self.sync_log else 0}
        return self.log.finish(last_ckpt, extra=extra)

    def shutdown(self) -> None:
        unregister(self.cfg.job.name)
        self.control.stop()
        self.metrics.close()
        self.workers.shutdown()
        for g in self.teachers.values():
            g.shutdown()
        self.learners.shutdown()
        for a in (self.router, self.replay, self.store):
            ray.kill(a)
