"""The distributed runtime on a local Ray cluster: equivalence with the local loop, scale,
async lag bound, checkpoint/resume and rollout-worker failure."""

import threading
import time

import pytest
import torch

from danceopd.checkpoint import latest_checkpoint, list_checkpoints, load_json, load_tensors
from services.loop import TrainLoop, train
from services.telemetry.progress import read_metrics
from tests.conftest import cfg_for, lean

pytestmark = pytest.mark.ray


def assert_accounting_closes(acct):
    """Every issued sample is consumed, dropped (by reason) or lost; nothing is left in flight."""
    dropped = sum(acct["dropped"].values())
    assert acct["issued"] == acct["produced"] + acct["lost"]
    assert acct["produced"] == acct["consumed"] + dropped
    assert acct["in_flight"] == acct["queued"] == 0


def losses(cfg):
    return read_metrics(cfg.output_path / "metrics.jsonl")[0]


def test_ray_equals_local_on_policy(ray_local, toy_raw, tmp_path):
    """lag 0, one worker, one rank, same seed: same per-step losses and final weights."""
    common = dict(learner__steps=8, checkpoint__every=0, sync__max_policy_lag=0, rollout__workers=1, learner__world_size=1)
    local = cfg_for(lean(toy_raw), tmp_path, "local", **common)
    remote = cfg_for(lean(toy_raw), tmp_path, "ray", **common)
    train(local, show_progress=False)
    summary = train(remote, mode="ray", show_progress=False)
    a, b = losses(local), losses(remote)
    assert len(a) == len(b) == 8
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-6, abs=1e-6)
        for route in x["route_loss"]:
            assert y["route_loss"][route] == pytest.approx(x["route_loss"][route], rel=1e-6, abs=1e-6)
    wa = load_tensors(latest_checkpoint(local.output_path) / "model.safetensors")
    wb = load_tensors(latest_checkpoint(remote.output_path) / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-6)
    assert summary["replay"]["max_lag_seen"] == 0


# ZeRO-3 alone: the stage with code of its own (every rank gathers to export). Two ranks in Ray
# mode run at stage 0 in tests/test_faults.py and stage 1 in tests/test_multinode.py; stage 2
# with two ranks in tests/test_deepspeed_learner.py.
@pytest.mark.parametrize("stage", [3])
def test_scale_two_workers_two_ranks(ray_local, toy_raw, tmp_path, stage):
    cfg = cfg_for(toy_raw, tmp_path, f"zero{stage}", learner__steps=40, learner__world_size=2, learner__zero_stage=stage,
                  rollout__workers=2, rollout__batch_size=16, checkpoint__every=0, sync__max_policy_lag=1)
    summary = train(cfg, mode="ray", show_progress=False)
    assert summary["steps"] == 40
    # One route per update: a route's first and last step losses are single noisy steps, so
    # learning is judged by the evaluation error of the student's samples.
    for route, start in summary["eval_start"].items():
        assert summary["eval_end"][route] < start, route
    rows = losses(cfg)
    assert rows[-1]["workers"] == {"rollout": 2, "learner": 2, "teacher": 3}
    assert all(len(r["route_loss"]) == 1 for r in rows)  # granularity update: both ranks, one route
    acct = summary["accounting"]
    assert_accounting_closes(acct)
    assert acct["consumed"] == 40 * 2 * 16


def test_async_lag_bound_holds(ray_local, toy_raw, tmp_path):
    """lag 1: rollouts run ahead of the learner, and no consumed sample is older than 1 version."""
    cfg = cfg_for(lean(toy_raw), tmp_path, "lag1", learner__steps=30, rollout__workers=2, checkpoint__every=0,
                  sync__max_policy_lag=1, replay__capacity=8)
    summary = train(cfg, mode="ray", show_progress=False)
    lags = {int(k): v for k, v in summary["replay"]["lag_counts"].items()}
    assert max(lags) <= 1
    assert lags.get(1, 0) > 0, f"no overlap happened: {lags}"  # rollout really overlapped learning
    assert summary["replay"]["dropped"].get("stale", 0) == 0  # the wait gate wasted nothing


