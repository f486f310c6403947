"""The training loop — one loop for `--mode local` and `--mode ray`.

    issue work orders while the staleness gate allows    (pipeline.plan -> router -> fleet.submit)
    collect routed batches; into the replay queue in ticket order      (fleet.poll -> pipeline)
    learner step once a full step is queued (it runs while rollouts go on)
    NaN/Inf: a batch whose teacher answered it is dropped, a step that went non-finite skipped;
    `learner.max_nonfinite_steps` of either in a row end the job naming the role and route
    push weights every `sync_every` steps; checkpoint every `checkpoint.every` steps
    a graceful stop (SIGTERM/SIGINT, /stop): finish the running step, the final checkpoint, then
    `checkpoint.stop_grace_s` for in-flight batches; what is still in flight is dropped (`stopped`)

The mode only picks the parts (services/runtime/, contracts.py): in-process objects whose calls
are done when made, or Ray actors whose calls return refs. Sync versus async is only the gate
(`sync.max_policy_lag`).
"""

from __future__ import annotations

import math
import queue
import threading
import time
from typing import TYPE_CHECKING

from danceopd.dataset import Dataset
from danceopd.profiling import write_traces
from router.router import Router
from services import checkpoints
from services.pipeline import RolloutPipeline, as_calls
from services.runtime.contracts import Elastic, Fleet, LearnerGroup, WeightSync
from services.runtime.events import Applied, Joined, Lost, NonFinite, RolledOut, Routed, Traced
from services.runtime.failures import RoleFailure
from services.signals import StopOnSignal
from services.state import FleetView, LoopState
from services.telemetry.status import Telemetry

if TYPE_CHECKING:  # annotations only: no import cycle, no cost
    from danceopd.config import Config


