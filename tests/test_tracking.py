"""Tracking and profiling (issue 24): the same scalars and sample grids in TensorBoard and an MLflow
run (a real file store, read back with MlflowClient), W&B only where it can run, and torch.profiler
Chrome traces of a few learner steps and rollout batches under job.output_dir/profile/ in both modes."""

from __future__ import annotations

import json
import sys
import types

import pytest
import tomllib
from packaging.requirements import Requirement
from pydantic import ValidationError
from rich.console import Console
from typer.testing import CliRunner

from danceopd.config import ConfigError
from danceopd.validate import validate
from services.cli import app
from services.loop import TrainLoop, train
from services.telemetry.progress import read_metrics
from services.telemetry.trackers import Trackers, flat_params, mlflow_uri
from tests.conftest import ROOT, cfg_for, lean
from tests.test_evaluation import ROUTES, board, png

# ---- the fast lane: config, validation, the optional parts ----------------------------------------


def test_the_tracking_extra_is_pinned_and_dev_pulls_it():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    dev = {Requirement(r).name: str(Requirement(r)) for r in extras["dev"]}
    for req in map(Requirement, extras["tracking"]):
        assert dev.get(req.name) == str(req), f"the dev extra does not pull the tracking extra's {req}"
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    assert pins["mlflow-skinny"] == "3.18.0"


@pytest.mark.parametrize("key,value,says", [
    ("mlflow_uri", "ftp://host/store", "not a tracking URI"),
    ("wandb", "my project", "not a W&B project name"),
    ("profile_steps", -1, "greater than or equal to 0"),
    ("profile_steps", 101, "less than or equal to 100"),
])
def test_bad_logging_keys_are_refused(toy_raw, tmp_path, key, value, says):
    with pytest.raises((ConfigError, ValidationError), match=says):
        cfg_for(toy_raw, tmp_path, "bad", **{f"logging__{key}": value})


def test_logging_keys_as_given(toy_raw, tmp_path):
    cfg = cfg_for(toy_raw, tmp_path, "ok", logging__mlflow_uri=" ", logging__wandb=True)
    assert cfg.logging.mlflow_uri is None and cfg.logging.wandb is True
    cfg = cfg_for(toy_raw, tmp_path, "ok", logging__mlflow_uri="http://127.0.0.1:5000", logging__wandb="proj-1")
    assert cfg.logging.mlflow_uri == "http://127.0.0.1:5000" and cfg.logging.wandb == "proj-1"
    assert mlflow_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert mlflow_uri(str(tmp_path / "ml runs")) == (tmp_path / "ml runs").as_uri()


def test_mlflow_missing_or_an_unwritable_store_is_one_line_before_the_job(toy_raw, tmp_path, monkeypatch):
    import importlib.util

    (tmp_path / "afile").write_text("x")
    cfg = cfg_for(toy_raw, tmp_path, "v", logging__mlflow_uri=f"file://{tmp_path}/afile/store")
    with pytest.raises(ConfigError, match=r"^logging.mlflow_uri: .*afile is a file, not a folder$"):
        validate(cfg)
    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else find(name, *a))
    cfg = cfg_for(toy_raw, tmp_path, "v", logging__mlflow_uri=str(tmp_path / "mlruns"))
    with pytest.raises(ConfigError, match=r"^logging.mlflow_uri: MLflow is not installed; pip install 'danceopd\[tracking\]'$"):
        validate(cfg)
    validate(cfg, local_paths=False)  # a job for another machine: its image has it (deploy/Dockerfile)


@pytest.mark.parametrize("importable", [False, True])
def test_wandb_without_its_package_or_key_is_one_warning_and_skipped(toy_raw, tmp_path, monkeypatch, importable):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    # Not installed (None in sys.modules fails the import), or installed but without a key.
    monkeypatch.setitem(sys.modules, "wandb", types.ModuleType("wandb") if importable else None)
    cfg = cfg_for(toy_raw, tmp_path, "w", logging__wandb=True)
    console = Console(record=True, width=200)
    trackers = Trackers.open(cfg, 0, "run-1", console)
    assert trackers.trackers == {}
    lines = console.export_text().splitlines()
    why = "WANDB_API_KEY is not set" if importable else "the wandb package is not installed"
    assert lines == [f"logging.wandb: {why}; logging to W&B is skipped"]


