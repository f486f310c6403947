"""The non-finite guard: NaN/Inf in a teacher's answer, the student's prediction, a loss or the
gradient norm never reaches the weights.

A batch whose teacher answered NaN is dropped before the replay queue (its route owed again), a
learner step that went non-finite is skipped (weights, optimizer state and version untouched),
each counted by role and route with the sample accounting exact; `learner.max_nonfinite_steps`
of them in a row end the job in one line naming the role and route. Teachers go NaN through the
`sim` backend's fault knobs (`backend.teacher_nan_from` / `teacher_nan_calls`), so the same
fault runs in a Ray actor; the learner's loss through a poisoned batch or a patched loss.
"""

from __future__ import annotations

import copy
import socket
import urllib.request

import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from danceopd.batch import nonfinite, replace_columns
from danceopd.checkpoint import CheckpointError, list_checkpoints, load_json, load_tensors, load_torch
from learner.learner import Learner
from services.loop import TrainLoop
from services.pipeline import RolloutPipeline
from services.runtime.failures import RoleFailure
from tests.conftest import cfg_for, lean
from tests.test_ray_runtime import assert_accounting_closes


def one_teacher(sim_raw, tmp_path, name, **over):
    """The sim job with one teacher serving every route (so "its third call" is one sequence),
    no latencies, no evaluation: milliseconds per step in one process."""
    raw = lean(sim_raw)
    base = dict(backend__rollout_latency_s=0.0, backend__teacher_latency_s=0.0, backend__learner_latency_s=0.0,
                rollout__workers=1, learner__steps=6, learner__grad_accum=2, sync__max_policy_lag=0,
                replay__capacity=4, checkpoint__every=0)
    return cfg_for(raw, tmp_path, name, **{**base, **over})


def poisoned(rb, column: str):
    """The batch with one value of `column` made non-finite."""
    x = rb.column(column).to_numpy_ndarray().copy()
    x[0, 0] = np.inf
    return replace_columns(rb, **{column: x})


# ---- the check and the ledger ------------------------------------------------------------------

def test_nonfinite_names_the_first_bad_value():
    assert nonfinite(a=torch.ones(3), b=np.zeros(2), c=1.5) is None
    assert nonfinite(a=torch.ones(3), b=np.array([0.0, np.nan]), c=torch.tensor(float("inf"))) == "b"
    assert nonfinite(**{"net.0.weight": torch.tensor([1.0, -float("inf")])}) == "net.0.weight"


def test_pipeline_refused_batches_and_skipped_steps_are_dropped_owed_and_counted():
    p = RolloutPipeline(per_step=2, total_steps=4, capacity=8, max_lag=0, by_route=True)
    p.worker_version.update(a=0)
    for t in range(4):
        p.issue(t, "a", 4, route="A")
    assert p.refuse(1, "A") == 1 and p.owed == ["A"]
    assert p.refuse(2, "A") == 2  # in a row
    p.completed(0, "h0", 0)
    assert p.refused_in_a_row == {}  # a good batch of the route ends the run
    p.completed(3, "h3", 0)
    assert list(p.queued) == [0, 3]  # the refused tickets are skipped in ticket order
    # positions were given back: tickets 0 and 3 make step 0, replacements belong to step 1
    assert p.position == 2 and p.plan(["a"]) == []  # on-policy: they wait for its weights
    take = p.take()
    assert take.tickets == [0, 3] and p.counts["consumed"] == 8
    assert p.skip_step() == 1 and p.step == 0  # not a step
    assert p.owed == ["A", "A", "A", "A"] and p.position == 0 and p.lag_counts == {}
    assert p.plan(["a"]) == ["a"]  # the step is taken again on fresh batches: no deadlock at the gate
    acct = p.accounting()
    assert acct["dropped"] == {"nonfinite": 16} and acct["consumed"] == 0 and acct["produced"] == 16
    assert acct["issued"] == acct["produced"] + acct["lost"] + acct["in_flight"]
    assert p.nonfinite_counts() == {"teacher": {"A": 2}, "learner": {"A": 1}}
    for t in range(4, 6):
        p.issue(t, "a", 4, route="A")
        p.completed(t, f"h{t}", 0)
    p.take()
    p.stepped()
    assert p.step == 1 and p.skipped_in_a_row == 0 and p.counts["consumed"] == 8


