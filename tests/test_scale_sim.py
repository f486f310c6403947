"""The `sim` backend on a local Ray cluster: the fleet overlaps what it should, and an expired
deadline is the failure of the actor that owes the answer. Behaviour tests, not benchmarks: the
margins are several-fold."""


import pytest

from services.loop import train
from services.telemetry.progress import read_metrics
from tests.conftest import cfg_for, lean

pytestmark = pytest.mark.ray


def step_interval(cfg) -> float:
    rows = read_metrics(cfg.output_path / "metrics.jsonl")[0]
    return (rows[-1]["time"] - rows[0]["time"]) / (len(rows) - 1)


def test_four_workers_roll_out_at_once(ray_local, sim_raw, tmp_path):
    """4 workers, 1 s per rollout batch, 4 batches per step: concurrent rollouts make a step
    take about 1 s; one at a time, 4 s."""
    cfg = cfg_for(lean(sim_raw), tmp_path, "overlap", backend__rollout_latency_s=1.0, backend__teacher_latency_s=0.0,
              backend__learner_latency_s=0.0, rollout__workers=4, learner__steps=5, learner__grad_accum=4,
              sync__max_policy_lag=1, replay__capacity=12)
    summary = train(cfg, mode="ray", show_progress=False)
    assert summary["steps"] == 5
    assert step_interval(cfg) < 0.5 * 4 * 1.0, step_interval(cfg)


def test_routes_of_a_batch_and_batches_are_routed_concurrently(ray_local, sim_raw, tmp_path):
    """Teacher calls take 0.4 s; a batch of 16 holds rows of all 3 routes and a step holds 2
    batches. Concurrent routing: ~0.4 s per step; routes one after another: >= 1.2 s; batches
    one after another: >= 0.8 s even with concurrent routes."""
    teachers = [dict(t, replicas=2) for t in sim_raw["teachers"]]
    raw = dict(sim_raw, teachers=teachers)
    cfg = cfg_for(raw, tmp_path, "route", backend__rollout_latency_s=0.0, backend__teacher_latency_s=0.4,
              backend__learner_latency_s=0.0, rollout__workers=2, rollout__batch_size=16, learner__steps=6,
              learner__grad_accum=2, sync__max_policy_lag=1, replay__capacity=8, routing__granularity="sample")
    train(cfg, mode="ray", show_progress=False)
    routes_per_step = [len(rec["route_loss"]) for rec in read_metrics(cfg.output_path / "metrics.jsonl")[0]]
    assert min(routes_per_step) == 3
    assert step_interval(cfg) < 0.75, step_interval(cfg)


def test_a_hung_teacher_is_blamed_and_restarted_until_its_budget_ends(ray_local, sim_raw, tmp_path):
    cfg = cfg_for(lean(sim_raw), tmp_path, "hung-teacher", backend__rollout_latency_s=0.0, backend__teacher_latency_s=30.0,
              rollout__workers=1, learner__steps=3, deadlines__teacher_s=0.5)
    with pytest.raises(RuntimeError, match=r"teacher:\w+ teacher:\w+-0: failed 4 times \(max_restarts=3\)") as e:
        train(cfg, mode="ray", show_progress=False)
    assert "rollout" not in str(e.value)


def test_a_hung_rollout_worker_is_restarted_until_its_budget_ends(ray_local, sim_raw, tmp_path):
    cfg = cfg_for(lean(sim_raw), tmp_path, "hung-worker", backend__rollout_latency_s=30.0, backend__teacher_latency_s=0.0,
              rollout__workers=1, rollout__max_restarts=1, learner__steps=3, deadlines__rollout_s=1.0)
    with pytest.raises(RuntimeError, match=r"rollout rollout-0: failed 2 times \(max_restarts=1\)"):
        train(cfg, mode="ray", show_progress=False)


def test_a_teachers_deadline_counts_service_time_not_the_queue(ray_local, sim_raw, tmp_path):
    """One replica serves every route, 0.3 s per ask; 3 batches are routed at once, each asking
    for up to 3 routes: an ask waits behind up to 8 others (2.4 s), far past teacher_s=0.6 s, yet
    each is served within it. A deadline counted from the queue would restart a healthy replica."""
    raw = lean(sim_raw)
    raw["routing"]["max_concurrent_batches"] = 3
    cfg = cfg_for(raw, tmp_path, "queue", backend__rollout_latency_s=0.0, backend__teacher_latency_s=0.3,
                  backend__learner_latency_s=0.0, rollout__workers=3, learner__steps=4, learner__grad_accum=3,
                  sync__max_policy_lag=1, replay__capacity=9, deadlines__teacher_s=0.6)
    summary = train(cfg, mode="ray", show_progress=False)
    assert summary["steps"] == 4
    assert summary["restarts"]["teacher"] == 0, summary["restarts"]
