"""deploy/ against the code it deploys: KubeRay manifests against the CRD schemas, every command
they run against the real CLI and a config `danceopd validate` accepts, Prometheus files through
promtool, and every metric the dashboard and alerts use against services/telemetry/metrics.py."""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import jsonschema
import pytest
import typer
import yaml
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from services.cli import app
from services.telemetry import metrics as M

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
KUBERAY = DEPLOY / "kuberay"
MANIFESTS = sorted(KUBERAY.glob("*.yaml"))
RAY_KINDS = {"RayCluster", "RayJob"}


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def ray_docs() -> list[tuple[Path, dict]]:
    return [(p, d) for p in MANIFESTS for d in docs(p) if d["kind"] in RAY_KINDS]


def cluster_specs() -> list[dict]:
    return [d["spec"] if d["kind"] == "RayCluster" else d["spec"]["rayClusterSpec"] for _, d in ray_docs()]


def pod_specs(spec: dict) -> list[dict]:
    return [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]


def test_manifests_exist():
    names = {p.name for p in MANIFESTS}
    assert {"raycluster.yaml", "rayjob.yaml", "podmonitor.yaml", "prometheusrule.yaml"} <= names
    assert {d["kind"] for _, d in ray_docs()} == RAY_KINDS


# ---- KubeRay manifests against the CRD schemas ----------------------------------------------

def crd_dir() -> Path:
    d = Path(os.environ.get("KUBERAY_CRD_DIR") or ROOT.parent / "shared" / "kuberay-crds")
    if not d.is_dir():
        pytest.skip(f"no KubeRay CRDs at {d} (set KUBERAY_CRD_DIR)")
    return d


@functools.cache
def crds(folder: Path) -> list[dict]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are megabytes of YAML
    return [yaml.load(f.read_text(), Loader=loader) for f in sorted(folder.glob("*.yaml"))]


def crd_schema(api_version: str, kind: str) -> dict:
    group, version = api_version.split("/")
    for crd in crds(crd_dir()):
        if crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == kind:
            for v in crd["spec"]["versions"]:
                if v["name"] == version:
                    return v["schema"]["openAPIV3Schema"]
    raise AssertionError(f"no CRD schema for {api_version} {kind} in {crd_dir()}")


def unknown_fields(obj, schema: dict, path: str = "") -> list[str]:
    """Fields the schema does not declare. Structural CRD schemas omit additionalProperties:
    false, so jsonschema accepts typos the API server would prune (or reject with strict
    field validation); this walk finds them."""
    out = []
    if isinstance(obj, dict) and "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        for k, v in obj.items():
            if k in schema["properties"]:
                out += unknown_fields(v, schema["properties"][k], f"{path}.{k}")
            elif not isinstance(schema.get("additionalProperties"), dict):
                out.append(f"{path}.{k}")
    elif isinstance(obj, dict) and isinstance(schema.get("additionalProperties"), dict):
        for k, v in obj.items():
            out += unknown_fields(v, schema["additionalProperties"], f"{path}.{k}")
    elif isinstance(obj, list) and "items" in schema:
        for i, v in enumerate(obj):
            out += unknown_fields(v, schema["items"], f"{path}[{i}]")
    return out


@pytest.mark.parametrize("path,doc", ray_docs(), ids=lambda x: x.name if isinstance(x, Path) else x["kind"])
def test_manifest_matches_crd_schema(path, doc):
    schema = crd_schema(doc["apiVersion"], doc["kind"])
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
              for e in jsonschema.Draft7Validator(schema).iter_errors(doc)]
    assert not errors, f"{path.name}: " + "; ".join(errors[:5])
    assert not unknown_fields(doc, schema), f"{path.name}: unknown fields {unknown_fields(doc, schema)}"


def test_rayjob_runs_the_raycluster_spec():
    (cluster,) = [d for p, d in ray_docs() if d["kind"] == "RayCluster"]
    (job,) = [d for p, d in ray_docs() if d["kind"] == "RayJob"]
    assert job["spec"]["rayClusterSpec"] == cluster["spec"], "rayjob.yaml drifted from raycluster.yaml"


