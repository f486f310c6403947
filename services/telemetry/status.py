"""Job-level telemetry: the progress log, Prometheus job metrics, `/status`, and idle ratios.

The training loop calls `after_step(state, metrics)` once per learner step and `summary(state,
...)` at the end; everything it reports is read off `state`, a `LoopState` snapshot. In Ray mode it
also serves the controller's metrics and the control API (`serve=True`); local mode only logs.
"""

from __future__ import annotations

import collections
import time
from typing import TYPE_CHECKING

from danceopd.profiling import PROFILE_DIR
from services.telemetry.metrics import ROLES
from services.telemetry.progress import JobLog
from services.telemetry.trackers import Trackers, eval_scalars, step_scalars

if TYPE_CHECKING:  # annotations only: no import cycle, no cost
    from danceopd.config import Config


class Telemetry:
    def __init__(self, cfg: Config, start_step: int, show_progress: bool, serve: bool, control_fns=None, *, run_id: str):
        self.cfg, self.run_id = cfg, run_id  # the run_id labels every served series
        self.started_at = time.time()  # /health and the stall alert count from here until the first step
        self.log = JobLog(cfg, start_step, show_progress)
        self.console = self.log.console
        self.metrics = self.control = None
        self.control_url = None
        self.step_times: collections.deque = collections.deque(maxlen=11)
        self.synced_reported = 0
        self.restarts_reported: collections.Counter = collections.Counter()
        self.dropped_reported: collections.Counter = collections.Counter()
        self.nonfinite_reported: collections.Counter = collections.Counter()
        self._status: dict = {"job": cfg.job.name, "step": start_step, "steps": cfg.learner.steps, "workers": {}}
        self.evals: list[dict] = []  # {step, seconds, routes} of every evaluation reported
        self.end_status = "KILLED"  # of the trackers' run: FINISHED at summary(), FAILED at failed()
        self.trackers = Trackers.open(cfg, start_step, run_id, self.console)  # TensorBoard, MLflow, W&B
        if serve:
            self._serve(control_fns)

    def _serve(self, control_fns) -> None:
        from services.control.api import ControlServer
        from services.control.registry import register
        from services.control.requests import resolve_token
        from services.telemetry.metrics import ControllerMetrics, controller_port, job_labels

        cfg = self.cfg
        port = cfg.control.metrics_port if cfg.control.metrics_port is not None else controller_port()
        # /metrics and the control API bind apart: a cluster opens metrics_host, never the API.
        labels = job_labels(cfg.job.name, self.run_id)
        try:
            self.metrics = ControllerMetrics(port, labels, host=cfg.control.metrics_host)
        except OSError:  # the default port is taken (another job on this host): any free port
            self.metrics = ControllerMetrics(0, labels, host=cfg.control.metrics_host)
            self.console.print(f"[yellow]metrics port {port} is busy; serving on {self.metrics.port}[/]")
        self.metrics.set("danceopd_policy_lag_bound", cfg.sync.max_policy_lag)
        self.metrics.set("danceopd_start_timestamp_seconds", self.started_at)
        self.metrics.set("danceopd_stall_after_seconds", cfg.control.stall_after_s)
        self.metrics.set("danceopd_replay_capacity", cfg.replay.capacity)
        for role in ROLES:
            for name in ("danceopd_restarts", "danceopd_failures"):
                self.metrics.inc(name, 0, role=role)  # the series exist from the start
        for route in cfg.routing.routes:  # so does each route's NaN/Inf count: a rate of 0, not "no data"
            for role in ("teacher", "learner"):
                self.metrics.inc("danceopd_nonfinite", 0, role=role, route=route.name)
        token = resolve_token(cfg.control.token_env)
        status_fn, scale_fn, stop_fn = control_fns
        self.control = ControlServer(cfg.control.host, cfg.control.port, token, status_fn, scale_fn, stop_fn,
                                     stall_after_s=cfg.control.stall_after_s)
        self.control.start()
        self.control_url = self.control.url  # brackets an IPv6 address; a wildcard bind is reached over loopback
        register(cfg.job.name, self.control_url, token)

    # ---- per step ---------------------------------------------------------------------------
    def learner_idle(self, busy_s: float) -> float:
        """Idle ratio of the learner over the last ten steps."""
        self.step_times.append((time.perf_counter(), busy_s))
        (t_old, busy_old), (t_new, busy_new) = self.step_times[0], self.step_times[-1]
        return max(0.0, 1 - (busy_new - busy_old) / (t_new - t_old)) if t_new > t_old else 0.0

    def after_step(self, st, metrics: dict) -> float:
        idle = self.learner_idle(st.learner_busy_s)
        counts = st.fleet.counts
        samples = st.per_step * self.cfg.rollout.batch_size
        new_syncs = st.syncs[self.synced_reported:]
        self.log.step(st.step, metrics, samples=samples, lag=st.lag_last, workers=counts)
        self.trackers.scalars(st.step, step_scalars(metrics, self.log.samples_per_s(), st.lag_last, idle, new_syncs))
        m = self.metrics
        if m is not None:
            m.set("danceopd_learner_step", st.step)
            m.set("danceopd_last_step_timestamp_seconds", time.time())
            for route, loss in metrics["route_loss"].items():
                m.set("danceopd_loss", loss, route=route)
            m.set("danceopd_grad_norm", metrics["grad_norm"])
            m.set("danceopd_learning_rate", metrics["lr"])
            m.inc("danceopd_samples_consumed", samples)
            m.set("danceopd_samples_per_second", self.log.samples_per_s())
            m.set("danceopd_learner_idle_ratio", idle)
            m.set("danceopd_weight_version", st.step)
            m.set("danceopd_policy_lag_last", st.lag_last)
            for lag in st.last_lags:
                m.observe("danceopd_policy_lag", lag)
            for role, n in counts.items():
                m.set("danceopd_workers", n, role=role)
            for s in new_syncs:
                m.observe("danceopd_weight_sync_seconds", s["seconds"])
                m.observe("danceopd_weight_sync_transfer_seconds", s["transfer_s"])
                m.observe("danceopd_weight_sync_wait_seconds", s["wait_s"])
                m.set("danceopd_weight_sync_bytes", s["bytes"])
            self._report_fleet(st)
        self.synced_reported = len(st.syncs)
        acct = st.accounting
        self._status = {
            "job": self.cfg.job.name, "state": st.state, "step": st.step, "steps": self.cfg.learner.steps,
            "samples_per_s": round(self.log.samples_per_s(), 3),
            "lag_last": st.lag_last, "lag_max": st.lag_max, "lag_bound": self.cfg.sync.max_policy_lag,
            "replay_depth": st.replay["depth"], "learner_idle_ratio": round(idle, 4),
            "batches": dict(st.batches),
            "samples": {k: acct[k] for k in ("issued", "produced", "consumed", "lost")},
            "workers": {"rollout": counts["rollout"], "learner": counts["learner"], "teacher": st.fleet.teacher_counts},
            "last_checkpoint": st.last_checkpoint, "last_step_time": time.time(),
            "output_dir": self.cfg.output_location, "restarts": st.fleet.restarts, "failures": st.fleet.failures,
            "pending": st.fleet.pending, "eval": self.eval_summary(st), "nonfinite": st.nonfinite,
        }
        return idle

    # ---- evaluations --------------------------------------------------------------------------
    def evaluated(self, st, result: dict) -> None:
        """One finished evaluation (danceopd/evaluate.py) to every place that shows it."""
        self.log.evaluation(result)
        self.evals.append({k: result[k] for k in ("step", "seconds", "routes")})
        m = self.metrics
        if m is not None:
            for route, metrics in result["routes"].items():
                for name, value in metrics.items():
                    m.set("danceopd_eval_metric", value, route=route, metric=name)
            m.set("danceopd_eval_seconds", result["seconds"])
            m.set("danceopd_eval_step", result["step"])
        self.trackers.scalars(result["step"], eval_scalars(result))
        for route, grid in result["grids"].items():
            self.trackers.image(f"samples/{route}", result["step"], grid)
        self._status["eval"] = self.eval_summary(st)

    def eval_summary(self, st, first: bool = False) -> dict | None:
        """The last evaluation and what evaluating cost (`/status`; summary.json adds the first)."""
        ev = st.evaluation
        if ev is None:
            return None
        last = self.evals[-1] if self.evals else None
        secs = [e["seconds"] for e in self.evals]
        out = {"where": ev["where"], "evaluations": len(self.evals), "skipped": ev["skipped"], "failed": ev["failed"],
               "seconds_mean": round(sum(secs) / len(secs), 4) if secs else None,
               "step": last and last["step"], "routes": last and last["routes"],
               "samples_dir": str(self.cfg.output_path / "samples")}
        if first:
            out["first"] = self.evals[0] if self.evals else None
        return out

    def _report_fleet(self, st) -> None:
        """Restarts and failures by role (counters), members waiting for placement and the replay
        queue (gauges), dropped samples by reason and NaN/Inf caught by role and route (counters)."""
        m = self.metrics
        for name, counts in (("danceopd_restarts", st.fleet.restarts), ("danceopd_failures", st.fleet.failures)):
            for role, n in counts.items():
                if n > self.restarts_reported[name, role]:
                    m.inc(name, n - self.restarts_reported[name, role], role=role)
                    self.restarts_reported[name, role] = n
        for role, n in st.fleet.pending.items():
            m.set("danceopd_workers_pending", n, role=role)
        m.set("danceopd_replay_depth", st.replay["depth"])
        for reason, n in st.accounting["dropped"].items():
            if n > self.dropped_reported[reason]:
                m.inc("danceopd_dropped_samples", n - self.dropped_reported[reason], reason=reason)
                self.dropped_reported[reason] = n
        for role, routes in st.nonfinite.items():
            for route, n in routes.items():
                if n > self.nonfinite_reported[role, route]:
                    m.inc("danceopd_nonfinite", n - self.nonfinite_reported[role, route], role=role, route=route)
                    self.nonfinite_reported[role, route] = n

    def failed(self, st, error: BaseException) -> None:
        """The job is failing: count it where a scrape or /status can still see it."""
        self.end_status = "FAILED"
        self._status = {**self._status, "state": "failed", "nonfinite": st.nonfinite,
                        "error": str(error).splitlines()[0] if str(error) else type(error).__name__}
        if self.metrics is not None:
            if st.learner_failed:
                self.metrics.inc("danceopd_failures", 1, role="learner")
            self._report_fleet(st)

    def status(self, state: str) -> dict:
        st = dict(self._status)
        st["state"] = state
        st["last_step_age_s"] = round(time.time() - st["last_step_time"], 3) if st.get("last_step_time") else None
        st["uptime_s"] = round(time.time() - self.started_at, 3)
        return st

    # ---- end of job -----------------------------------------------------------------------------
    def summary(self, st, wall_s: float, busy: dict) -> dict:
        """summary.json: `st` at the end, `busy` the fleet's per-member statistics."""
        from services.telemetry.plots import write_curves

        if self.metrics is not None:
            self._report_fleet(st)  # the end-of-job drain's drops too
        idle = {role: round(max(0.0, 1 - sum(x["busy_s"] for x in stats) / (len(stats) * max(wall_s, 1e-9))), 4)
                for role, stats in busy.items() if stats}
        idle["learner"] = round(max(0.0, 1 - st.learner_busy_s / max(wall_s, 1e-9)), 4)
        recs = st.syncs

        def mean(key):
            return round(sum(s[key] for s in recs) / max(len(recs), 1), 5)

        extra = {"replay": st.replay, "accounting": st.accounting, "nonfinite": st.nonfinite,
                 "restarts": st.fleet.restarts, "learner_idle_ratio": idle["learner"], "idle_ratio": idle,
                 "wall_s": round(wall_s, 3), "lag_max": st.lag_max, "weight_syncs": len(recs),
                 "sync_seconds_mean": mean("seconds"), "sync_transfer_seconds_mean": mean("transfer_s"),
                 "sync_wait_seconds_mean": mean("wait_s"), "sync_bytes": recs[-1]["bytes"] if recs else 0,
                 "eval_start": self._headlines(0), "eval_end": self._headlines(-1),
                 "eval": self.eval_summary(st, first=True),
                 "nfe": sum(x.get("nfe", 0) for x in busy.get("rollout", [])),
                 "nfe_full": sum(x.get("nfe_full", 0) for x in busy.get("rollout", [])), "mode": st.mode,
                 "stopped_by": st.stopped_by}
        extra.update(self._per_role(st, busy, wall_s))
        extra["plots"] = [str(p) for p in write_curves(self.cfg.output_path)]
        self.trackers.scalars(st.step, {f"idle/{role}_job": v for role, v in idle.items()})  # over the whole job
        if (tb := self.trackers.get("tensorboard")) is not None:
            extra["tensorboard"] = str(tb.folder)
        if (ml := self.trackers.get("mlflow")) is not None:
            extra["mlflow"] = {"uri": ml.uri, "experiment_id": ml.experiment_id, "run_id": ml.run_id}
        if self.cfg.logging.profile_steps:
            extra["profile"] = sorted(str(p) for p in (self.cfg.output_path / PROFILE_DIR).glob("*.json"))
        self.end_status = "FINISHED"
        return self.log.finish(st.last_checkpoint, extra=extra)

    def _per_role(self, st, busy: dict, wall_s: float) -> dict:
        """summary.json's figures per role, beside the learner's `samples_per_s`: rollout samples
        and teacher rows per second of the job, the learner's mean step, and the peak GPU memory
        each role's process allocated (its fullest member; 0 without CUDA; --mode local: one
        process holds every role)."""
        wall = max(wall_s, 1e-9)
        steps = max(st.step - self.log.start_step, 1)
        peak = {role: max(x["peak_gpu_memory_bytes"] for x in stats) for role, stats in busy.items()
                if stats and all("peak_gpu_memory_bytes" in x for x in stats)}  # the roles that hold models
        peak["learner"] = self.log.last.get("peak_gpu_memory_bytes", 0)
        return {"rollout_samples_per_s": round(sum(x.get("samples", 0) for x in busy.get("rollout", [])) / wall, 3),
                "teacher_rows_per_s": round(sum(x.get("rows", 0) for x in busy.get("teacher", [])) / wall, 3),
                "learner_step_seconds_mean": round(st.learner_busy_s / steps, 4), "peak_gpu_memory_bytes": peak}

    def _headlines(self, i: int) -> dict[str, float] | None:
        """{route: headline metric} of the first (i=0) or last (i=-1) evaluation."""
        from danceopd.evaluate import headline

        if not self.evals:
            return None
        return {r: h[1] for r, m in self.evals[i]["routes"].items() if (h := headline(m))}

    def close(self) -> None:
        self.log.close()
        self.trackers.close(self.end_status)
        if self.control is not None:
            from services.control.registry import unregister

            unregister(self.cfg.job.name)
            self.control.stop()
        if self.metrics is not None:
            self.metrics.close()
