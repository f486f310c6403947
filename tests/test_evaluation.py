"""What a user sees (issue 12): evaluation during training (metrics.jsonl, Prometheus, /status,
TensorBoard), sample grids and curves under the run folder, `danceopd sample` / `danceopd eval` on
checkpoints of either mode, full or LoRA, and a failure that prints one line."""

from __future__ import annotations

import copy
import json
import os
import shutil
import urllib.request

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from danceopd.checkpoint import latest_checkpoint, load_tensors
from danceopd.evaluate import Evaluator, rmse, shapes_metrics
from services.cli import app
from services.loop import TrainLoop
from services.telemetry.progress import read_metrics
from tests.conftest import ROOT, cfg_for

ROUTES = ("t2i", "local_edit", "global_edit")


@pytest.fixture
def shapes_raw(tmp_path) -> dict:
    """configs/demo.yaml (ShapesBench) as a dict, its dataset copied into tmp_path, one worker and rank,
    a random student and a route per ShapesBench task, each with its oracle (the demo has the edit routes)."""
    raw = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    shutil.copytree(ROOT / "configs" / "data" / "shapes", tmp_path / "data" / "shapes")
    raw["student"] = {"init": "random"}
    raw["teachers"] = [{"name": f"{t}_teacher", "kind": "oracle", "std": 0.05, "tasks": [t]} for t in ROUTES]
    raw["routing"] = {"routes": [{"name": t, "teacher": f"{t}_teacher", "task": t, "requires_source_image": t != "t2i"}
                                 for t in ROUTES]}
    raw["rollout"].update(workers=1, batch_size=4)
    raw["learner"].update(world_size=1)
    raw["eval"].update(prompts=4)
    return copy.deepcopy(raw)


def run_loop(cfg, mode: str) -> tuple[dict, dict, dict]:
    """(summary, /status, the controller's /metrics in Ray mode) of one job run to its end; the
    metrics keyed by name and labels but the job labels, which every series carries."""
    loop = TrainLoop(cfg, mode, show_progress=False)
    try:
        summary = loop.run()
        status = loop.status()
        scraped = {}
        if loop.telemetry.metrics is not None:
            text = urllib.request.urlopen(f"http://127.0.0.1:{loop.telemetry.metrics.port}/metrics", timeout=10).read()
            samples = [s for fam in text_string_to_metric_families(text.decode()) for s in fam.samples]
            run = {"job": cfg.job.name, "run_id": loop.run_id}
            assert all(s.labels.items() >= run.items() for s in samples)
            scraped = {(s.name, tuple(sorted(kv for kv in s.labels.items() if kv[0] not in run))): s.value for s in samples}
    finally:
        loop.shutdown()
    return summary, status, scraped


