"""The local reference loop: learning, checkpoints, resume."""

import json

import pytest
import torch

from danceopd.checkpoint import latest_checkpoint, list_checkpoints, load_json, load_tensors
from danceopd.evaluate import toy_route_errors
from learner.learner import Learner
from services.loop import train
from services.telemetry.progress import read_metrics
from tests.conftest import ROOT, cfg_for


def final_weights(cfg):
    return load_tensors(latest_checkpoint(cfg.output_path) / "model.safetensors")


@pytest.mark.slow
def test_danceopd_moves_each_route_to_its_teacher(toy_raw, tmp_path):
    """A learning test: per-route error of the student's samples falls at least 5x."""
    cfg = cfg_for(toy_raw, tmp_path, "learn", learner__steps=400, checkpoint__every=0)
    learner = Learner(cfg)
    before = toy_route_errors(cfg, learner.backend, learner.model, n=128)
    summary = train(cfg, show_progress=False)
    learner.model.load_state_dict(final_weights(cfg))
    after = toy_route_errors(cfg, learner.backend, learner.model, n=128)
    for route in before:
        assert after[route] * 5 <= before[route], (route, before[route], after[route])
        assert summary["route_loss"][route]["end"] < summary["route_loss"][route]["start"]


def test_resume_gives_identical_weights(toy_raw, tmp_path):
    full = cfg_for(toy_raw, tmp_path, "full", learner__steps=12, checkpoint__every=4)
    train(full, show_progress=False)

    part = cfg_for(toy_raw, tmp_path, "part", learner__steps=7, checkpoint__every=4)
    train(part, show_progress=False)
    assert [p.name for p in list_checkpoints(part.output_path)] == ["step-00000004", "step-00000007"]
    resumed = cfg_for(toy_raw, tmp_path, "part", learner__steps=12, checkpoint__every=4)
    train(resumed, resume_from=list_checkpoints(part.output_path)[0], show_progress=False)

    a, b = final_weights(full), final_weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # and the route sequence continued: the router cursor matches the uninterrupted run
    sa = load_json(latest_checkpoint(full.output_path) / "state.json")["router"]
    sb = load_json(latest_checkpoint(resumed.output_path) / "state.json")["router"]
    assert sa == sb


def test_checkpoints_keep_last_and_are_complete(toy_raw, tmp_path):
    cfg = cfg_for(toy_raw, tmp_path, "keep", learner__steps=9, checkpoint__every=2, checkpoint__keep=2)
    summary = train(cfg, show_progress=False)
    names = [p.name for p in list_checkpoints(cfg.output_path)]
    assert names == ["step-00000008", "step-00000009"]
    root = cfg.output_path / "checkpoints"
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temporary folders left
    ck = latest_checkpoint(cfg.output_path)
    assert {"model.safetensors", "learner", "state.json", "COMPLETE"} <= {p.name for p in ck.iterdir()}
    assert (ck / "learner" / "optimizer.pt").is_file()
    assert summary["checkpoint"] == str(ck)
    steps, evals = read_metrics(cfg.output_path / "metrics.jsonl")
    assert len(steps) == 9 and set(steps[-1]["route_loss"]) <= {"t2i", "local_edit", "global_edit"}
    assert [e["step"] for e in evals] == [0, 9]  # eval.every 0: the start and the end


def test_all_methods_run(toy_raw, tmp_path):
    for method in ["danceopd", "diffusionopd", "flowopd", "offpolicy", "sft", "softmix"]:
        extra = {"method__flowopd_groups": 4} if method == "flowopd" else {}
        cfg = cfg_for(toy_raw, tmp_path, method, learner__steps=3, method__name=method, checkpoint__every=0,
                      eval__enabled=False, **extra)  # no evaluation: it would be most of the time
        summary = train(cfg, show_progress=False)
        assert summary["steps"] == 3
        assert all(v["end"] == v["end"] for v in summary["route_loss"].values())  # no NaN


def test_unknown_route_or_task_is_a_clear_error(toy_raw, tmp_path):
    import pytest

    from danceopd.batch import replace_columns
    from rollout_workers.worker import RolloutWorker
    from services.loop import make_router
    from services.runtime.local import local_scorer

    cfg = cfg_for(toy_raw, tmp_path, "unknown")
    router = make_router(cfg, 1)
    rb = RolloutWorker(cfg).rollout(router.next_order(4))
    bad = replace_columns(rb, route=["inpaint"] * rb.num_rows)
    with pytest.raises(KeyError, match="unknown route 'inpaint'"):
        local_scorer(cfg).route(bad)
    with pytest.raises(ValueError, match="task 'inpaint' has no samples"):
        router.dataset.sample("inpaint", router.data_rng)