def test_drop_mode_never_exceeds_bound(ray_local, toy_raw, tmp_path):
    cfg = cfg_for(lean(toy_raw), tmp_path, "drop", learner__steps=12, rollout__workers=2, checkpoint__every=0,
                  sync__max_policy_lag=0, sync__on_stale="drop", replay__capacity=6)
    summary = train(cfg, mode="ray", show_progress=False)
    lags = {int(k) for k in summary["replay"]["lag_counts"]}
    assert lags == {0}
    acct = summary["accounting"]
    assert_accounting_closes(acct)


def test_resume_in_ray_mode(ray_local, toy_raw, tmp_path):
    # The uninterrupted run in local mode: at lag 0 the modes give the same weights
    # (test_ray_equals_local_on_policy), and it starts no actor.
    full = cfg_for(lean(toy_raw), tmp_path, "full", learner__steps=10, checkpoint__every=5, sync__max_policy_lag=0)
    train(full, mode="local", show_progress=False)
    part = cfg_for(lean(toy_raw), tmp_path, "part", learner__steps=5, checkpoint__every=5, checkpoint__keep=3)
    train(part, mode="ray", show_progress=False)
    resumed = cfg_for(lean(toy_raw), tmp_path, "part", learner__steps=10, checkpoint__every=5, checkpoint__keep=3)
    train(resumed, mode="ray", resume_from=latest_checkpoint(part.output_path), show_progress=False)
    assert [p.name for p in list_checkpoints(part.output_path)] == ["step-00000005", "step-00000010"]
    state = load_json(latest_checkpoint(resumed.output_path) / "state.json")
    assert state["version"] == 10 and state["mode"] == "ray"
    wa = load_tensors(latest_checkpoint(full.output_path) / "model.safetensors")
    wb = load_tensors(latest_checkpoint(resumed.output_path) / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-6)
    steps = [r["step"] for r in losses(resumed)]
    assert steps == list(range(1, 11))  # 1..5 from the first run, 6..10 appended on resume


def test_killed_rollout_worker_is_restarted(ray_local, toy_raw, tmp_path):
    import ray

    cfg = cfg_for(lean(toy_raw), tmp_path, "kill", learner__steps=40, rollout__workers=2, checkpoint__every=0,
                  sync__max_policy_lag=1, rollout__max_restarts=2)
    controller = TrainLoop(cfg, "ray", show_progress=False)
    fleet, old = controller.fleet, {}

    def kill_later():
        while controller.step < 5:
            time.sleep(0.05)
        victim = fleet.rollout.members["rollout-0"].actor
        old["pid"] = ray.get(victim.pid.remote())
        ray.kill(victim, no_restart=True)

    t = threading.Thread(target=kill_later, daemon=True)
    t.start()
    try:
        summary = controller.run()
        deadline = time.time() + 120
        while "rollout-0" not in fleet.rollout.members and time.time() < deadline:  # still starting
            fleet.poll(0.05)
        new = fleet.rollout.members["rollout-0"].actor
        new_pid, new_version = ray.get(new.pid.remote()), ray.get(new.get_version.remote())
    finally:
        controller.shutdown()
    t.join(timeout=5)
    assert new_pid != old["pid"]
    assert new_version >= 5  # the restarted worker pulled the latest weights, not the initial ones
    assert summary["steps"] == 40
    assert summary["restarts"]["rollout"] >= 1
    acct = summary["accounting"]
    assert_accounting_closes(acct)
    assert acct["consumed"] == 40 * cfg.rollout.batch_size