def png(path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def board(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def check_run_folder(cfg, evals: list[dict]) -> None:
    """Every evaluation has its grids; the run has its curves; TensorBoard holds the same numbers."""
    out = cfg.output_path
    for e in evals:
        assert set(e["eval"]) == set(ROUTES) and all(e["eval"][r] for r in ROUTES), e
        for route in ROUTES:
            grid = png(out / "samples" / f"step-{e['step']:08d}" / f"{route}.png")
            assert grid.shape[0] == 14 + cfg.eval.prompts * (64 + 4)  # header + one row per prompt
    assert {p.name for p in (out / "plots").iterdir()} == {"loss.png", "eval.png"}
    for name in ("loss.png", "eval.png"):
        assert png(out / "plots" / name).std() > 10  # a drawing, not a blank page
    acc = board(out / "tensorboard")
    tags = set(acc.Tags()["scalars"])
    assert {"loss/all", "learner/grad_norm", "throughput/samples_per_s", "lag/last", "idle/learner", "eval/seconds",
            "idle/rollout_job"} <= tags, tags
    steps, _ = read_metrics(out / "metrics.jsonl")
    assert [e.step for e in acc.Scalars("loss/all")] == [s["step"] for s in steps]
    for route in ROUTES:
        for name, value in evals[-1]["eval"][route].items():
            got = acc.Scalars(f"eval/{route}/{name}")
            assert [e.step for e in got] == [e["step"] for e in evals]
            assert got[-1].value == pytest.approx(value, rel=1e-5)
        images = acc.Images(f"samples/{route}")
        assert [im.step for im in images] == [e["step"] for e in evals]
        grid = png(out / "samples" / f"step-{evals[-1]['step']:08d}" / f"{route}.png")
        assert (images[-1].height, images[-1].width) == grid.shape[:2]


def test_local_run_evaluates_on_schedule_and_shows_it_everywhere(toy_raw, tmp_path):
    cfg = cfg_for(toy_raw, tmp_path, "local", learner__steps=6, checkpoint__every=0, eval__every=2,
                  logging__tensorboard=True)
    summary, status, _ = run_loop(cfg, "local")
    steps, evals = read_metrics(cfg.output_path / "metrics.jsonl")
    assert len(steps) == 6 and [e["step"] for e in evals] == [0, 2, 4, 6]  # the start, every 2 steps, the end
    for e in evals:
        assert all(set(e["eval"][r]) == {"target_error", "teacher_rmse"} for r in ROUTES) and e["eval_seconds"] > 0
    # Fixed, seeded prompts and noise: the start evaluation is exactly a fresh evaluator's on the initial student.
    assert Evaluator(cfg).evaluate(None, 0)["routes"] == evals[0]["eval"]
    assert evals[-1]["eval"] != evals[0]["eval"]  # ... and later ones score the trained weights
    check_run_folder(cfg, evals)
    ev = summary["eval"]
    assert (ev["where"], ev["evaluations"], ev["skipped"], ev["failed"]) == ("in process", 4, 0, None)
    assert summary["eval_start"] == {r: evals[0]["eval"][r]["target_error"] for r in ROUTES}
    assert summary["eval_end"] == {r: evals[-1]["eval"][r]["target_error"] for r in ROUTES}
    assert status["eval"]["step"] == 6 and status["eval"]["routes"] == evals[-1]["eval"]
    assert summary["timers_s"]["eval"] > 0  # in process, evaluation costs the loop its time


def test_shapes_evaluation_metrics_grids_and_teacher_column(shapes_raw, tmp_path):
    """ShapesBench metrics where they exist: the ground truth scores perfectly, noise does not; the
    oracle teachers' samples are the ground truth; edit grids carry the source image column."""
    cfg = cfg_for(shapes_raw, tmp_path, "shapes")
    ev = Evaluator(cfg)
    result = ev.evaluate(None, 0)
    assert set(result["routes"]["t2i"]) == {"gt_rmse", "teacher_rmse", "attr_acc"}
    assert set(result["routes"]["local_edit"]) == {"gt_rmse", "teacher_rmse", "attr_acc", "preservation"}
    assert result["columns"]["t2i"] == ["student", "teacher", "ground truth"]
    assert result["columns"]["local_edit"] == ["source", "student", "teacher", "ground truth"]
    rows = ev.rows["t2i"]
    assert len(rows) == 4 and len({r.prompt for r in rows}) == 4
    for route in ROUTES:
        rows = ev.rows[route]
        truth = ev.backend.data_target(rows)
        task = cfg.route(route).task
        perfect = shapes_metrics(task, truth.numpy(), rows)
        noise = shapes_metrics(task, torch.rand_like(truth).mul(2).sub(1).numpy(), rows)
        assert perfect["attr_acc"] == 1.0 and noise["attr_acc"] < 0.5
        if task == "local_edit":
            assert perfect["preservation"] == 1.0 and noise["preservation"] < 0.5
        assert rmse(ev.teacher_samples()[route], truth) < 0.1  # the oracle's flow map ends on the truth
        assert result["routes"][route]["gt_rmse"] > 0.5  # an untrained student is far from it


@pytest.mark.ray
def test_ray_run_evaluates_in_its_own_actor_and_serves_it(ray_local, toy_raw, tmp_path):
    cfg = cfg_for(toy_raw, tmp_path, "ray", learner__steps=6, checkpoint__every=0, eval__every=2,
                  logging__tensorboard=True, control__metrics_port=0)
    summary, status, scraped = run_loop(cfg, "ray")
    _, evals = read_metrics(cfg.output_path / "metrics.jsonl")
    ev = summary["eval"]
    assert ev["where"] == "evaluator actor" and ev["failed"] is None
    done = [e["step"] for e in evals]
    assert done[0] == 0 and done[-1] == 6 and ev["evaluations"] + ev["skipped"] == 4, (done, ev)
    check_run_folder(cfg, evals)
    # The actor scored exactly the learner's final weights: an in-process evaluator of the checkpoint agrees.
    final = Evaluator(cfg).evaluate(load_tensors(latest_checkpoint(cfg.output_path) / "model.safetensors"), 6)
    assert final["routes"] == evals[-1]["eval"]
    for route in ROUTES:
        for name, value in evals[-1]["eval"][route].items():
            assert scraped[("danceopd_eval_metric", (("metric", name), ("route", route)))] == pytest.approx(value)
    assert scraped[("danceopd_eval_step", ())] == 6 and scraped[("danceopd_eval_seconds", ())] > 0
    assert status["eval"]["step"] == 6 and status["eval"]["where"] == "evaluator actor"

    # `danceopd sample` and `danceopd eval` read the Ray checkpoint (its own config.yaml).
    ckpt = latest_checkpoint(cfg.output_path)
    r = CliRunner().invoke(app, ["sample", str(ckpt), "--route", "t2i", "--prompt", "class 2", "--n", "3",
                                 "--out", str(tmp_path / "samples")])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["samples.json", "t2i-000.png", "t2i-001.png",
                                                                        "t2i-002.png"]
    r = CliRunner().invoke(app, ["eval", str(ckpt)])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[1].split() == ["route", "target_error", "teacher_rmse"]
    assert [ln.split()[0] for ln in lines[2:]] == list(ROUTES)
    assert float(lines[2].split()[1]) == pytest.approx(evals[-1]["eval"]["t2i"]["target_error"], abs=1e-4)


def test_sample_and_eval_a_lora_shapes_checkpoint(shapes_raw, tmp_path):
    cfg = cfg_for(shapes_raw, tmp_path, "lora", learner__steps=2, checkpoint__every=0, eval__enabled=False)
    cfg.student.lora.enabled = True
    loop = TrainLoop(cfg, "local", show_progress=False)
    try:
        loop.run()
    finally:
        loop.shutdown()
    ckpt = latest_checkpoint(cfg.output_path)
    assert all("lora_" in k for k in load_tensors(ckpt / "model.safetensors"))  # adapters only
    source = tmp_path / "data" / "shapes" / "images" / "local_edit-00000_src.png"
    out = tmp_path / "edits"
    r = CliRunner().invoke(app, ["sample", str(ckpt), "--route", "local_edit", "--prompt", "make the square magenta",
                                 "--source", str(source), "--n", "2", "--seed", "7", "--out", str(out)])
    assert r.exit_code == 0, r.output
    a, b = png(out / "local_edit-000.png"), png(out / "local_edit-001.png")
    assert a.shape == b.shape == (16, 16, 3) and not np.array_equal(a, b)  # two seeds, two samples
    r = CliRunner().invoke(app, ["eval", str(ckpt), "--json", "--out", str(tmp_path / "grids")])
    assert r.exit_code == 0, r.output
    got = json.loads(r.output)
    assert got["step"] == 2 and set(got["routes"]) == set(ROUTES) and "attr_acc" in got["routes"]["t2i"]
    assert {p.name for p in (tmp_path / "grids").iterdir()} == {f"{r}.png" for r in ROUTES}
    # Bad input: one line each, exit 2.
    for args, msg in [(["--route", "local_edit", "--prompt", "make the square magenta"], "--source: route 'local_edit' edits"),
                      (["--route", "t2i", "--prompt", "a purple unicorn"], "sample: row cli-sample: prompt word 'purple'"),
                      (["--route", "nope", "--prompt", "x"], "--route: unknown route 'nope'")]:
        r = CliRunner().invoke(app, ["sample", str(ckpt), *args, "--out", str(tmp_path / "bad")])
        assert r.exit_code == 2 and r.output.startswith(f"error: {msg}") and r.output.count("\n") == 1, r.output
    r = CliRunner().invoke(app, ["eval", str(tmp_path)])
    assert r.exit_code == 2 and r.output.strip() == f"error: {tmp_path}: not a checkpoint folder (no model.safetensors)"


def test_a_failed_job_prints_one_line_and_where_the_full_log_is(toy_raw, write_config, tmp_path, monkeypatch):
    from learner.learner import Learner

    def broken(self, batches):
        raise RuntimeError("boom in the learner\nsecond line")

    monkeypatch.setattr(Learner, "train_step", broken)
    raw = dict(toy_raw, learner={**toy_raw["learner"], "steps": 3})
    r = CliRunner().invoke(app, ["train", str(write_config(raw)), "--mode", "local", "--no-progress"])
    log = tmp_path / "run" / "error.log"
    assert r.exit_code == 1
    assert r.output.strip().splitlines()[-1] == f"error: RuntimeError: boom in the learner (full log: {log})"
    assert "Traceback" not in r.output and "Traceback" in log.read_text() and "second line" in log.read_text()


def test_evaluation_off_leaves_no_evaluator(toy_raw, tmp_path):
    cfg = cfg_for(toy_raw, tmp_path, "off", learner__steps=2, checkpoint__every=0, eval__enabled=False)
    summary, status, _ = run_loop(cfg, "local")
    assert summary["eval"] is None and summary["eval_start"] is None and status["eval"] is None
    assert read_metrics(cfg.output_path / "metrics.jsonl")[1] == [] and not (cfg.output_path / "samples").exists()
    assert os.listdir(cfg.output_path / "plots") == ["loss.png"]
