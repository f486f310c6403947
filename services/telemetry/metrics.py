"""Every DanceOPD metric, declared once, and the two thin recorders that write them.

Actors record with `ActorMetrics` (ray.util.metrics; Ray's per-node agent exports them) and the
driver records job-level metrics with `ControllerMetrics` (prometheus_client on its own port).
`deploy/grafana/danceopd.json` and `deploy/prometheus/alerts.yml` are written against
`exported_name()`, and tests/test_deploy.py checks every name they use against this list.

Every series carries `job` (the config's job.name) and `run_id` (output_dir/run.json, kept over a
resume), so one Prometheus tells jobs and runs apart on a shared cluster. Prometheus sets a `job`
of its own at scrape time: the scrape configs use `honor_labels: true` (the PodMonitor
`honorLabels: true`) so the series' `job` wins; Ray's own series, which carry none, keep the
scrape's.

How Ray 2.60 exports `ray.util.metrics` (observed on a local cluster, `ray.init(...,
_metrics_export_port=P)`, then `curl :P/metrics`):
- the name gets a `ray_` prefix; counters also get `_total` (a name already ending in `_total`
  is not doubled, so declared names never end in it); histograms appear as `_bucket` (with
  `le`), `_sum` and `_count`; gauges keep the name.
- Ray adds the labels Component ("core_worker"), NodeAddress, SessionName, Version, WorkerId
  (the process, so a restarted actor starts a new series; our `worker` label stays stable) and
  otel_scope_*; Prometheus adds `job` and `instance`.
- a record shows up after about 10 s (the agent's report interval), so scrape every 10-15 s.
- a histogram's `_sum` is rebuilt from bucket midpoints (the +Inf bucket counts as twice the
  last bound), so sum/count is only an estimate: dashboards use histogram_quantile.
- a killed actor's gauges vanish from the export; its counters and histograms stay.
- the service-discovery file /tmp/ray/prom_metrics_service_discovery.json (a link into the
  session folder) is written only while the Ray dashboard runs (not with include_dashboard=False);
  it lists every node's export port plus the dashboard's and autoscaler's metrics ports.
- recording before ray.init (local mode) is a silent no-op.
prometheus_client (controller) exposes counters as `<name>_total` and histograms as
`_bucket/_sum/_count`, plus `_created` series for both.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

MetricType = Literal["counter", "gauge", "histogram"]
Scope = Literal["actor", "controller"]

ROLES = ("rollout", "router", "teacher", "learner")
JOB_LABELS = ("job", "run_id")  # on every series, set by the recorder (see the module docstring)
DEFAULT_CONTROLLER_PORT = 9095  # Ray's own export port is 8080 in the KubeRay manifests
CONTROLLER_PORT_ENV = "DANCEOPD_METRICS_PORT"


@dataclass(frozen=True)
class Metric:
    name: str
    type: MetricType
    scope: Scope  # who records it: Ray actors (`ray_` prefix) or the controller process
    labels: tuple[str, ...]
    help: str
    buckets: tuple[float, ...] = ()


_A = ("role", "worker")  # always on actor metrics
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Lag is an integer: half-integer bounds put each lag in its own bucket (le="0.5" counts exactly
# on-policy samples), and Ray refuses bounds <= 0.
_LAG = (0.5, 1.5, 2.5, 3.5, 4.5, 8.5, 16.5, 32.5)
_SYNC = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

_DECLARED = (
    # ---- actors (ray.util.metrics) ---------------------------------------------------------
    Metric("danceopd_rollout_samples", "counter", "actor", (*_A, "route"), "Samples a rollout worker produced."),
    Metric("danceopd_rollout_nfes", "counter", "actor", (*_A, "route"), "Student network evaluations spent on rollouts."),
    Metric("danceopd_rollout_latency_seconds", "histogram", "actor", _A, "Seconds per rollout batch.", _LATENCY),
    Metric("danceopd_rollout_idle_ratio", "gauge", "actor", _A, "Fraction of wall time a rollout worker waited (weights, backpressure, no order)."),
    Metric("danceopd_teacher_queries", "counter", "actor", (*_A, "teacher", "route"), "States a teacher replica answered."),
    Metric("danceopd_teacher_latency_seconds", "histogram", "actor", (*_A, "teacher"), "Seconds per teacher call (one routed batch).", _LATENCY),
    Metric("danceopd_router_backlog", "gauge", "actor", (*_A, "route"), "Batches the router is scoring right now (waiting for teacher answers), per route."),
    # ---- controller (prometheus_client in the driver) --------------------------------------
    Metric("danceopd_learner_step", "gauge", "controller", (), "Optimizer steps done."),
    Metric("danceopd_replay_depth", "gauge", "controller", (), "Routed batches in the replay queue (the driver's pipeline)."),
    Metric("danceopd_replay_capacity", "gauge", "controller", (), "Routed batches the pipeline holds (in flight + queued) before backpressure."),
    Metric("danceopd_dropped_samples", "counter", "controller", ("reason",), "Samples dropped, by reason (stale, unconsumed, nonfinite, stopped)."),
    Metric("danceopd_nonfinite", "counter", "controller", ("role", "route"), "NaN/Inf caught: routed batches dropped (role teacher: its answer) and learner steps skipped (role learner: prediction, loss or gradient norm)."),
    Metric("danceopd_policy_lag", "histogram", "controller", (), "Learner version minus sample version of each consumed batch.", _LAG),
    Metric("danceopd_last_step_timestamp_seconds", "gauge", "controller", (), "Unix time of the last learner step (0 before the first)."),
    Metric("danceopd_start_timestamp_seconds", "gauge", "controller", (), "Unix time the controller started: the stall alert counts from it until the first step."),
    Metric("danceopd_stall_after_seconds", "gauge", "controller", (), "control.stall_after_s of the job: the bound /health and the stall alert use."),
    Metric("danceopd_loss", "gauge", "controller", ("route",), "Training loss of the last step, per route."),
    Metric("danceopd_grad_norm", "gauge", "controller", (), "Global gradient norm of the last step (before clipping)."),
    Metric("danceopd_learning_rate", "gauge", "controller", (), "Learning rate of the last step."),
    Metric("danceopd_samples_consumed", "counter", "controller", (), "Samples the learner trained on."),
    Metric("danceopd_samples_per_second", "gauge", "controller", (), "Learner throughput in samples/s since the job started."),
    Metric("danceopd_learner_idle_ratio", "gauge", "controller", (), "Fraction of wall time the learner waited for data."),
    Metric("danceopd_policy_lag_bound", "gauge", "controller", (), "sync.max_policy_lag of the job (the bound the lag alert uses)."),
    Metric("danceopd_policy_lag_last", "gauge", "controller", (), "Learner version minus the oldest sample version of the last step (the current lag; the histogram has its distribution)."),
    Metric("danceopd_weight_sync_seconds", "histogram", "controller", (), "Seconds from weight export until every live worker applied it (transfer plus waiting for each worker's current batch).", _SYNC),
    Metric("danceopd_weight_sync_transfer_seconds", "histogram", "controller", (), "Seconds the slowest worker spent fetching and applying one weight version (the transfer itself).", _SYNC),
    Metric("danceopd_weight_sync_wait_seconds", "histogram", "controller", (), "Seconds a weight version waited for the slowest worker to finish its current batch.", _SYNC),
    Metric("danceopd_weight_sync_bytes", "gauge", "controller", (), "Bytes of one weight sync (the exported state)."),
    Metric("danceopd_weight_version", "gauge", "controller", (), "Latest published weight version."),
    Metric("danceopd_workers", "gauge", "controller", ("role",), "Live actors by role."),
    Metric("danceopd_restarts", "counter", "controller", ("role",), "Actor restarts by role."),
    Metric("danceopd_failures", "counter", "controller", ("role",), "Member failures by role (deaths and missed deadlines, the fatal last one included)."),
    Metric("danceopd_workers_pending", "gauge", "controller", ("role",), "Members asked for and not yet placed by the cluster (they time out after deadlines.placement_s)."),
    Metric("danceopd_eval_metric", "gauge", "controller", ("route", "metric"), "Last evaluation of the student, per route and metric (danceopd/evaluate.py: target_error, gt_rmse, teacher_rmse, attr_acc, preservation)."),
    Metric("danceopd_eval_seconds", "gauge", "controller", (), "Seconds the last evaluation took on the evaluator (Ray mode: its own actor, off the learner's path)."),
    Metric("danceopd_eval_step", "gauge", "controller", (), "Learner step whose weights the last evaluation scored."),
)
METRICS: dict[str, Metric] = {m.name: m for m in _DECLARED}


def exported_name(name: str) -> str:
    """The name Prometheus stores: `ray_` for actor metrics, `_total` for counters. For a
    histogram it is the base of its `_bucket`/`_sum`/`_count` series."""
    m = _declared(name)
    base = ("ray_" if m.scope == "actor" else "") + m.name
    return base + "_total" if m.type == "counter" else base


def exported_series(name: str) -> tuple[str, ...]:
    """Every series name a dashboard may query for one metric."""
    base = exported_name(name)
    if METRICS[name].type == "histogram":
        return (f"{base}_bucket", f"{base}_sum", f"{base}_count")
    return (base,)


def controller_port() -> int:
    """Port of the controller's /metrics: $DANCEOPD_METRICS_PORT, else the default the
    manifests and prometheus.yml expect."""
    return int(os.environ.get(CONTROLLER_PORT_ENV, DEFAULT_CONTROLLER_PORT))


def _declared(name: str) -> Metric:
    if name not in METRICS:
        raise ValueError(f"metric {name!r} is not declared in services/telemetry/metrics.py")
    return METRICS[name]


def job_labels(job: str, run_id: str) -> dict[str, str]:
    """The labels every series of one run carries."""
    if not job or not run_id:
        raise ValueError(f"metrics need a job name and a run id, got job={job!r} run_id={run_id!r}")
    return {"job": str(job), "run_id": str(run_id)}


def _check(name: str, scope: Scope, kind: MetricType, labels: dict, implicit: tuple[str, ...]) -> Metric:
    m = _declared(name)
    if m.scope != scope:
        raise ValueError(f"metric {name!r} is recorded by the {m.scope}, not here (its exported name would differ)")
    if m.type != kind:
        raise ValueError(f"metric {name!r} is a {m.type}, not a {kind}")
    want = set(m.labels) - set(implicit)  # JOB_LABELS are never the caller's: the recorder sets them
    if set(labels) != want:
        raise ValueError(f"metric {name!r} takes labels {sorted(want)}, got {sorted(labels)}")
    return m


# ---- actors -------------------------------------------------------------------------------

_RAY_METRICS: dict[str, object] = {}  # one ray.util.metrics object per name and process


class ActorMetrics:
    """Recorder for code in a Ray actor; every record carries the run's job labels
    (`job_labels()`) and this actor's role and worker."""

    def __init__(self, role: str, worker: str | int, labels: dict[str, str]):
        if role not in ROLES:
            raise ValueError(f"role {role!r} is not one of {', '.join(ROLES)}")
        self.tags = {**job_labels(**labels), "role": role, "worker": str(worker)}

    def inc(self, name: str, value: float = 1, **labels) -> None:
        self._record(name, "counter", value, labels)

    def set(self, name: str, value: float, **labels) -> None:
        self._record(name, "gauge", value, labels)

    def observe(self, name: str, value: float, **labels) -> None:
        self._record(name, "histogram", value, labels)

    def _record(self, name: str, kind: MetricType, value: float, labels: dict) -> None:
        m = _check(name, "actor", kind, labels, implicit=(*JOB_LABELS, *_A))
        import ray

        if not ray.is_initialized():
            return  # local mode: no Ray agent to export to (the labels were still checked)
        tags = {**self.tags, **{k: str(v) for k, v in labels.items()}}
        metric = _RAY_METRICS.get(name)
        if metric is None:
            metric = _RAY_METRICS[name] = _make_ray_metric(m)
        if kind == "counter":
            if value:  # Ray refuses inc(0); nothing to count anyway
                metric.inc(float(value), tags=tags)
        elif kind == "gauge":
            metric.set(float(value), tags=tags)
        else:
            metric.observe(float(value), tags=tags)