# ---- teachers: local mode, then Ray mode ----------------------------------------------------------

def test_teacher_nan_for_two_calls_drops_two_batches_and_the_job_finishes(sim_raw, tmp_path):
    cfg = one_teacher(sim_raw, tmp_path, "nan-twice", backend__teacher_nan_from=3, backend__teacher_nan_calls=2)
    loop = TrainLoop(cfg, "local", show_progress=False)
    try:
        summary = loop.run()
    finally:
        loop.shutdown()
    assert summary["steps"] == cfg.learner.steps
    acct = summary["accounting"]
    assert_accounting_closes(acct)
    assert acct["dropped"] == {"nonfinite": 2 * cfg.rollout.batch_size}
    assert acct["consumed"] == cfg.learner.steps * cfg.learner.grad_accum * cfg.rollout.batch_size
    assert sum(summary["nonfinite"]["teacher"].values()) == 2 and summary["nonfinite"]["learner"] == {}
    assert loop.status()["nonfinite"] == summary["nonfinite"]


def failure_of(loop) -> str:
    """Run a job that must end in a RoleFailure; its one line."""
    try:
        with pytest.raises(RoleFailure) as err:
            loop.run()
    finally:
        loop.shutdown()
    return str(err.value)


def test_teacher_always_nan_ends_the_job_in_one_line_naming_teacher_and_route(sim_raw, tmp_path):
    cfg = one_teacher(sim_raw, tmp_path, "nan-always", backend__teacher_nan_from=3)
    loop = TrainLoop(cfg, "local", show_progress=False)
    msg = failure_of(loop)
    route = next(iter(loop.pipe.nonfinite["teacher"]))
    assert msg == (f"teacher teacher (route {route}): 3 batches in a row with NaN/Inf in the answer, each dropped "
                   "(learner.max_nonfinite_steps=3)"), msg
    assert loop.status()["state"] == "failed" and loop.status()["nonfinite"]["teacher"] == {route: 3}
    assert loop.step == 1  # calls 1 and 2 made the first step; nothing non-finite was learned from


@pytest.mark.slow
def test_ray_teacher_nan_is_dropped_counted_and_exported(ray_local, sim_raw, tmp_path):
    """The same fault in a teacher actor: the scorer reports it in its meta (no batch travels),
    the job finishes with the accounting exact and the counter on /metrics and /status."""
    cfg = one_teacher(sim_raw, tmp_path, "ray-nan", backend__teacher_nan_from=3, backend__teacher_nan_calls=2)
    loop = TrainLoop(cfg, "ray", show_progress=False)
    try:
        summary = loop.run()
        status = loop.status()
        with urllib.request.urlopen(f"http://127.0.0.1:{loop.telemetry.metrics.port}/metrics", timeout=10) as r:
            served = [x for fam in text_string_to_metric_families(r.read().decode()) for x in fam.samples]
    finally:
        loop.shutdown()
    assert summary["steps"] == cfg.learner.steps
    acct = summary["accounting"]
    assert_accounting_closes(acct)
    assert acct["dropped"]["nonfinite"] == 2 * cfg.rollout.batch_size and acct["lost"] == 0
    assert sum(summary["nonfinite"]["teacher"].values()) == 2 and status["nonfinite"] == summary["nonfinite"]
    counted = {(x.labels["role"], x.labels["route"]): x.value for x in served
               if x.name == "danceopd_nonfinite_total" and x.labels["run_id"] == loop.run_id}
    routes = [r.name for r in cfg.routing.routes]  # every series exists from the start, at 0
    assert counted == {(role, r): summary["nonfinite"].get(role, {}).get(r, 0) for role in ("teacher", "learner")
                       for r in routes}
    assert sum(v for (role, _), v in counted.items() if role == "teacher") == 2
    (dropped,) = [x.value for x in served if x.name == "danceopd_dropped_samples_total"
                  and x.labels == {"job": cfg.job.name, "run_id": loop.run_id, "reason": "nonfinite"}]
    assert dropped == 2 * cfg.rollout.batch_size
    assert summary["restarts"]["teacher"] == 0  # a NaN answer is no death: nobody is restarted
    from tests.test_faults import report

    report("teacher answers NaN (2 calls)", fault="NaN answers", lost_samples=acct["dropped"]["nonfinite"],
           outcome="every step, accounting exact, both batches dropped (`nonfinite`) and re-owed, no restart; "
                   "a teacher that stays NaN ends the job in one line")
    # A teacher that stays NaN: the loop's count (shared with local mode, tested there) ends the job.