def test_collective_transport_matches_object_store(ray_local, toy_raw, tmp_path):
    """`collective` (gloo broadcast in buckets) delivers the same weights as `object_store`:
    identical runs give identical losses, and every sync is acknowledged and measured."""
    common = dict(learner__steps=6, checkpoint__every=0, sync__max_policy_lag=0, rollout__workers=2)
    a = cfg_for(lean(toy_raw), tmp_path, "store", **common)
    b = cfg_for(lean(toy_raw), tmp_path, "coll", **common, sync__transport="collective")
    sa = train(a, mode="ray", show_progress=False)
    sb = train(b, mode="ray", show_progress=False)
    for x, y in zip(losses(a), losses(b)):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-6)
    assert sb["weight_syncs"] >= 6 and sb["sync_bytes"] == sa["sync_bytes"] > 0


def test_autoscale_grows_rollout_fleet_when_learner_idles(ray_local, toy_raw, tmp_path):
    """Autoscaling on: with a learner that idles (threshold 0) the controller adds a rollout
    worker, up to the configured maximum, without restarting the learner."""
    raw = lean(toy_raw)
    raw["autoscale"] = {"enabled": True, "min_rollout_workers": 1, "max_rollout_workers": 2,
                        "learner_idle_above": 0.0, "window_steps": 2, "cooldown_steps": 0}
    raw["control"] = {"metrics_port": 0}
    # Growing does not wait for the new worker: it joins a few seconds later (its start-up). The
    # job is long; it is stopped once three steps ran with both workers.
    cfg = cfg_for(raw, tmp_path, "autoscale", learner__steps=100000, checkpoint__every=0, rollout__workers=1)
    loop = TrainLoop(cfg, "ray", show_progress=False)

    def stop_with_two():
        while loop.state in ("starting", "running"):
            rows = losses(cfg) if (cfg.output_path / "metrics.jsonl").exists() else []
            if sum(r["workers"]["rollout"] == 2 for r in rows) >= 3:
                loop.request_stop("test")
                return
            time.sleep(0.1)

    watcher = threading.Thread(target=stop_with_two, daemon=True)
    watcher.start()
    try:
        summary = loop.run()
    finally:
        loop.shutdown()
        watcher.join(timeout=5)
    counts = [r["workers"]["rollout"] for r in losses(cfg)]
    assert counts[0] == 1 and max(counts) == 2 and counts[-1] == 2
    assert summary["stopped_by"] == "test" and summary["steps"] == len(counts) < 100000
    assert sum(summary["restarts"].values()) == 0  # grown, not restarted


@pytest.mark.parametrize("first,second", [("local", "ray"), ("ray", "local")])
def test_resume_across_modes_carries_weights_routes_and_step(ray_local, toy_raw, tmp_path, capsys, first, second):
    """One checkpoint layout: a run resumes in the other mode with the same weights, route
    cursor and step; the optimizer state (another learner kind) restarts, said in one line."""
    a = cfg_for(lean(toy_raw), tmp_path, "cross", learner__steps=4, checkpoint__every=4, sync__max_policy_lag=0)
    train(a, mode=first, show_progress=False)
    ck = latest_checkpoint(a.output_path)
    b = cfg_for(lean(toy_raw), tmp_path, "cross", learner__steps=7, checkpoint__every=0, sync__max_policy_lag=0)
    loop = TrainLoop(b, second, resume_from=ck, show_progress=False)
    try:
        assert "the optimizer state restarts" in capsys.readouterr().err
        saved, now = load_tensors(ck / "model.safetensors"), loop.learner.export()
        for k in saved:
            torch.testing.assert_close(now[k], saved[k], rtol=0, atol=0)
        assert loop.step == 4 and loop.pipe.next_ticket == load_json(ck / "state.json")["router"]["next_ticket"]
        summary = loop.run()
    finally:
        loop.shutdown()
    assert summary["steps"] == 7
    state = load_json(latest_checkpoint(b.output_path) / "state.json")
    assert state["mode"] == second and state["step"] == 7
