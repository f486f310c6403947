"""Job-level telemetry: the progress log, Prometheus job metrics, `/status`, and idle ratios.

The training loop calls `after_step(loop, metrics)` once per learner step and `summary(loop)` at
the end; everything it reports is read off the loop, the pipeline and the fleet. In Ray mode it
also serves the controller's metrics and the control API (`serve=True`); local mode only logs.
"""

from __future__ import annotations

import collections
import time

from services.telemetry.progress import JobLog


class Telemetry:
    def __init__(self, cfg, start_step: int, show_progress: bool, serve: bool, control_fns=None):
        self.cfg = cfg
        self.started_at = time.time()  # /health and the stall alert count from here until the first step
        self.log = JobLog(cfg, start_step, show_progress)
        self.console = self.log.console
        self.metrics = self.control = None
        self.control_url = None
        self.step_times: collections.deque = collections.deque(maxlen=11)
        self.synced_reported = 0
        self.restarts_reported: collections.Counter = collections.Counter()
        self._status: dict = {"job": cfg.job.name, "step": start_step, "steps": cfg.learner.steps, "workers": {}}
        self.evals: list[dict] = []  # {step, seconds, routes} of every evaluation reported
        self.board = None
        if cfg.logging.tensorboard:
            from services.telemetry.board import Board

            self.board = Board(cfg.output_path / "tensorboard", purge_step=start_step)
        if serve:
            self._serve(control_fns)

    def _serve(self, control_fns) -> None:
        from services.control.api import ControlServer, register, resolve_token
        from services.telemetry.metrics import ControllerMetrics, controller_port

        cfg = self.cfg
        port = cfg.control.metrics_port if cfg.control.metrics_port is not None else controller_port()
        # /metrics and the control API bind apart: a cluster opens metrics_host, never the API.
        try:
            self.metrics = ControllerMetrics(port, host=cfg.control.metrics_host)
        except OSError:  # the default port is taken (another job on this host): any free port
            self.metrics = ControllerMetrics(0, host=cfg.control.metrics_host)
            self.console.print(f"[yellow]metrics port {port} is busy; serving on {self.metrics.port}[/]")
        self.metrics.set("danceopd_policy_lag_bound", cfg.sync.max_policy_lag)
        self.metrics.set("danceopd_start_timestamp_seconds", self.started_at)
        self.metrics.set("danceopd_stall_after_seconds", cfg.control.stall_after_s)
        for role in ("rollout", "teacher", "learner", "router", "replay", "weight_store"):
            for name in ("danceopd_restarts", "danceopd_failures"):
                self.metrics.inc(name, 0, role=role)  # the series exist from the start
        token = resolve_token(cfg.control.token_env)
        status_fn, scale_fn, stop_fn = control_fns
        self.control = ControlServer(cfg.control.host, cfg.control.port, token, status_fn, scale_fn, stop_fn,
                                     stall_after_s=cfg.control.stall_after_s)
        host, cport = self.control.start()
        self.control_url = f"http://{host}:{cport}"
        register(cfg.job.name, self.control_url, token)

    # ---- per step ---------------------------------------------------------------------------
    def learner_idle(self, busy_s: float) -> float:
        """Idle ratio of the learner over the last ten steps."""
        self.step_times.append((time.perf_counter(), busy_s))
        (t_old, busy_old), (t_new, busy_new) = self.step_times[0], self.step_times[-1]
        return max(0.0, 1 - (busy_new - busy_old) / (t_new - t_old)) if t_new > t_old else 0.0

    def after_step(self, loop, metrics: dict) -> float:
        idle = self.learner_idle(loop.learner_busy_s)
        counts = loop.fleet.counts()
        samples = loop.per_step * self.cfg.rollout.batch_size
        self.log.step(loop.step, metrics, samples=samples, lag=loop.lag_last, workers=counts)
        if self.board is not None:
            self.board.step(loop.step, metrics, self.log.samples_per_s(), loop.lag_last, idle,
                            loop.sync.records[self.synced_reported:])
        restarts = loop.fleet.restarts()
        m = self.metrics
        if m is not None:
            m.set("danceopd_learner_step", loop.step)
            m.set("danceopd_last_step_timestamp_seconds", time.time())
            for route, loss in metrics["route_loss"].items():
                m.set("danceopd_loss", loss, route=route)
            m.set("danceopd_grad_norm", metrics["grad_norm"])
            m.set("danceopd_learning_rate", metrics["lr"])
            m.inc("danceopd_samples_consumed", samples)
            m.set("danceopd_samples_per_second", self.log.samples_per_s())
            m.set("danceopd_learner_idle_ratio", idle)
            m.set("danceopd_weight_version", loop.version)
            m.set("danceopd_policy_lag_last", loop.lag_last)
            for role, n in counts.items():
                m.set("danceopd_workers", n, role=role)
            for s in loop.sync.records[self.synced_reported:]:
                m.observe("danceopd_weight_sync_seconds", s["seconds"])
                m.observe("danceopd_weight_sync_transfer_seconds", s["transfer_s"])
                m.observe("danceopd_weight_sync_wait_seconds", s["wait_s"])
                m.set("danceopd_weight_sync_bytes", s["bytes"])
            self._report_fleet(loop)
        self.synced_reported = len(loop.sync.records)
        acct = loop.pipe.accounting()
        self._status = {
            "job": self.cfg.job.name, "state": loop.state, "step": loop.step, "steps": self.cfg.learner.steps,
            "samples_per_s": round(self.log.samples_per_s(), 3),
            "lag_last": loop.lag_last, "lag_max": loop.lag_max, "lag_bound": self.cfg.sync.max_policy_lag,
            "replay_depth": len(loop.pipe.queued), "learner_idle_ratio": round(idle, 4),
            "batches": {"issued": loop.pipe.next_ticket, "in_flight": len(loop.pipe.in_flight),
                        "queued": len(loop.pipe.queued)},
            "samples": {k: acct[k] for k in ("issued", "produced", "consumed", "lost")},
            "workers": {"rollout": counts["rollout"], "learner": counts["learner"],
                        "teacher": loop.fleet.teacher_counts()},
            "last_checkpoint": loop.last_ckpt, "last_step_time": time.time(), "output_dir": str(self.cfg.output_path),
            "restarts": restarts, "failures": loop.fleet.failures(), "pending": loop.fleet.pending_counts(),
            "eval": self.eval_summary(loop),
        }
        return idle

    # ---- evaluations --------------------------------------------------------------------------
    def evaluated(self, loop, result: dict) -> None:
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
        if self.board is not None:
            self.board.evaluated(result)
        self._status["eval"] = self.eval_summary(loop)

    def eval_summary(self, loop, first: bool = False) -> dict | None:
        """The last evaluation and what evaluating cost (`/status`; summary.json adds the first)."""
        ev = loop.evaluation
        if ev is None:
            return None
        last = self.evals[-1] if self.evals else None
        secs = [e["seconds"] for e in self.evals]
        out = {"where": ev.where, "evaluations": len(self.evals), "skipped": ev.skipped, "failed": ev.failed,
               "seconds_mean": round(sum(secs) / len(secs), 4) if secs else None,
               "step": last and last["step"], "routes": last and last["routes"],
               "samples_dir": str(self.cfg.output_path / "samples")}
        if first:
            out["first"] = self.evals[0] if self.evals else None
        return out

    def _report_fleet(self, loop) -> None:
        """Restarts and failures by role (counters), members waiting for placement (gauge)."""
        m = self.metrics
        for name, counts in (("danceopd_restarts", loop.fleet.restarts()), ("danceopd_failures", loop.fleet.failures())):
            for role, n in counts.items():
                if n > self.restarts_reported[name, role]:
                    m.inc(name, n - self.restarts_reported[name, role], role=role)
                    self.restarts_reported[name, role] = n
        for role, n in loop.fleet.pending_counts().items():
            m.set("danceopd_workers_pending", n, role=role)

    def failed(self, loop, error: BaseException) -> None:
        """The job is failing: count it where a scrape or /status can still see it."""
        self._status = {**self._status, "state": "failed", "error": str(error).splitlines()[0] if str(error) else type(error).__name__}
        if self.metrics is not None:
            if getattr(loop.learner, "failed", None):
                self.metrics.inc("danceopd_failures", 1, role="learner")
            self._report_fleet(loop)

    def status(self, state: str) -> dict:
        st = dict(self._status)
        st["state"] = state
        st["last_step_age_s"] = round(time.time() - st["last_step_time"], 3) if st.get("last_step_time") else None
        st["uptime_s"] = round(time.time() - self.started_at, 3)
        return st

    # ---- end of job -----------------------------------------------------------------------------
    def summary(self, loop, wall_s: float) -> dict:
        from services.telemetry.plots import write_curves

        busy = loop.fleet.busy_stats()
        idle = {role: round(max(0.0, 1 - sum(x["busy_s"] for x in stats) / (len(stats) * max(wall_s, 1e-9))), 4)
                for role, stats in busy.items() if stats}
        idle["learner"] = round(max(0.0, 1 - loop.learner_busy_s / max(wall_s, 1e-9)), 4)
        recs = loop.sync.records

        def mean(key):
            return round(sum(s[key] for s in recs) / max(len(recs), 1), 5)

        extra = {"replay": loop.fleet.replay_stats(), "accounting": loop.pipe.accounting(),
                 "restarts": loop.fleet.restarts(), "learner_idle_ratio": idle["learner"], "idle_ratio": idle,
                 "wall_s": round(wall_s, 3), "lag_max": loop.lag_max, "weight_syncs": len(recs),
                 "sync_seconds_mean": mean("seconds"), "sync_transfer_seconds_mean": mean("transfer_s"),
                 "sync_wait_seconds_mean": mean("wait_s"), "sync_bytes": recs[-1]["bytes"] if recs else 0,
                 "eval_start": self._headlines(0), "eval_end": self._headlines(-1),
                 "eval": self.eval_summary(loop, first=True),
                 "nfe": sum(x.get("nfe", 0) for x in busy.get("rollout", [])),
                 "nfe_full": sum(x.get("nfe_full", 0) for x in busy.get("rollout", [])), "mode": loop.fleet.mode,
                 "stopped_by": loop.stopped_by}
        extra["plots"] = [str(p) for p in write_curves(self.cfg.output_path)]
        if self.board is not None:
            self.board.idle(loop.step, idle)
            extra["tensorboard"] = str(self.board.folder)
        return self.log.finish(loop.last_ckpt, extra=extra)

    def _headlines(self, i: int) -> dict[str, float] | None:
        """{route: headline metric} of the first (i=0) or last (i=-1) evaluation."""
        from danceopd.evaluate import headline

        if not self.evals:
            return None
        return {r: h[1] for r, m in self.evals[i]["routes"].items() if (h := headline(m))}

    def close(self) -> None:
        self.log.close()
        if self.board is not None:
            self.board.close()
        if self.control is not None:
            from services.control.api import unregister

            unregister(self.cfg.job.name)
            self.control.stop()
        if self.metrics is not None:
            self.metrics.close()