# ---- the learner: plain, then DeepSpeed ZeRO-0 and ZeRO-2 --------------------------------------------

def routed(cfg, n):
    from tests.test_deepspeed_learner import routed_batches

    return routed_batches(cfg, n)


def toy_cfg(toy_raw, tmp_path, **learner):
    from tests.test_deepspeed_learner import make_cfg

    return make_cfg(toy_raw, tmp_path, grad_accum=2, **learner)


@pytest.mark.parametrize("column, what", [("target", "loss"), ("state", "prediction"), (None, "grad_norm")])
def test_plain_learner_skips_a_nonfinite_step_and_touches_nothing(toy_raw, tmp_path, column, what):
    cfg = toy_cfg(toy_raw, tmp_path)
    good = routed(cfg, 4)
    learner, ref = Learner(cfg), Learner(cfg)  # ref never sees the poisoned step
    for lr in (learner, ref):
        assert lr.train_step(good[:2])["skipped"] is None
    weights, opt = learner.export_weights(), copy.deepcopy(learner.optimizer_state())
    if column is None:  # a finite loss whose gradient overflows
        hook = learner.params[0].register_hook(lambda g: torch.full_like(g, float("inf")))
        out = learner.train_step(good[2:])
        hook.remove()
        assert np.isfinite(out["loss"])
    else:
        out = learner.train_step([good[2], poisoned(good[3], column)])
    assert out["skipped"] == what and out["version"] == 1
    assert all(torch.equal(weights[k], v) for k, v in learner.export_weights().items())
    assert all(torch.equal(a, b) for a, b in zip(tensors(opt), tensors(learner.optimizer_state()), strict=True))
    a, b = learner.train_step(good[2:]), ref.train_step(good[2:])
    assert a["loss"] == b["loss"] and a["version"] == b["version"] == 2
    assert all(torch.equal(v, ref.export_weights()[k]) for k, v in learner.export_weights().items())


def spawn(ray, cfg):
    from learner.deepspeed_learner import DeepSpeedLearner

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return ray.remote(num_cpus=1)(DeepSpeedLearner).remote(cfg, 0, 1, "127.0.0.1", port)


@pytest.mark.parametrize("stage", [0, 2])
def test_deepspeed_learner_skips_a_nonfinite_step_and_touches_nothing(ray_local, toy_raw, tmp_path, stage):
    """ZeRO-0: the learner's own check before engine.step(); ZeRO-2: DeepSpeed's overflow skip,
    read back. Either way the saved state (weights, optimizer partition) is bit for bit the one
    before, the version stays, engine.skipped_steps counts it, and the next step is the one a
    learner that never saw the poisoned batch takes."""
    cfg = toy_cfg(toy_raw, tmp_path, zero_stage=stage)
    good = routed(cfg, 4)
    rank, ref = spawn(ray_local, cfg), Learner(cfg)
    try:
        ray_local.get(rank.train_step.remote(good[:2]))
        ref.train_step(good[:2])
        before, after = tmp_path / f"before-{stage}", tmp_path / f"after-{stage}"
        ray_local.get(rank.save_checkpoint.remote(str(before)))
        out = ray_local.get(rank.train_step.remote([good[2], poisoned(good[3], "target")]))
        assert out["skipped"] == "loss" and out["version"] == 1 and not np.isfinite(out["grad_norm"])
        ray_local.get(rank.save_checkpoint.remote(str(after)))
        w0, w1 = load_tensors(before / "weights.safetensors"), load_tensors(after / "weights.safetensors")
        assert all(torch.equal(w0[k], w1[k]) for k in w0)
        o0, o1 = (load_torch(f / "optimizer-rank000.pt") for f in (before, after))
        flat = [(a, b) for a, b in zip(tensors(o0), tensors(o1), strict=True)]
        assert flat and all(torch.equal(a, b) for a, b in flat)
        e0, e1 = load_json(before / "engine.json"), load_json(after / "engine.json")
        assert e1["version"] == e0["version"] == 1 and e1["skipped_steps"] == e0["skipped_steps"] + 1
        a, b = ray_local.get(rank.train_step.remote(good[2:])), ref.train_step(good[2:])
        assert abs(a["loss"] - b["loss"]) <= 1e-6 and a["version"] == b["version"] == 2 and a["skipped"] is None
    finally:
        ray_local.get(rank.shutdown.remote())
        ray_local.kill(rank)