def _make_ray_metric(m: Metric):
    from ray.util import metrics as rm

    keys = (*JOB_LABELS, *m.labels)
    if m.type == "counter":
        return rm.Counter(m.name, description=m.help, tag_keys=keys)
    if m.type == "gauge":
        return rm.Gauge(m.name, description=m.help, tag_keys=keys)
    return rm.Histogram(m.name, description=m.help, boundaries=list(m.buckets), tag_keys=keys)


# ---- controller ---------------------------------------------------------------------------

class ControllerMetrics:
    """Job-level metrics of the driver, served on http://host:port/metrics (port 0: any free
    port; see `.port`), each series with the run's job labels (`job_labels()`). A private registry
    keeps them apart from anything else in the process."""

    def __init__(self, port: int, labels: dict[str, str], host: str = "127.0.0.1"):
        import prometheus_client as pc

        self.labels = job_labels(**labels)
        self.registry = pc.CollectorRegistry()
        # Created up front so counters start at 0 and `increase()` sees the first restart.
        self._metrics = {}
        for m in _DECLARED:
            if m.scope != "controller":
                continue
            kw = {"labelnames": (*JOB_LABELS, *m.labels), "registry": self.registry}
            if m.type == "counter":
                self._metrics[m.name] = pc.Counter(m.name, m.help, **kw)
            elif m.type == "gauge":
                self._metrics[m.name] = pc.Gauge(m.name, m.help, **kw)
            else:
                self._metrics[m.name] = pc.Histogram(m.name, m.help, buckets=m.buckets, **kw)
            if not m.labels:  # served from the start, as an unlabelled metric would be
                self._metrics[m.name].labels(**self.labels)
        self._server, self._thread = pc.start_http_server(port, addr=host, registry=self.registry)
        self.host, self.port = host, self._server.server_port

    def inc(self, name: str, value: float = 1, **labels) -> None:
        self._child(name, "counter", labels).inc(value)

    def set(self, name: str, value: float, **labels) -> None:
        self._child(name, "gauge", labels).set(value)

    def observe(self, name: str, value: float, **labels) -> None:
        self._child(name, "histogram", labels).observe(value)

    def _child(self, name: str, kind: MetricType, labels: dict):
        _check(name, "controller", kind, labels, implicit=JOB_LABELS)
        return self._metrics[name].labels(**self.labels, **{k: str(v) for k, v in labels.items()})

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
