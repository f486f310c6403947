"""End to end against a real Prometheus scraping as deploy/prometheus/prometheus.yml says: a running
job is scraped, then EVERY dashboard panel query must return data (the GPU row's need NVIDIA's
dcgm-exporter: not here), EVERY alert expression must evaluate, and every DanceOPD series must
carry the job's name and run id, through Prometheus' HTTP API."""

import json
import os
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request

import pytest
import yaml

from danceopd.config import config_from_dict
from services.loop import TrainLoop
from tests.conftest import ROOT, free_port
from tests.test_deploy import GPU_ROW, dashboard_targets

pytestmark = [pytest.mark.ray, pytest.mark.subprocess, pytest.mark.slow]
PROMETHEUS = shutil.which("prometheus")


def panel_queries() -> list[tuple[str, str]]:
    """(title, query) of every panel but the GPU row's (dcgm-exporter series, checked by name in
    tests/test_deploy.py)."""
    return [(t["panel"], t["expr"]) for t in dashboard_targets() if t["row"] != GPU_ROW]


def alert_exprs() -> list[tuple[str, str]]:
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    return [(r["alert"], r["expr"]) for g in rules["groups"] for r in g["rules"]]


def grafana_to_promql(expr: str, job: str) -> str:
    return expr.replace("$__rate_interval", "30s").replace('"$job"', f'"{job}"')


def query(port: int, expr: str) -> dict:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


@pytest.fixture
def prometheus(tmp_path, ray_local):
    if PROMETHEUS is None:
        pytest.skip("prometheus is not installed (make setup installs Debian's package)")
    ray_port = int(os.environ["DANCEOPD_TEST_RAY_METRICS_PORT"])
    ctl_port, prom_port = free_port(), free_port()
    shutil.copy(ROOT / "deploy" / "prometheus" / "alerts.yml", tmp_path / "alerts.yml")
    # The shipped config (honor_labels and all), with this test's ports and a 1 s interval.
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    ports = {"ray": ray_port, "danceopd-controller": ctl_port}
    assert {sc["job_name"] for sc in config["scrape_configs"]} == set(ports)
    for sc in config["scrape_configs"]:
        sc.pop("file_sd_configs", None)  # Ray writes that file only while its dashboard runs
        sc["static_configs"] = [{"targets": [f"127.0.0.1:{ports[sc['job_name']]}"]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    proc = subprocess.Popen([PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "w"))
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{prom_port}/-/ready", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        yield prom_port, ctl_port
    finally:
        proc.terminate()  # exactly the server this test started
        proc.wait(timeout=20)


def test_every_panel_and_alert_against_real_prometheus(prometheus, toy_raw, tmp_path):
    prom_port, ctl_port = prometheus
    raw = json.loads(json.dumps(toy_raw))
    raw["job"]["output_dir"] = str(tmp_path / "run")
    # a name of its own: Ray's agent keeps exporting a dead worker's counters (only gauges age out,
    # after two report intervals), so an earlier test's job of the same name is still there
    raw["job"]["name"] = f"monitor-{os.getpid()}-{time.time_ns() % 10**6}"
    raw["learner"].update(steps=100000)
    raw["rollout"].update(workers=2)
    # drop mode without a lag budget: some batches go stale, so the dropped-samples panel has data
    raw["sync"] = {"max_policy_lag": 0, "on_stale": "drop"}
    raw["checkpoint"] = {"every": 0, "keep": 1}
    raw["control"] = {"metrics_port": ctl_port}
    cfg = config_from_dict(raw, base_dir=tmp_path)
    controller = TrainLoop(cfg, "ray", show_progress=False)
    result = {}
    job = threading.Thread(target=lambda: result.update(controller.run()), daemon=True)
    job.start()
    try:
        name = cfg.job.name
        pending = dict(enumerate(panel_queries()))
        deadline = time.time() + 180
        while pending and time.time() < deadline and job.is_alive():
            for i, (title, expr) in list(pending.items()):
                data = query(prom_port, grafana_to_promql(expr, name))
                assert data["status"] == "success", (title, data)
                if data["data"]["result"]:
                    del pending[i]
            time.sleep(2)
        assert not pending, f"panels without data: {pending}"
        for alert, expr in alert_exprs():
            data = query(prom_port, expr)
            assert data["status"] == "success", (alert, data)
        # every DanceOPD series, the actors' and the controller's, names the job and the run
        # (the session's shared Ray cluster also exports earlier tests' jobs: each under its own labels)
        runs = query(prom_port, 'count by (__name__, job, run_id) ({__name__=~"(ray_)?danceopd_.+"})')["data"]["result"]
        assert all(r["metric"].get("job") and r["metric"].get("run_id") for r in runs), runs
        mine = [r for r in runs if r["metric"]["job"] == name]
        assert {r["metric"]["__name__"].startswith("ray_") for r in mine} == {True, False}
        assert {r["metric"]["run_id"] for r in mine} == {controller.run_id}
        # ... so both halves of the running job are matched: the missing-metrics alert is quiet for it
        missing = dict(alert_exprs())["DanceOPDMetricsMissing"]
        firing = query(prom_port, missing)["data"]["result"]
        assert [r for r in firing if r["metric"].get("job") == name] == [], missing
        # the controller's job-level view agrees with what Prometheus scraped
        step = float(query(prom_port, f'max(danceopd_learner_step{{job="{name}"}})')["data"]["result"][0]["value"][1])
        assert step >= 1
        # the stall alert's inputs: the controller's start and its bound (control.stall_after_s) ...
        start = query(prom_port, f'danceopd_start_timestamp_seconds{{job="{name}"}}')["data"]["result"]
        assert float(start[0]["value"][1]) == pytest.approx(controller.telemetry.started_at, abs=1e-3)
        bound = query(prom_port, f'danceopd_stall_after_seconds{{job="{name}"}}')["data"]["result"]
        assert float(bound[0]["value"][1]) == cfg.control.stall_after_s
        # ... and its expression matches the scraped series with each other (a bound below any age fires)
        stalled = dict(alert_exprs())["DanceOPDLearnerStalled"]
        assert "> danceopd_stall_after_seconds" in stalled
        always = stalled.replace("> danceopd_stall_after_seconds", "> -1 * danceopd_stall_after_seconds")
        assert query(prom_port, always)["data"]["result"], always
    finally:
        controller.request_stop()
        job.join(timeout=120)
        controller.shutdown()
    assert result["steps"] >= 1 and result["checkpoint"]  # graceful stop wrote the final checkpoint