# ---- MLflow and TensorBoard on a local run -------------------------------------------------------


def mlflow_run(store, experiment: str, run_name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri(str(store)))
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_name for r in runs] == [run_name]  # one run, named by the job's run_id
    return client, runs[0]


@pytest.mark.slow
def test_local_run_logs_the_same_scalars_and_grids_to_mlflow_and_tensorboard(toy_raw, tmp_path):
    store = tmp_path / "mlruns"
    cfg = cfg_for(toy_raw, tmp_path, "run", learner__steps=6, checkpoint__every=3, eval__every=3,
                  logging__tensorboard=True, logging__mlflow_uri=str(store), logging__mlflow_experiment="issue24")
    loop = TrainLoop(cfg, "local", show_progress=False)
    try:
        summary = loop.run()
    finally:
        loop.shutdown()
    steps, evals = read_metrics(cfg.output_path / "metrics.jsonl")
    client, run = mlflow_run(store, "issue24", loop.run_id)
    assert run.info.status == "FINISHED" and summary["mlflow"]["run_id"] == run.info.run_id
    assert run.data.params == flat_params(cfg) and run.data.params["learner.steps"] == "6"
    assert run.data.params["routing.routes.1.name"] == "local_edit"

    def history(key):
        return [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]

    assert history("loss/all") == [(s["step"], pytest.approx(s["loss"], rel=1e-6)) for s in steps]
    for route in ROUTES:
        assert history(f"loss/{route}") == [(s["step"], pytest.approx(s["route_loss"][route], rel=1e-6))
                                            for s in steps if route in s["route_loss"]]
        assert history(f"eval/{route}/target_error") == [(e["step"], pytest.approx(e["eval"][route]["target_error"], rel=1e-6))
                                                         for e in evals]
        # Each evaluation's grid is an artifact, pixel for pixel the PNG in the run folder.
        arts = [a.path for a in client.list_artifacts(run.info.run_id, f"samples/{route}")]
        assert arts == [f"samples/{route}/step-{e['step']:08d}.png" for e in evals]
        got = client.download_artifacts(run.info.run_id, arts[-1], str(tmp_path / "dl"))
        assert (png(got) == png(cfg.output_path / "samples" / f"step-{evals[-1]['step']:08d}" / f"{route}.png")).all()
    # TensorBoard holds the same tags and numbers.
    acc = board(cfg.output_path / "tensorboard")
    assert set(acc.Tags()["scalars"]) == set(run.data.metrics), set(acc.Tags()["scalars"]) ^ set(run.data.metrics)
    assert {"loss/all", "learner/grad_norm", "throughput/samples_per_s", "idle/learner", "eval/seconds",
            "idle/rollout_job", "sync/seconds"} <= set(run.data.metrics)
    assert [(e.step, e.value) for e in acc.Scalars("loss/all")] == [(s, pytest.approx(v, rel=1e-6)) for s, v in history("loss/all")]
    assert not (cfg.output_path / "profile").exists()  # logging.profile_steps is 0

    # A resume continues the same MLflow run (found by its run_id tag); the params stay as logged.
    more = cfg_for(toy_raw, tmp_path, "run", learner__steps=8, checkpoint__every=0, eval__enabled=False,
                   logging__mlflow_uri=str(store), logging__mlflow_experiment="issue24")
    train(more, resume_from=cfg.output_path / "checkpoints" / "step-00000006", show_progress=False, run_id=loop.run_id)
    client, again = mlflow_run(store, "issue24", loop.run_id)
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert again.data.params["learner.steps"] == "6"
    assert [s for s, _ in history("loss/all")] == [1, 2, 3, 4, 5, 6, 7, 8]