def tensors(x):
    """Every tensor of a nested state, in order."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        return [t for k in sorted(x, key=str) for t in tensors(x[k])]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in tensors(v)]
    return []


# ---- the learner in the loop ------------------------------------------------------------------------

def poison_loss(monkeypatch, calls):
    """The learner's micro-batch losses on the given calls (1-based) become NaN."""
    import learner.learner as mod

    real, n = mod.batch_loss, [0]

    def batch_loss(*a, **k):
        n[0] += 1
        loss, per_route, what = real(*a, **k)
        if n[0] in calls:
            return loss * float("nan"), per_route, "loss"
        return loss, per_route, what

    monkeypatch.setattr(mod, "batch_loss", batch_loss)


def test_a_skipped_learner_step_is_not_a_step_and_the_job_finishes(sim_raw, tmp_path, monkeypatch):
    cfg = one_teacher(sim_raw, tmp_path, "skip-once")
    poison_loss(monkeypatch, {5})  # step 3's first micro-batch
    loop = TrainLoop(cfg, "local", show_progress=False)
    try:
        summary = loop.run()
    finally:
        loop.shutdown()
    per_step = cfg.learner.grad_accum * cfg.rollout.batch_size
    assert summary["steps"] == cfg.learner.steps and loop.learner.learner.version == cfg.learner.steps
    acct = summary["accounting"]
    assert_accounting_closes(acct)
    assert acct["dropped"]["nonfinite"] == per_step and acct["consumed"] == cfg.learner.steps * per_step
    assert sum(summary["nonfinite"]["learner"].values()) == 1 and summary["nonfinite"]["teacher"] == {}


def test_learner_nan_in_a_row_ends_the_job_naming_the_route(sim_raw, tmp_path, monkeypatch):
    cfg = one_teacher(sim_raw, tmp_path, "skip-always", learner__max_nonfinite_steps=2, checkpoint__every=1)
    poison_loss(monkeypatch, set(range(5, 10**6)))  # every step from the third on
    loop = TrainLoop(cfg, "local", show_progress=False)
    msg = failure_of(loop)
    route = next(iter(loop.pipe.nonfinite["learner"]))
    assert msg == (f"learner (route {route}): 2 steps in a row with NaN/Inf in the loss, each skipped "
                   "(learner.max_nonfinite_steps=2)"), msg
    assert loop.step == 2 and [p.name for p in list_checkpoints(cfg.output_path)][-1] == "step-00000002"


def test_a_checkpoint_of_nonfinite_weights_is_never_written(toy_raw, tmp_path):
    cfg = cfg_for(toy_raw, tmp_path, "ckpt", learner__steps=2, checkpoint__every=1, checkpoint__keep=1,
                  eval__enabled=False)
    loop = TrainLoop(cfg, "local", show_progress=False)
    try:
        loop.run()
        (kept,) = list_checkpoints(cfg.output_path)
        with torch.no_grad():
            next(loop.learner.learner.model.parameters())[0, 0] = float("nan")
        loop.pipe.step += 1  # as if a step had made them
        with pytest.raises(CheckpointError, match=r"checkpoint of step 3: NaN/Inf in the weights \(net\.0\.weight\)"):
            loop.checkpoint()
    finally:
        loop.shutdown()
    assert list_checkpoints(cfg.output_path) == [kept]  # nothing written, the finite one not pruned
    assert not list((cfg.output_path / "checkpoints").glob(".tmp-*"))