@pytest.mark.subprocess
def test_local_mode_runs_the_shared_loop_without_importing_ray(toy_raw, tmp_path, write_config):
    """`--mode local` is the same loop over in-process parts; Ray is never imported."""
    import subprocess
    import sys

    raw = dict(toy_raw, learner={**toy_raw["learner"], "steps": 3}, checkpoint={"every": 0, "keep": 1})
    path = write_config(raw)
    code = ("import sys; from danceopd.config import load_config; from services.loop import train; "
            f"s = train(load_config({str(path)!r}), mode='local', show_progress=False); "
            "assert s['steps'] == 3 and s['mode'] == 'local'; "
            "print('ray imported' if any(m == 'ray' or m.startswith('ray.') for m in sys.modules) else 'no ray')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "no ray"


def test_local_mode_honours_the_lag_bound(toy_raw, tmp_path):
    """The staleness gate is the shared loop's, so local mode now runs ahead by max_policy_lag."""
    cfg = cfg_for(toy_raw, tmp_path, "lag", learner__steps=6, checkpoint__every=0, sync__max_policy_lag=1,
                  rollout__orders_per_worker=2)
    summary = train(cfg, show_progress=False)
    assert summary["lag_max"] == 1 and summary["replay"]["max_lag_seen"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("method", ["flowopd", "danceopd", "diffusionopd", "offpolicy"])
def test_summary_reports_eval_start_and_end_and_every_method_lowers_it(toy_raw, tmp_path, method):
    """summary.json carries the per-route evaluation error (evaluate.py's) at the start and the
    end of a run; each on-policy/off-policy method of configs/toy.yaml lowers it on every route."""

    cfg = cfg_for(toy_raw, tmp_path, method, method__name=method, learner__steps=120, checkpoint__every=0)
    summary = train(cfg, show_progress=False)
    on_disk = json.loads((cfg.output_path / "summary.json").read_text())
    start, end = on_disk["eval_start"], on_disk["eval_end"]
    assert set(start) == set(end) == {r.name for r in cfg.routing.routes} and summary["eval_end"] == end
    for route in start:
        assert end[route] < start[route], (method, route, start[route], end[route])


def _step_routes(cfg) -> list[set[str]]:
    return [set(rec["route_loss"]) for rec in read_metrics(cfg.output_path / "metrics.jsonl")[0]]


@pytest.mark.parametrize("extra", [{}, {"sync__max_policy_lag": 1, "sync__on_stale": "drop"},
                                   {"sync__max_policy_lag": 2, "rollout__orders_per_worker": 2}])
@pytest.mark.slow
def test_route_granularity_update_gives_every_step_one_route(toy_raw, tmp_path, extra):
    """granularity update (default): all micro-batches of an update (grad_accum 3) share one
    route, drawn by weight; with lag and on_stale drop too. sample: micro-batches mix routes."""
    cfg = cfg_for(toy_raw, tmp_path, "upd", learner__steps=40, learner__grad_accum=3, replay__capacity=9,
                  checkpoint__every=0, **extra)
    assert cfg.routing.granularity == "update"
    summary = train(cfg, show_progress=False)
    steps = _step_routes(cfg)
    assert len(steps) == 40 and all(len(r) == 1 for r in steps), steps
    assert set().union(*steps) == {"t2i", "local_edit", "global_edit"}  # all routes get updates
    assert summary["accounting"]["consumed"] == 40 * 3 * cfg.rollout.batch_size
    mixed = cfg_for(toy_raw, tmp_path, "smp", learner__steps=10, learner__grad_accum=3, replay__capacity=9,
                    checkpoint__every=0, routing__granularity="sample", **extra)
    train(mixed, show_progress=False)
    assert all(len(r) > 1 for r in _step_routes(mixed))


def test_route_granularity_update_resumes_the_route_sequence(toy_raw, tmp_path):
    full = cfg_for(toy_raw, tmp_path, "gfull", learner__steps=12, learner__grad_accum=2, checkpoint__every=5)
    train(full, show_progress=False)
    part = cfg_for(toy_raw, tmp_path, "gpart", learner__steps=5, learner__grad_accum=2, checkpoint__every=5)
    train(part, show_progress=False)
    resumed = cfg_for(toy_raw, tmp_path, "gpart", learner__steps=12, learner__grad_accum=2, checkpoint__every=5)
    train(resumed, show_progress=False, resume_from=latest_checkpoint(part.output_path))
    assert _step_routes(resumed)[-12:] == _step_routes(full)