class TrainLoop:
    def __init__(self, cfg: Config, mode: str = "local", resume_from=None, show_progress: bool = True, run_id: str | None = None):
        self.cfg, self.mode = cfg, mode
        # From checkpoints.prepare_output (a resume carries the checkpoint's over); known before
        # any part starts, since every metric series carries it.
        self.run_id = run_id or checkpoints.run_id_of(cfg, resume_from)
        self.per_step = cfg.learner.world_size * cfg.learner.grad_accum
        # The pipeline's state has one owner, here: the ledger and the router (route draws, data
        # cursor, tickets). The runtime's parts compute and keep none of it.
        self.pipe = RolloutPipeline(self.per_step, cfg.learner.steps, cfg.replay.capacity,
                                    cfg.sync.max_policy_lag, cfg.sync.on_stale, cfg.rollout.orders_per_worker,
                                    by_route=cfg.routing.granularity == "update",
                                    groups={r: i for i, g in enumerate(cfg.routing.accumulation_groups or []) for r in g})
        self.router = make_router(cfg, self.per_step)
        if mode == "local":
            from services.runtime.local import LocalEvaluation as Evaluation
            from services.runtime.local import build_local as build
        else:
            from services.runtime.ray_build import build_ray as build
            from services.runtime.ray_learner import RayEvaluation as Evaluation
        # Ray mode: the evaluator actor starts while the fleet does.
        self.evaluation: Evaluation | None = Evaluation(cfg) if cfg.eval.enabled else None
        self.eval_step = None  # the step last submitted for evaluation
        self.fleet = self.learner = self.sync = self.telemetry = None
        try:
            parts: tuple[Fleet, LearnerGroup, WeightSync] = build(cfg, self.pipe, self.run_id)
            self.fleet, self.learner, self.sync = parts
            self._start(cfg, resume_from, show_progress)
        except BaseException:
            self.shutdown()  # whatever started (a refused resume, a metrics port taken): no actor outlives it
            raise

    def _start(self, cfg: Config, resume_from, show_progress: bool) -> None:
        self.pipe.worker_version.update(self.fleet.worker_versions())
        self.lag_last = self.lag_max = 0
        self.last_lags: tuple[int, ...] = ()
        self.learner_busy_s, self._learn_t0 = 0.0, None
        self.last_ckpt = None
        self.state = "starting"
        self.commands: queue.Queue = queue.Queue()
        self.stop_requested = threading.Event()
        self.stopped_by: str | None = None  # what asked for a graceful stop (/stop, SIGTERM, ...)
        self._grace_until: float | None = None  # when a stop's grace ends (set in finish())
        if resume_from:
            self._resume(resume_from)
        self.sync.push(self.step)
        self.evaluate()  # the starting weights
        self.autoscaler = None
        if cfg.autoscale.enabled:
            from services.control.autoscale import AutoscalePolicy

            self.autoscaler = AutoscalePolicy(cfg.autoscale)
        self.telemetry = Telemetry(cfg, self.step, show_progress, serve=self.mode == "ray",
                                   control_fns=(self.status, self.request_scale, self.request_stop), run_id=self.run_id)
        self.t_start = time.perf_counter()  # idle ratios count from here, not from actor start-up

    @property
    def step(self) -> int:
        """Learner steps done, which is also the weight version: the pipeline's one counter."""
        return self.pipe.step

    def snapshot(self) -> LoopState:
        f = self.fleet
        ev = self.evaluation
        return LoopState(
            step=self.step, state=self.state, mode=self.mode, run_id=self.run_id, learner_kind=self.learner.kind,
            per_step=self.per_step, lag_last=self.lag_last, lag_max=self.lag_max, learner_busy_s=self.learner_busy_s,
            last_checkpoint=self.last_ckpt, stopped_by=self.stopped_by, accounting=self.pipe.accounting(),
            nonfinite=self.pipe.nonfinite_counts(),
            replay=self.pipe.replay_stats(), last_lags=self.last_lags,
            batches={"issued": self.pipe.next_ticket, "in_flight": len(self.pipe.in_flight),
                     "queued": len(self.pipe.queued)},
            fleet=FleetView(f.counts(), f.teacher_counts(), f.restarts(), f.failures(), f.pending_counts()),
            syncs=self.sync.records, learner_failed=getattr(self.learner, "failed", None),
            evaluation=None if ev is None else {"where": ev.where, "skipped": ev.skipped, "failed": ev.failed})

    # ---- the loop ---------------------------------------------------------------------------
    def run(self) -> dict:
        try:
            return self._run()
        except Exception as e:
            self.state = "failed"
            self.telemetry.failed(self.snapshot(), e)
            raise

    def _run(self) -> dict:
        cfg, timer = self.cfg, self.telemetry.log.timer
        self.state = "running"
        while self.step < cfg.learner.steps and not self.stop_requested.is_set():
            self.apply_commands()
            with timer("issue"):
                self.issue()
            with timer("collect"):
                self.collect(timeout=0.05)
            with timer("learn"):
                metrics = self.learn()
            self.sync.poll()
            self.report_evaluations()
            if metrics is None:
                continue
            going_on = self.step < cfg.learner.steps and not self.stop_requested.is_set()  # else finish() follows
            if self.step % cfg.sync.sync_every == 0 and going_on:
                with timer("sync"):
                    self.sync.push(self.step)
            if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                with timer("checkpoint"):
                    self.checkpoint()
            if cfg.eval.every and self.step % cfg.eval.every == 0 and going_on:
                with timer("eval"):
                    self.evaluate()
            self.after_step(metrics)
        return self.finish()

    # ---- the parts of one iteration -----------------------------------------------------------
    def issue(self) -> None:
        plan = self.pipe.plan(self.fleet.workers())
        if plan:
            owed = self.pipe.take_owed(len(plan))
            orders = self.router.next_orders(len(plan), self.cfg.rollout.batch_size, owed)
            for worker, order in zip(plan, orders):
                self.pipe.issue(order.ticket, worker, len(order.items), order.items[0].route)
            for worker, call in as_calls(plan, orders, self.cfg.rollout.orders_per_worker):
                self.fleet.submit(worker, call)

    def collect(self, timeout: float) -> None:
        for ev in self.fleet.poll(timeout, self.learner.pending()):
            if isinstance(ev, RolledOut):
                self.pipe.rolled_out(ev.ticket)
            elif isinstance(ev, Routed):
                self.pipe.completed(ev.ticket, ev.handle, ev.version)
            elif isinstance(ev, Lost):
                self.pipe.lose(ev.ticket)
            elif isinstance(ev, NonFinite):
                self.nonfinite(self.pipe.refuse(ev.ticket, ev.route), f"teacher {ev.teacher} (route {ev.route})",
                               "batches", ev.what, "dropped")
            elif isinstance(ev, Applied):
                self.sync.applied(ev)
            elif isinstance(ev, Joined):
                self.pipe.worker_version[ev.worker] = ev.version
                self.sync.fleet_changed()
            elif isinstance(ev, Traced):
                write_traces(self.cfg.output_path, ev.traces)
        if self.cfg.sync.on_stale == "drop" and not self.pipe.in_flight and self.pipe.queued and not self.pipe.can_learn():
            self.pipe.purge()  # stale leftovers block issuing

    def learn(self) -> dict | None:
        """Start a learner step once a full step is queued; return its metrics when it is done."""
        if not self.learner.busy:
            take = None if self.stop_requested.is_set() else self.pipe.take()  # stopping: no new step
            if take is None or not take.handles:
                return None  # too few batches yet, or stale ones were dropped (on_stale: drop)
            self.last_lags = tuple(self.step - v for v in take.versions)
            self.lag_last = max(self.last_lags)
            self.lag_max = max(self.lag_max, self.lag_last)
            self._learn_t0 = time.perf_counter()
            self.learner.start_step(take.handles)
        result = self.learner.poll_step(self.cfg.deadlines.learner_step_s)
        if result is None:
            return None
        self.learner_busy_s += time.perf_counter() - self._learn_t0
        write_traces(self.cfg.output_path, result.pop("traces", {}))  # `logging.profile_steps`
        skipped = result.pop("skipped", None)
        if skipped:  # not a step: the weights did not move and the batches are replaced
            routes = ", ".join(sorted({q.route for q in self.pipe.training}))
            self.nonfinite(self.pipe.skip_step(), f"learner (route {routes})", "steps", skipped, "skipped")
            return None
        self.pipe.stepped()
        return result

    def nonfinite(self, in_a_row: int, who: str, units: str, what: str, fate: str) -> None:
        """A batch dropped or a step skipped for NaN/Inf (the pipeline counted it): a run of
        `learner.max_nonfinite_steps` of them ends the job in one line naming role and route."""
        limit = self.cfg.learner.max_nonfinite_steps
        if in_a_row >= limit:
            raise RoleFailure(f"{who}: {in_a_row} {units} in a row with NaN/Inf in the {what}, each {fate} "
                              f"(learner.max_nonfinite_steps={limit})")
        self.telemetry.console.print(f"{who}: NaN/Inf in the {what}, {fate} ({in_a_row} in a row; "
                                     f"learner.max_nonfinite_steps={limit})", highlight=False)

    def after_step(self, metrics: dict) -> None:
        idle = self.telemetry.after_step(self.snapshot(), metrics)
        if self.autoscaler is not None:
            active = len(self.fleet.workers())
            delta = self.autoscaler.observe(self.step, idle, len(self.pipe.queued), self.cfg.replay.capacity,
                                            active, self.fleet.can_grow())
            if delta:
                self.commands.put({"rollout_workers": active + delta})

    def checkpoint(self) -> None:
        first = self.pipe.first_unconsumed()
        self.last_ckpt = checkpoints.save(self.cfg, self.snapshot(), self.learner, self.router.state_before(first))
        self.router.forget_before(first)

    def _resume(self, path) -> None:
        r = checkpoints.resume(self.cfg, path, self.learner, self.mode)
        self.run_id = r.run_id
        # The run re-issues whole updates from the first unconsumed ticket. Its router state can sit
        # inside an update (routing.granularity update, after a lost or dropped batch let a later
        # ticket of that route be consumed first): close that update, else the job's last one would
        # stay short and never be learned. Without losses or drops it is closed already.
        self.router.load_state_dict(r.router)
        self.router.close_update()
        self.pipe.resume(r.step, r.next_ticket)
        self.learner.set_version(r.step)

    def finish(self) -> dict:
        """The end of a job, or a graceful stop: finish the running step, write the final
        checkpoint, let in-flight work land, close the accounting. After a stop request (a signal:
        the pod may be killed soon) the job is done within the rest of the running step, the
        checkpoint write and `checkpoint.stop_grace_s`: the grace, counted from the checkpoint (or
        from the request, if it came later), covers in-flight batches and evaluations together,
        and batches still in flight when it runs out are dropped as `stopped`."""
        self.state = "stopping"
        while self.learner.busy:  # a stop arrived mid-step: finish and count that step
            metrics = self.learn()
            if metrics is not None:
                self.after_step(metrics)
            else:
                time.sleep(0.01)
        if self.last_ckpt is None or not self.last_ckpt.endswith(f"{self.step:08d}"):
            self.checkpoint()  # the final (or graceful-stop) checkpoint
        self.sync.poll(block=True)
        while self.pipe.in_flight and (left := self._grace_left()) > 0:
            self.collect(timeout=min(1.0, left))
        abandoned = self.pipe.abandon("stopped")  # nothing is in flight unless the grace ran out
        self.pipe.drain("unconsumed")
        if not self.stop_requested.is_set():
            self.evaluate()  # the final weights
        self.report_evaluations(wait_s=min(self.cfg.eval.timeout_s, max(0.0, self._grace_left())))
        # Members still busy with abandoned batches would answer a statistics call only after
        # them (one call at a time): no idle ratios of the fleet then.
        busy = {} if abandoned else self.fleet.busy_stats()
        self.state = "done"
        return self.telemetry.summary(self.snapshot(), time.perf_counter() - self.t_start, busy)

    def _grace_left(self) -> float:
        """Seconds of `checkpoint.stop_grace_s` left (inf without a stop request); the grace
        starts at the first call after the request, which finish() makes once the final
        checkpoint is written."""
        if not self.stop_requested.is_set():
            return math.inf
        if self._grace_until is None:
            self._grace_until = time.perf_counter() + self.cfg.checkpoint.stop_grace_s
        return self._grace_until - time.perf_counter()

    def evaluate(self) -> None:
        """Evaluate the current weights (danceopd/evaluate.py): in Ray mode the evaluator actor
        samples and scores them while training goes on; results arrive in `report_evaluations`."""
        if self.evaluation is not None and self.eval_step != self.step:
            self.eval_step = self.step
            self.evaluation.submit(self.step, self.learner)

    def report_evaluations(self, wait_s: float = 0.0) -> None:
        """Finished evaluations to metrics.jsonl, the sample grids, Prometheus, /status, TensorBoard."""
        if self.evaluation is not None:
            for result in self.evaluation.poll(wait_s):
                self.telemetry.evaluated(self.snapshot(), result)

    # ---- control (called from the control API's threads) -------------------------------------------
    def status(self) -> dict:
        return self.telemetry.status(self.state)

    def request_scale(self, rollout_workers: int | None = None, teachers: dict | None = None) -> dict:
        """Validated here (the caller gets the error), applied by the loop between steps."""
        if not isinstance(self.fleet, Elastic):
            raise ValueError("scaling needs --mode ray: local mode runs one worker in this process")
        if rollout_workers is not None and (not isinstance(rollout_workers, int) or rollout_workers < 1):
            raise ValueError(f"rollout_workers: {rollout_workers!r} is not a positive integer")
        if rollout_workers is not None and rollout_workers > self.cfg.rollout.max_workers:
            raise ValueError(f"rollout_workers: {rollout_workers} is above rollout.max_workers={self.cfg.rollout.max_workers}")
        # Not capped by the nodes alive now: members the cluster cannot place yet are pending (the
        # Ray autoscaler sees their placement groups and adds nodes) and are removed cleanly after
        # deadlines.placement_s if it never does. Capped by what the cluster can ever hold.
        if rollout_workers is not None:
            self._within_cluster("rollout", rollout_workers, "rollout_workers")
        routes = {r.name for r in self.cfg.routing.routes}
        for route, n in (teachers or {}).items():
            if route not in routes:
                raise ValueError(f"teachers: unknown route {route!r} (known: {', '.join(sorted(routes))})")
            if not isinstance(n, int) or n < 1:
                raise ValueError(f"teachers.{route}: {n!r} is not a positive integer")
            cap = self.cfg.teacher(self.cfg.route(route).teacher).max_replicas
            if n > cap:
                raise ValueError(f"teachers.{route}: {n} is above teachers[{self.cfg.route(route).teacher}].max_replicas={cap}")
            self._within_cluster(f"teacher:{self.cfg.route(route).teacher}", n, f"teachers.{route}")
        self.commands.put({"rollout_workers": rollout_workers, "teachers": teachers or {}})
        return {"accepted": True, "rollout_workers": rollout_workers, "teachers": teachers or {}}

    def _within_cluster(self, role: str, n: int, what: str) -> None:
        limit = self.fleet.max_members(role)
        if limit is not None and n > limit[0]:
            raise ValueError(f"{what}: {n} is more than {limit[1]} can ever hold ({limit[0]})")

    def request_stop(self, reason: str = "/stop") -> None:
        self.stopped_by = self.stopped_by or reason
        self.state = "stopping"
        self.stop_requested.set()

    def apply_commands(self) -> None:
        if not isinstance(self.fleet, Elastic):
            return
        while not self.commands.empty():
            req = self.commands.get()
            for ev in self.fleet.scale(req.get("rollout_workers"), req.get("teachers", {})):
                self.pipe.worker_version[ev.worker] = ev.version
            self.sync.fleet_changed()
            self.telemetry.console.print(f"scaled: {self.fleet.counts()}", highlight=False)
        self.fleet.retire_drained(self.pipe.busy_workers())

    def shutdown(self) -> None:
        """Stop every part this loop started (all of them, or as many as a failed start got to)."""
        if self.telemetry is not None:
            self.telemetry.close()
        if self.evaluation is not None:
            self.evaluation.shutdown()
        if self.sync is not None:
            self.sync.close()
        if self.learner is not None:
            self.learner.shutdown()
        if self.fleet is not None:
            self.fleet.shutdown()