def test_cluster_shape():
    for spec in cluster_specs():
        assert spec["enableInTreeAutoscaling"] is True
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
        groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
        assert set(groups) == {"rollout", "teacher", "learner"}
        for name in ("teacher", "learner"):
            limits = groups[name]["template"]["spec"]["containers"][0]["resources"]["limits"]
            assert int(limits["nvidia.com/gpu"]) >= 1, name
        for name in ("rollout", "teacher"):
            g = groups[name]
            assert 0 < g["minReplicas"] < g["maxReplicas"], f"{name}: no room to autoscale"
        for g in [spec["headGroupSpec"], *groups.values()]:
            port = g["rayStartParams"]["metrics-export-port"]
            c = g["template"]["spec"]["containers"][0]
            assert {"name": "metrics", "containerPort": int(port)} in c["ports"]


def test_controller_metrics_port_agrees_everywhere():
    for spec in cluster_specs():
        head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert {"name": "ctrl-metrics", "containerPort": M.DEFAULT_CONTROLLER_PORT} in head["ports"]
        assert {"name": M.CONTROLLER_PORT_ENV, "value": str(M.DEFAULT_CONTROLLER_PORT)} in head["env"]
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = [t for job in prom["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]]
    assert f"127.0.0.1:{M.DEFAULT_CONTROLLER_PORT}" in targets


def test_podmonitor_scrapes_declared_ports():
    (pm,) = docs(KUBERAY / "podmonitor.yaml")
    assert (pm["apiVersion"], pm["kind"]) == ("monitoring.coreos.com/v1", "PodMonitor")
    ports = {p["name"] for spec in cluster_specs() for pod in pod_specs(spec)
             for c in pod["containers"] for p in c.get("ports", [])}
    scraped = {e["port"] for e in pm["spec"]["podMetricsEndpoints"]}
    assert scraped <= ports and {"metrics", "ctrl-metrics"} <= scraped
    labels = cluster_specs()[0]["headGroupSpec"]["template"]["metadata"]["labels"]
    sel = {k: v for k, v in pm["spec"]["selector"]["matchLabels"].items() if not k.startswith("ray.io/")}
    assert sel.items() <= labels.items(), "the PodMonitor selects no DanceOPD pod"


def test_scrapes_keep_the_series_job_label():
    """Every DanceOPD series carries `job` (job.name) and `run_id`; Prometheus would rename that
    `job` to exported_job and put the scrape job's name in its place unless the scrape honors it."""
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    for sc in prom["scrape_configs"]:
        assert sc.get("honor_labels") is True, f"prometheus.yml {sc['job_name']}: honor_labels is not true"
        assert all(r.get("target_label") != "job" for r in sc.get("relabel_configs", [])), sc["job_name"]
    (pm,) = docs(KUBERAY / "podmonitor.yaml")
    for e in pm["spec"]["podMetricsEndpoints"]:
        assert e.get("honorLabels") is True, f"podmonitor.yaml {e['port']}: honorLabels is not true"


def test_prometheusrule_carries_the_alerts():
    (rule,) = docs(KUBERAY / "prometheusrule.yaml")
    assert (rule["apiVersion"], rule["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    (pm,) = docs(KUBERAY / "podmonitor.yaml")
    assert rule["metadata"]["labels"] == pm["metadata"]["labels"], "selected by the same Prometheus as the PodMonitor"
    alerts = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    assert rule["spec"]["groups"] == alerts["groups"], "prometheusrule.yaml drifted from alerts.yml: copy its groups"


def test_podmonitor_scrapes_the_controller_metrics_the_job_config_opens():
    """The head's scraped ctrl-metrics port is the port the controller of the job the manifests run
    serves /metrics on, and that config binds /metrics (not the control API) on 0.0.0.0."""
    from danceopd.config import load_config

    (pm,) = docs(KUBERAY / "podmonitor.yaml")
    scraped = {e["port"] for e in pm["spec"]["podMetricsEndpoints"]}
    configs = {repo_path(argv[2]) for _, argv in danceopd_commands() if argv[1] == "train"}
    assert configs == {ROOT / "configs" / "cluster.yaml"}
    ctl = load_config(ROOT / "configs" / "cluster.yaml").control
    assert ctl.metrics_host == "0.0.0.0", "the PodMonitor cannot scrape /metrics on loopback"
    assert ctl.host == "127.0.0.1", "the control API must stay on loopback"
    for spec in cluster_specs():
        head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in head["ports"]}
        env = {e["name"]: e["value"] for e in head.get("env", [])}
        serves = ctl.metrics_port if ctl.metrics_port is not None else int(env.get(M.CONTROLLER_PORT_ENV, M.DEFAULT_CONTROLLER_PORT))
        assert [n for n in scraped if ports.get(n) == serves] == ["ctrl-metrics"], \
            f"the PodMonitor scrapes no head port {serves} (the controller's /metrics)"


def test_gpu_budget_of_cluster_config_fits():
    from danceopd.config import load_config

    cfg = load_config(ROOT / "configs" / "cluster.yaml")
    need = (cfg.rollout.workers * cfg.rollout.num_gpus + cfg.learner.world_size * cfg.learner.num_gpus
            + sum(t.replicas * t.num_gpus for t in cfg.teachers))
    for spec in cluster_specs():
        have = sum(g["maxReplicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
                   for g in spec["workerGroupSpecs"])
        assert need <= have, f"configs/cluster.yaml needs {need} GPUs, the cluster has at most {have}"


# What a graceful stop takes on the cluster, beyond checkpoint.stop_grace_s: the budget the
# manifests are sized for (their head pod's comment says so; a deployment with longer steps or
# writes raises RAY_JOB_STOP_WAIT_TIME_S and terminationGracePeriodSeconds with it).
LEARNER_STEP_S, CHECKPOINT_WRITE_S = 60, 30
SHUTDOWN_S = 10  # after the summary: actors killed, Ray disconnected (under a second measured)


def test_stop_waits_cover_a_graceful_stop():
    """A stop ends within the running learner step, the checkpoint write and stop_grace_s. Ray
    SIGKILLs the driver RAY_JOB_STOP_WAIT_TIME_S after `ray job stop` (Ray's default, 3 s, set on
    the head for every job and by `danceopd submit` per job), and Kubernetes a pod
    terminationGracePeriodSeconds after a deletion or eviction: the head (the driver) and the
    learner pod (its ranks write the checkpoint) outlast the stop wait, which outlasts the stop
    of every cluster config."""
    from danceopd.config import load_config
    from services.control.jobs import STOP_WAIT_S

    configs = ["cluster.yaml", "sd35_medium.yaml", "zimage.yaml"]
    for spec in cluster_specs():
        head = spec["headGroupSpec"]["template"]["spec"]
        env = {e["name"]: e["value"] for e in head["containers"][0].get("env", [])}
        stop_wait = int(env["RAY_JOB_STOP_WAIT_TIME_S"])
        assert stop_wait == STOP_WAIT_S, "the head's stop wait differs from the one `danceopd submit` sets"
        (learner,) = [g["template"]["spec"] for g in spec["workerGroupSpecs"] if g["groupName"] == "learner"]
        for name, pod in (("head", head), ("learner", learner)):
            grace = pod.get("terminationGracePeriodSeconds", 30)  # Kubernetes' default
            assert grace >= stop_wait + SHUTDOWN_S, f"{name} pod: terminationGracePeriodSeconds {grace} < {stop_wait} + {SHUTDOWN_S}"
        for name in configs:
            need = load_config(ROOT / "configs" / name).checkpoint.stop_grace_s + LEARNER_STEP_S + CHECKPOINT_WRITE_S
            assert stop_wait >= need, f"configs/{name}: a stop takes up to {need:g} s, RAY_JOB_STOP_WAIT_TIME_S is {stop_wait}"


# ---- every command runs the real CLI on a valid config --------------------------------------

def dockerfile() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    return [tuple(line.strip().split(None, 1)) for line in text.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def image_workdir() -> str:
    return [arg for op, arg in dockerfile() if op == "WORKDIR"][-1]


def repo_path(path: str) -> Path:
    """A path as the image sees it (absolute under WORKDIR, or relative to it) -> this checkout."""
    workdir = image_workdir()
    rel = os.path.relpath(path, workdir) if os.path.isabs(path) else path
    assert not rel.startswith(".."), f"{path} is outside the image's WORKDIR {workdir}"
    copied = {arg.split()[-1].removeprefix("./") for op, arg in dockerfile() if op == "COPY"}
    assert Path(rel).parts[0] in copied, f"{path}: the Dockerfile does not COPY {Path(rel).parts[0]}/"
    return ROOT / rel


def check_cli(argv: list[str]) -> None:
    """`argv` (after `danceopd`) names a real subcommand with options it accepts, and its
    config passes `danceopd validate` with the same overrides."""
    group = typer.main.get_command(app)
    assert argv and argv[0] in group.commands, f"danceopd has no subcommand {argv[:1]} ({sorted(group.commands)})"
    cmd = group.commands[argv[0]]
    ctx = cmd.make_context(argv[0], list(argv[1:]))
    config = ctx.params.get("config")
    assert config is not None, f"danceopd {argv[0]} takes no config"
    overrides = [a for s in (ctx.params.get("set_") or []) for a in ("--set", s)]
    res = CliRunner().invoke(app, ["validate", str(repo_path(str(config))), "--remote", *overrides])
    assert res.exit_code == 0, f"danceopd validate {config}: {res.output}"


def danceopd_commands() -> list[tuple[str, list[str]]]:
    """Every `danceopd ...` command line in the manifests (RayJob entrypoints, container commands)."""
    found = []

    def walk(node, where):
        if isinstance(node, dict):
            if isinstance(node.get("entrypoint"), str):
                found.append((where, shlex.split(node["entrypoint"])))
            line = [*(node.get("command") or []), *(node.get("args") or [])]
            if isinstance(node.get("image"), str) and any("danceopd" in str(a).split() for a in line):
                found.append((where, shlex.split(" ".join(map(str, line)))))
            for v in node.values():
                walk(v, where)
        elif isinstance(node, list):
            for v in node:
                walk(v, where)

    for p in MANIFESTS:
        walk(docs(p), p.name)
    return found


def test_rayjob_entrypoint_is_a_real_cli_command():
    cmds = danceopd_commands()
    assert any(where == "rayjob.yaml" for where, _ in cmds), "rayjob.yaml has no entrypoint"
    for where, argv in cmds:
        assert argv[0] == "danceopd", f"{where}: {shlex.join(argv)} does not run the danceopd CLI"
        check_cli(argv[1:])


def test_dockerfile():
    ops = dockerfile()
    args = {a.split("=")[0] for op, a in ops if op == "ARG"}
    assert {"BASE_IMAGE", "TORCH_SPEC"} <= args
    assert ops[[op for op, _ in ops].index("FROM")][1] == "${BASE_IMAGE}"
    runs = " ".join(a for op, a in ops if op == "RUN")
    assert "${TORCH_SPEC}" in runs and re.search(r"pip install (-c constraints.txt )?--no-build-isolation deepspeed", runs)
    user = [a for op, a in ops if op == "USER"][-1]
    assert user not in ("root", "0"), "the image must run as a non-root user"
    assert json.loads([a for op, a in ops if op == "ENTRYPOINT"][-1]) == ["danceopd"]
    res = CliRunner().invoke(app, json.loads([a for op, a in ops if op == "CMD"][-1]))
    assert res.exit_code == 0, res.output


# ---- Prometheus and Grafana against the metric declarations ---------------------------------

PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}
RAY_LABELS = {"Component", "NodeAddress", "SessionName", "Version", "WorkerId"}
ALLOWED_LABELS = {lab for m in M.METRICS.values() for lab in m.labels} | set(M.JOB_LABELS) | RAY_LABELS | {"instance", "le"}
RUN = M.job_labels("unit", "run-1")


def promql_names(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) an expression uses."""
    expr = re.sub(r"\$\{?\w+\}?", "x", expr)  # Grafana variables
    labels = set()
    for body in re.findall(r"\{([^}]*)\}", expr):
        labels |= set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", body))
    for body in re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", expr):
        labels |= {s.strip() for s in body.split(",") if s.strip()}
    s = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    s = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", s)
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", s)
    s = re.sub(r"\boffset\s+\w+", "", s)
    s = re.sub(r"\b\d[\w.]*", "", s)  # numbers, durations
    names = {m.group() for m in re.finditer(r"[A-Za-z_:][\w:]*", s)
             if not re.match(r"\s*\(", s[m.end():])} - PROMQL_WORDS  # not a function call
    return names, labels


def alert_exprs() -> list[tuple[str, str]]:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    return [(r["alert"], r["expr"]) for g in rules["groups"] for r in g["rules"]]


def dashboard() -> dict:
    return json.loads((DEPLOY / "grafana" / "danceopd.json").read_text())


def dashboard_targets() -> list[dict]:
    """Every panel query, with its panel's title and its row's (a row holds the panels below it)."""
    out, row = [], None
    for p in dashboard()["panels"]:
        row = p["title"] if p["type"] == "row" else row
        out += [dict(t, panel=p["title"], row=row) for t in p.get("targets", [])]
    return out


# The GPU row reads NVIDIA's dcgm-exporter (docs/operations.md), by its standard names and labels;
# no other panel or alert may use them.
GPU_ROW = "GPUs (NVIDIA DCGM exporter)"
DCGM_SERIES = {"DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_FB_FREE", "DCGM_FI_DEV_POWER_USAGE"}
DCGM_LABELS = {"Hostname", "gpu", "UUID", "modelName", "pod", "namespace", "container"}


DECLARED_SERIES = {s for name in M.METRICS for s in M.exported_series(name)}


def test_promql_references_only_declared_metrics():
    used, gpu_used = set(), set()
    exprs = [(f"alert {a}", e, False) for a, e in alert_exprs()] + \
        [(f"panel {t['panel']}", t["expr"], t["row"] == GPU_ROW) for t in dashboard_targets()]
    for where, expr, gpu in exprs:
        names, labels = promql_names(expr)
        known, allowed = (DCGM_SERIES, DCGM_LABELS) if gpu else (DECLARED_SERIES, ALLOWED_LABELS)
        assert names, f"{where}: no metric in {expr!r}"
        assert names <= known, f"{where}: undeclared {sorted(names - known)}"
        assert labels <= allowed, f"{where}: unknown labels {sorted(labels - allowed)}"
        (gpu_used if gpu else used).update(names)
    assert gpu_used == DCGM_SERIES, f"the GPU row lacks {sorted(DCGM_SERIES - gpu_used)}"
    for t in dashboard_targets():
        legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", t.get("legendFormat", "")))
        allowed = DCGM_LABELS if t["row"] == GPU_ROW else ALLOWED_LABELS
        assert legend <= allowed, f"panel {t['panel']}: legend labels {legend - allowed}"
    for var in dashboard()["templating"]["list"]:
        if var["type"] == "query":
            metric = re.match(r"label_values\((\w+),", var["definition"]).group(1)
            assert metric in DECLARED_SERIES, f"variable ${var['name']}: {metric} is not declared"
    unused = {n for n in M.METRICS if not set(M.exported_series(n)) & used}
    assert not unused, f"declared but on no panel or alert: {sorted(unused)}"


def test_dashboard_templating():
    d = dashboard()
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["job"]["type"] == "query"
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    for p in d["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]
    for t in dashboard_targets():
        if t["row"] == GPU_ROW:  # dcgm-exporter knows pods, not jobs: the GPUs of the job's pods
            selectors = re.findall(r"DCGM_FI_\w+(\{[^}]*\})?", t["expr"])
            assert selectors and set(selectors) == {'{pod=~"$gpu_pods"}'}, f"panel {t['panel']}: not filtered by $gpu_pods"
        else:
            assert 'job=~"$job"' in t["expr"], f"panel {t['panel']}: not filtered by $job"
    # $gpu_pods' default matches the pods KubeRay names after the manifests' clusters
    assert variables["gpu_pods"]["type"] == "textbox"
    default = variables["gpu_pods"]["query"]
    assert variables["gpu_pods"]["current"]["value"] == default
    for path, doc in ray_docs():
        cluster = doc["metadata"]["name"] + ("-x7k2p" if doc["kind"] == "RayJob" else "")
        for pod in (f"{cluster}-head-4xz9q", f"{cluster}-learner-worker-8fj2l"):
            assert re.fullmatch(default, pod), f"$gpu_pods={default!r} misses {pod} ({path.name})"


def test_promql_parser_sees_known_names():
    names, labels = promql_names('histogram_quantile(0.99, sum by (job, le) (rate(x_bucket{job=~"$job"}[5m]))) > 1e3')
    assert names == {"x_bucket"} and labels == {"job", "le"}


def promtool():
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not on PATH (deploy/install-prometheus.sh installs Debian's prometheus)")
    return path


@pytest.mark.subprocess
def test_promtool_check_rules():
    res = subprocess.run([promtool(), "check", "rules", "alerts.yml"], cwd=DEPLOY / "prometheus",
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.subprocess
def test_promtool_check_config():
    res = subprocess.run([promtool(), "check", "config", "prometheus.yml"], cwd=DEPLOY / "prometheus",
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.subprocess
def test_stall_alert_fires_for_a_job_that_never_steps(tmp_path):
    """promtool's rule unit test: a job that never steps fires DanceOPDLearnerStalled once its
    start is older than its stall bound; a stepping job and a job with a larger bound do not;
    a job that stops stepping fires from its last step."""
    exe = promtool()
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    for g in rules["groups"]:
        for r in g["rules"]:
            r.pop("annotations", None)  # rendered text; the test is about expr, for and labels
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules))
    # Every job's controller starts at t=10m (a real start is ~1.7e9 s after the epoch, so an
    # expression that took the 0 before the first step for a timestamp would fire at once).
    jobs = {  # job: (last-step timestamp, one value a minute from t=0; stall bound)
        "never": ("0x60", 600), "steps": ("0x10 660+60x50", 600), "patient": ("0x60", 1200),
        "stopped": ("0x10 660 720 780 840 900x45", 600),  # steps until t=15m, then none
    }
    series = [s for job, (last, bound) in jobs.items() for s in (
        {"series": f'danceopd_start_timestamp_seconds{{job="{job}"}}', "values": "600x60"},
        {"series": f'danceopd_last_step_timestamp_seconds{{job="{job}"}}', "values": last},
        {"series": f'danceopd_stall_after_seconds{{job="{job}"}}', "values": f"{bound}x60"})]

    def firing(*names):
        return [{"exp_labels": {"severity": "critical", "job": n}} for n in names]

    # bound exceeded after 20m (never), 25m (stopped), 30m (patient); then `for: 2m` plus one evaluation
    checks = [("15m", firing()), ("21m", firing()), ("23m", firing("never")), ("28m", firing("never", "stopped")),
              ("33m", firing("never", "stopped", "patient"))]
    test = {"rule_files": ["alerts.yml"], "evaluation_interval": "1m", "tests": [{
        "interval": "1m", "input_series": series,
        "alert_rule_test": [{"eval_time": t, "alertname": "DanceOPDLearnerStalled", "exp_alerts": exp} for t, exp in checks]}]}
    (tmp_path / "test.yml").write_text(yaml.safe_dump(test))
    res = subprocess.run([exe, "test", "rules", "test.yml"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.subprocess
def test_metrics_missing_alert_rules_test():
    """deploy/prometheus/alerts_test.yml, promtool's unit test of DanceOPDMetricsMissing: it fires
    per run when one half of a running job's metrics is gone, not when the job finished."""
    exe = promtool()
    tests = yaml.safe_load((DEPLOY / "prometheus" / "alerts_test.yml").read_text())
    checked = {t["alertname"] for case in tests["tests"] for t in case["alert_rule_test"] if t["exp_alerts"]}
    assert checked == {"DanceOPDMetricsMissing"}
    assert tests["rule_files"] == ["alerts.yml"]
    res = subprocess.run([exe, "test", "rules", "alerts_test.yml"], cwd=DEPLOY / "prometheus",
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.subprocess
def test_dashboard_promql_parses(tmp_path):
    """promtool parses every dashboard query, as recording rules with Grafana's variables filled in."""
    exe = promtool()
    rules = [{"record": f"danceopd:panel_{i}", "expr": t["expr"].replace("$__rate_interval", "1m").replace("$job", ".*")
              .replace("$gpu_pods", ".*")}
             for i, t in enumerate(dashboard_targets())]
    f = tmp_path / "dashboard_rules.yml"
    f.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    res = subprocess.run([exe, "check", "rules", str(f)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


# ---- the declarations and the recorders -----------------------------------------------------

def test_declarations():
    for m in M.METRICS.values():
        assert re.fullmatch(r"danceopd_[a-z0-9_]+", m.name) and not m.name.endswith("_total"), m.name
        assert m.help and m.type in ("counter", "gauge", "histogram") and m.scope in ("actor", "controller")
        if m.scope == "actor":
            assert m.labels[:2] == ("role", "worker"), m.name
        assert bool(m.buckets) == (m.type == "histogram"), m.name
        assert list(m.buckets) == sorted(set(m.buckets)) and all(b > 0 for b in m.buckets), m.name
    assert M.exported_name("danceopd_rollout_samples") == "ray_danceopd_rollout_samples_total"
    assert M.exported_name("danceopd_router_backlog") == "ray_danceopd_router_backlog"
    assert M.exported_name("danceopd_replay_depth") == "danceopd_replay_depth"  # the driver holds the queue
    assert M.exported_name("danceopd_restarts") == "danceopd_restarts_total"
    assert M.exported_series("danceopd_weight_sync_seconds") == tuple(
        f"danceopd_weight_sync_seconds_{s}" for s in ("bucket", "sum", "count"))
    with pytest.raises(ValueError, match="not declared"):
        M.exported_name("danceopd_nope")


def test_actor_metrics_refuse_typos():
    am = M.ActorMetrics("rollout", 3, RUN)
    with pytest.raises(ValueError, match="not declared"):
        am.inc("danceopd_rollout_sample", route="t2i")
    with pytest.raises(ValueError, match="takes labels"):
        am.inc("danceopd_rollout_samples")  # route missing
    with pytest.raises(ValueError, match="takes labels"):
        am.inc("danceopd_rollout_samples", route="t2i", task="t2i")
    with pytest.raises(ValueError, match="takes labels"):
        am.set("danceopd_router_backlog", 3, role="router", route="t2i")  # role comes from the recorder
    with pytest.raises(ValueError, match="is a counter"):
        am.set("danceopd_rollout_samples", 1, route="t2i")
    with pytest.raises(ValueError, match="recorded by the controller"):
        am.set("danceopd_learner_step", 1)
    with pytest.raises(ValueError, match="role"):
        M.ActorMetrics("rollouts", 0, RUN)
    with pytest.raises(ValueError, match="takes labels"):
        am.inc("danceopd_rollout_samples", route="t2i", job="other")  # the recorder's, not the caller's
    with pytest.raises(ValueError, match="need a job name and a run id"):
        M.ActorMetrics("rollout", 0, {"job": "unit", "run_id": ""})
    am.inc("danceopd_rollout_samples", 8, route="t2i")  # valid: a no-op without Ray


@pytest.fixture
def controller_metrics():
    cm = M.ControllerMetrics(0, RUN)
    yield cm
    cm.close()


def scrape(url: str) -> dict[str, list]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    series: dict[str, list] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            series.setdefault(s.name, []).append(s)
    return series


def test_controller_metrics_served_over_http(controller_metrics):
    cm = controller_metrics
    assert cm.port > 0 and cm.host == "127.0.0.1"
    cm.inc("danceopd_restarts", role="rollout")
    cm.set("danceopd_loss", 0.25, route="t2i")
    cm.set("danceopd_last_step_timestamp_seconds", time.time())
    cm.observe("danceopd_weight_sync_seconds", 0.3)
    series = scrape(f"http://127.0.0.1:{cm.port}/metrics")
    (restarts,) = series["danceopd_restarts_total"]
    assert restarts.labels == {**RUN, "role": "rollout"} and restarts.value == 1
    assert series["danceopd_loss"][0].labels == {**RUN, "route": "t2i"}
    # every series carries the run's job labels, the unlabelled metrics' from the start
    unlabelled = [s for s in series.values() for x in s if x.labels.get("job") != "unit" or x.labels.get("run_id") != "run-1"]
    assert not unlabelled, unlabelled[:3]
    # The names dashboards use are exactly what prometheus_client serves.
    for m in M.METRICS.values():
        if m.scope == "controller" and not m.labels:
            assert set(M.exported_series(m.name)) <= set(series), m.name
    with pytest.raises(ValueError, match="takes labels"):
        cm.inc("danceopd_restarts")
    with pytest.raises(ValueError, match="takes labels"):
        cm.set("danceopd_loss", 1.0, route="t2i", worker="0")
    with pytest.raises(ValueError, match="recorded by the actor"):
        cm.set("danceopd_router_backlog", 1, role="router", worker="0", route="t2i")
    with pytest.raises(ValueError, match="not declared"):
        cm.set("danceopd_los", 1.0, route="t2i")


@pytest.mark.ray
@pytest.mark.slow
def test_ray_exports_actor_metrics_under_exported_names(ray_local):
    """Record every actor metric from a real actor and read Ray's export: the series names are
    exported_series(), with our labels and Ray's own. Ray refreshes the export every ~10 s."""
    ray = ray_local

    @ray.remote(num_cpus=0)
    class Recorder:
        def record(self):
            from services.telemetry import metrics as m

            am = m.ActorMetrics("rollout", "probe-7", m.job_labels("probe-job", "probe-run"))
            for metric in m.METRICS.values():
                if metric.scope != "actor":
                    continue
                labels = {k: "x" for k in metric.labels[2:]}
                getattr(am, {"counter": "inc", "gauge": "set", "histogram": "observe"}[metric.type])(metric.name, 1, **labels)

    actor = Recorder.remote()
    ray.get(actor.record.remote())
    want = {s for n, m in M.METRICS.items() if m.scope == "actor" for s in M.exported_series(n)}
    urls = [f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics" for n in ray.nodes() if n["Alive"]]
    deadline, got = time.time() + 60, {}
    while time.time() < deadline:
        got = {k: v for url in urls for k, v in scrape(url).items() if k in want}
        probe = [x for x in got.get("ray_danceopd_rollout_samples_total", []) if x.labels.get("worker") == "probe-7"]
        if set(got) == want and probe:  # other tests of the session may have exported these names first
            break
        time.sleep(2)
    ray.kill(actor)
    assert set(got) == want, f"missing from Ray's export: {sorted(want - set(got))}"
    mine = [x for x in got["ray_danceopd_rollout_samples_total"] if x.labels.get("worker") == "probe-7"]
    assert mine, "the probe's series is missing"  # other tests of this session may export too
    sample = mine[0]
    assert {"role": "rollout", "worker": "probe-7", "route": "x", "job": "probe-job", "run_id": "probe-run"}.items() \
        <= sample.labels.items()
    assert RAY_LABELS <= set(sample.labels)
