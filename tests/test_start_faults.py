"""Faults while members start, and two roles at once, in Ray mode on the `sim` backend.

A member that dies or hangs before its constructor finished (the sim backend's
`load_latency_s` stands in for a model load) is a restart of its role's budget, never the end
of the job; the job finishes every step with the accounting exact and one restart per death,
blamed on the role that died.
"""

import os
import signal
import threading
import time

import pytest

from services.loop import TrainLoop
from tests.test_faults import process_of, reap, report, small
from tests.test_ray_runtime import assert_accounting_closes

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def run_alongside(loop, faults, pids: list):
    """Run the job while `faults` runs in a thread; then end (exactly) the processes it hit."""
    t = threading.Thread(target=faults, daemon=True)
    t.start()
    try:
        return loop.run()
    finally:
        loop.shutdown()
        t.join(timeout=10)
        for pid in pids:
            if isinstance(pid, int):
                reap(pid)


def starting_process(group, name: str, timeout_s: float = 60.0) -> int:
    """The pid of pending member `name` once the fleet saw its constructor begin."""
    import ray._private.state as gcs

    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        p = group.pending.get(name)
        if p is not None and p.started:
            return int(gcs.actors(p.actor._actor_id.hex())["Pid"])
        time.sleep(0.005)
    raise AssertionError(f"{name} never started")


def test_members_that_die_or_hang_while_starting_are_restarted(ray_local, sim_raw, tmp_path):
    """A rollout worker added by `scale` SIGKILLed in its constructor, and a teacher replica
    added by `scale --teachers` SIGSTOPped in its constructor: each costs one restart, and the
    loop steps on while they start again."""
    cfg = small(sim_raw, tmp_path, "start-faults", backend__load_latency_s=1.5, deadlines__start_s=5.0,
                learner__steps=2000)  # the faults' thread stops the job once both members are back
    loop = TrainLoop(cfg, "ray", show_progress=False)
    seen, pids = {}, []

    def faults():
        while loop.step < 2:
            time.sleep(0.01)
        loop.request_scale(rollout_workers=3)
        pids.append(starting_process(loop.fleet.rollout, "rollout-2"))
        os.kill(pids[-1], signal.SIGKILL)
        while loop.step < 6:
            time.sleep(0.01)
        loop.request_scale(teachers={"t2i": 2})
        pids.append(starting_process(loop.fleet.teachers["teacher"], "teacher:teacher-1"))
        seen["step_hung"] = loop.step
        os.kill(pids[-1], signal.SIGSTOP)
        while loop.fleet.restarts()["teacher"] == 0 and loop.state == "running":
            time.sleep(0.01)
        seen["step_restarted"] = loop.step
        while "teacher:teacher-1" not in loop.fleet.teachers["teacher"].members and loop.state == "running":
            time.sleep(0.01)
        seen["joined"] = "teacher:teacher-1" in loop.fleet.teachers["teacher"].members
        seen["workers"] = len(loop.fleet.workers())
        step = loop.step
        while loop.step < step + 3 and loop.state == "running":  # training goes on with them
            time.sleep(0.01)
        loop.request_stop("test")

    summary = run_alongside(loop, faults, pids)
    assert len(pids) == 2, "a fault was never injected"
    assert loop.stopped_by == "test", "the job ended before the faults' thread was done"
    acct = summary["accounting"]
    assert_accounting_closes(acct)
    assert acct["consumed"] == summary["steps"] * cfg.learner.grad_accum * cfg.rollout.batch_size
    assert summary["restarts"] == {"rollout": 1, "teacher": 1, "router": 0}, summary["restarts"]
    assert seen["step_restarted"] > seen["step_hung"]  # the loop stepped while the replica hung
    assert seen["joined"] and seen["workers"] == 3  # both restarted members joined
    report("members killed / hung while starting", fault="SIGKILL / SIGSTOP in the constructor",
           outcome="1 restart each (a hung one after deadlines.start_s), both join, the loop steps on; accounting exact",
           lost_samples=acct["lost"])


def test_router_and_rollout_worker_killed_together(ray_local, sim_raw, tmp_path):
    """Two roles at once: each is rebuilt and blamed once, nobody else."""
    cfg = small(sim_raw, tmp_path, "two-roles", backend__teacher_latency_s=0.1, deadlines__route_s=20.0,
                deadlines__teacher_s=10.0)
    loop = TrainLoop(cfg, "ray", show_progress=False)
    pids = []

    def faults():
        while loop.step < 4 and loop.state in ("starting", "running"):
            time.sleep(0.01)
        pids.extend([process_of(loop.fleet.scorer.only), process_of(loop.fleet.rollout.members["rollout-0"].actor)])
        t0 = time.perf_counter()
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        restarts = loop.fleet.restarts
        while (restarts()["router"] == 0 or restarts()["rollout"] == 0) and loop.state == "running":
            time.sleep(0.005)
        step = loop.step
        while loop.step == step and loop.state == "running":
            time.sleep(0.005)
        pids.append(time.perf_counter() - t0)

    summary = run_alongside(loop, faults, pids)
    assert len(pids) == 3, "the faults were never injected or never recovered"
    assert summary["steps"] == cfg.learner.steps
    acct = summary["accounting"]
    assert_accounting_closes(acct)
    assert acct["consumed"] == cfg.learner.steps * cfg.learner.grad_accum * cfg.rollout.batch_size
    assert summary["restarts"] == {"rollout": 1, "teacher": 0, "router": 1}, summary["restarts"]
    report("router and a rollout worker at once", fault="SIGKILL", recovered_s=round(pids[2], 2),
           lost_samples=acct["lost"], outcome="every step, accounting exact, 1 restart of each and 0 of any other")


def test_a_learner_gang_whose_rank_0_port_is_taken_starts_again(ray_local, sim_raw, tmp_path, monkeypatch, capsys):
    """Rank 0's rendezvous port is found free, then taken by another process before rank 0 binds
    it (two clusters on one machine do that): the gang dies while starting and is started again
    on a new port, instead of failing the job."""
    import socket

    import services.runtime.ray_learner as ray_learner
    from services.runtime.placement import role_specs
    from services.runtime.ports import free_port

    taken = socket.socket()
    taken.bind(("", 0))
    taken.listen()  # held by this test until the end
    flag = tmp_path / "first-call-done"

    def port_then_free(busy=taken.getsockname()[1], flag=str(flag)):  # runs in a Ray task
        if not os.path.exists(flag):
            open(flag, "w").close()
            return free_port()[0], busy
        return free_port()

    monkeypatch.setattr(ray_learner, "free_port", port_then_free)
    cfg = small(sim_raw, tmp_path, "port", learner__world_size=2, learner__num_cpus=0.2)
    try:
        learner = ray_learner.RayLearner(cfg, role_specs(cfg)["learner"]).started()
        try:
            assert len(learner.ranks) == 2 and learner.failed is None
            assert learner._addr[1] != taken.getsockname()[1]
        finally:
            learner.shutdown()
    finally:
        taken.close()
    out = capsys.readouterr().out
    assert "learner learner-0: starting: died" in out and "starting the learner's ranks again (1 of 2)" in out, out