@pytest.mark.slow
def test_a_tracker_that_fails_mid_job_is_dropped_with_one_line(toy_raw, tmp_path):
    cfg = cfg_for(toy_raw, tmp_path, "gone", logging__tensorboard=True, logging__mlflow_uri=str(tmp_path / "mlruns"))
    console = Console(record=True, width=300)
    trackers = Trackers.open(cfg, 0, "run-2", console)
    ml = trackers.get("mlflow")
    ml.client.delete_run(ml.run_id)  # someone deleted the run: MLflow refuses what follows
    trackers.scalars(1, {"loss/all": 0.5})
    trackers.scalars(2, {"loss/all": 0.25})
    assert set(trackers.trackers) == {"tensorboard"}
    (line,) = console.export_text().splitlines()
    assert line.startswith("tracking: mlflow failed (MlflowException: ") and line.endswith("it stops, the job goes on")
    trackers.close()
    assert [e.step for e in board(cfg.output_path / "tensorboard").Scalars("loss/all")] == [1, 2]


# ---- profiling -----------------------------------------------------------------------------------


def trace_files(cfg) -> dict[str, dict]:
    """{file name: parsed trace} of job.output_dir/profile; each a Chrome trace with events."""
    out = {}
    for p in sorted((cfg.output_path / "profile").iterdir()):
        trace = json.loads(p.read_text())
        assert isinstance(trace["traceEvents"], list) and trace["traceEvents"], p.name
        assert any(ev.get("ph") == "X" for ev in trace["traceEvents"]), p.name  # timed op events
        out[p.name] = trace
    return out


@pytest.mark.slow
def test_train_profile_flag_traces_learner_steps_and_rollouts_after_a_warmup(toy_raw, tmp_path, write_config):
    toy_raw["learner"].update(steps=5)
    toy_raw["checkpoint"] = {"every": 0}
    toy_raw["eval"] = {"enabled": False}
    r = CliRunner().invoke(app, ["train", str(write_config(toy_raw)), "--mode", "local", "--profile", "2", "--no-progress"])
    assert r.exit_code == 0, r.output
    cfg = cfg_for(toy_raw, tmp_path, "run")
    # Step 1 and worker 0's first batch warm up; the next two of each are traced; later ones are not.
    assert list(trace_files(cfg)) == ["learner-rank0-step000002.json", "learner-rank0-step000003.json",
                                      "rollout-0-batch000002.json", "rollout-0-batch000003.json"]
    assert "profile: 4 Chrome traces in" in r.output and "ui.perfetto.dev" in r.output
    steps, _ = read_metrics(cfg.output_path / "metrics.jsonl")
    assert [s["step"] for s in steps] == [1, 2, 3, 4, 5] and not any("traces" in s for s in steps)


@pytest.mark.slow
def test_ray_run_ships_the_rollout_workers_and_learners_traces_to_the_driver(ray_local, toy_raw, tmp_path):
    cfg = cfg_for(lean(toy_raw), tmp_path, "ray", learner__steps=3, checkpoint__every=0,
                  rollout__workers=1, learner__world_size=1, logging__profile_steps=1)
    summary = train(cfg, mode="ray", show_progress=False)
    names = list(trace_files(cfg))
    # The rollout worker's and the learner's (DeepSpeed rank 0) second calls, after a warm-up each.
    assert names == ["learner-rank0-step000002.json", "rollout-0-batch000002.json"]
    assert summary["profile"] == [str(cfg.output_path / "profile" / n) for n in names]


def test_a_restarted_components_traces_do_not_overwrite_the_earlier_ones(tmp_path):
    """rollout-0 restarted (or the job resumed) profiles its first calls again under the same
    names: both traces are kept, the later one numbered."""
    from danceopd.profiling import write_traces

    first = write_traces(tmp_path, {"rollout-0-batch-1.json": b"[1]"})
    again = write_traces(tmp_path, {"rollout-0-batch-1.json": b"[2]", "learner-step-1.json": b"[3]"})
    third = write_traces(tmp_path, {"rollout-0-batch-1.json": b"[4]"})
    assert [p.name for p in first + again + third] == ["rollout-0-batch-1.json", "rollout-0-batch-1.2.json",
                                                        "learner-step-1.json", "rollout-0-batch-1.3.json"]
    assert [p.read_bytes() for p in first + again + third] == [b"[1]", b"[2]", b"[3]", b"[4]"]