def make_router(cfg: Config, per_step: int) -> Router:
    """The job's router, in the driver: its dataset checked against the routes first."""
    from danceopd.methods import make_method

    dataset = Dataset.load(cfg.resolve(cfg.data.path))
    dataset.check_routes(cfg.routing.routes)
    return Router(cfg.routing, dataset, cfg.job.seed, per_step, make_method(cfg.method).group_size())


def train(cfg: Config, mode: str = "local", address: str | None = None, resume_from=None, show_progress: bool = True,
          run_id: str | None = None) -> dict:
    """Run one job to the end; in Ray mode join `address` or start a local cluster for it."""
    from services.conditions import build_condition_cache

    started = False
    if mode == "ray":
        from services.runtime.cluster import connect

        started = connect(cfg, address)
    loop = None
    try:
        with StopOnSignal() as stop:  # after connecting: ray.init sets its own SIGTERM handler
            # A no-op when it is current; in Ray mode built on a worker node, never in this process.
            build_condition_cache(cfg, progress=show_progress, mode=mode)
            loop = TrainLoop(cfg, mode, resume_from=resume_from, show_progress=show_progress, run_id=run_id)
            stop.loop = loop
            return loop.run()
    finally:
        if loop is not None:
            loop.shutdown()
        if started:
            import ray

            ray.shutdown()
