"""Fault injection, one test per role, in Ray mode on the `sim` backend.

A fault is a real process fault: the actor's process is found through Ray's GCS actor table
(`ray._private.state.actors`; the public `ray.util.state` needs the dashboard, which the test
cluster does not run) and sent SIGKILL (death) or SIGSTOP (alive, never answering). For each:
the job either finishes every step with the sample accounting exact, or (a learner rank) fails
within a bound with one line naming the rank, and resuming continues to the end. Every fault
is blamed on the role that failed: no other role's restart counter moves.

Set DANCEOPD_FAULT_REPORT=path.json to collect each test's recovery seconds (the README table).
"""

import json
import os
import signal
import threading
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from danceopd.checkpoint import latest_checkpoint
from services.loop import TrainLoop
from services.runtime.failures import RoleFailure
from tests.conftest import cfg_for, lean
from tests.test_ray_runtime import assert_accounting_closes

pytestmark = pytest.mark.ray

ROLES = ("rollout", "teacher", "router")


def small(sim_raw, tmp_path, name, **over):
    """2 workers, 0.15 s rollouts, lag 1 and four orders per worker, in calls of two (one runs,
    one waits): several batches of one worker, and of one scorer call, are in flight when a
    role dies, so one death must cost one restart, not two."""
    base = dict(backend__rollout_latency_s=0.15, backend__teacher_latency_s=0.02, backend__learner_latency_s=0.01,
                rollout__workers=2, rollout__orders_per_worker=4, rollout__max_restarts=1, learner__steps=16,
                learner__grad_accum=2, sync__max_policy_lag=1, replay__capacity=8, checkpoint__every=0)
    return cfg_for(lean(sim_raw), tmp_path, name, **{**base, **over})


def process_of(actor) -> int:
    import ray._private.state as gcs

    return int(gcs.actors(actor._actor_id.hex())["Pid"])


def reap(pid) -> None:
    """A stopped process the job replaced is still ours to end (exactly that pid)."""
    if pid is not None:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def report(name: str, **figures) -> None:
    path = os.environ.get("DANCEOPD_FAULT_REPORT")
    if path:
        rows = json.loads(open(path).read()) if os.path.exists(path) else {}
        rows[name] = figures
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)


class Fault(threading.Thread):
    """Once the loop reaches `at_step`, send `sig` to the process of `pick(loop)`; then time how
    long until the role's restart counter moved and one more learner step was done."""

    def __init__(self, loop, pick, role: str, sig=signal.SIGKILL, at_step: int = 4):
        super().__init__(daemon=True)
        self.loop, self.pick, self.role, self.sig, self.at_step = loop, pick, role, sig, at_step
        self.t_fault = self.recovered_s = None
        self.pid = None

    def run(self):
        loop = self.loop
        while loop.step < self.at_step and loop.state in ("starting", "running"):
            time.sleep(0.01)
        self.pid = process_of(self.pick(loop))
        before = dict(loop.fleet.restarts()) if self.role in ROLES else {}
        self.t_fault = time.perf_counter()
        os.kill(self.pid, self.sig)
        while loop.state in ("starting", "running"):
            if self.role in ROLES and loop.fleet.restarts()[self.role] > before[self.role]:
                step = loop.step
                while loop.step == step and loop.state == "running":
                    time.sleep(0.005)
                self.recovered_s = time.perf_counter() - self.t_fault
                return
            time.sleep(0.005)


def fails_with(loop, fault) -> tuple[str, float]:
    """Run a job `fault` must end: its one line, and seconds from the fault."""
    fault.start()
    try:
        with pytest.raises(RoleFailure) as err:
            loop.run()
        return str(err.value), time.perf_counter() - fault.t_fault
    finally:
        loop.shutdown()
        fault.join(timeout=5)
        reap(fault.pid)


def run_with_fault(cfg, pick, role, sig=signal.SIGKILL, at_step=4):
    loop = TrainLoop(cfg, "ray", show_progress=False)
    fault = Fault(loop, pick, role, sig, at_step)
    fault.start()
    try:
        summary = loop.run()
        fault.status = loop.status()
        with urllib.request.urlopen(f"http://127.0.0.1:{loop.telemetry.metrics.port}/metrics", timeout=10) as r:
            fault.metrics = r.read().decode()
    finally:
        loop.shutdown()
        fault.join(timeout=5)
        reap(fault.pid)
    assert fault.pid is not None, "the fault was never injected"
    return summary, fault


def assert_recovered(summary, cfg, role, fault, name):
    assert summary["steps"] == cfg.learner.steps
    acct = summary["accounting"]
    assert_accounting_closes(acct)
    assert acct["consumed"] == cfg.learner.steps * cfg.learner.grad_accum * cfg.rollout.batch_size
    restarts = summary["restarts"]
    assert restarts[role] == 1, restarts  # one death, one restart
    assert all(n == 0 for r, n in restarts.items() if r != role), restarts  # nobody else is blamed
    # ... and so say /status and the controller's metrics (the alerts read those).
    assert fault.status["restarts"][role] == 1 and fault.status["failures"][role] == 1, fault.status
    run = {"job": cfg.job.name, "run_id": fault.loop.run_id}  # on every series
    served = [x for fam in text_string_to_metric_families(fault.metrics) for x in fam.samples]

    def value(name: str, role: str) -> float:
        (v,) = [x.value for x in served if x.name == name and x.labels == {**run, "role": role}]
        return v

    assert value("danceopd_failures_total", role) == 1 and value("danceopd_restarts_total", role) == 1
    assert value("danceopd_failures_total", "learner") == 0
    assert fault.recovered_s is not None
    report(name, role=role, fault="SIGSTOP" if fault.sig == signal.SIGSTOP else "SIGKILL",
           recovered_s=round(fault.recovered_s, 2), lost_samples=acct["lost"], outcome="finished")
    return acct


def test_killed_rollout_worker_costs_one_restart(ray_local, sim_raw, tmp_path):
    cfg = small(sim_raw, tmp_path, "kill-rollout")
    summary, fault = run_with_fault(cfg, lambda loop: loop.fleet.rollout.members["rollout-0"].actor, "rollout")
    acct = assert_recovered(summary, cfg, "rollout", fault, "rollout worker")
    assert acct["lost"] > 0  # its batches were lost and re-issued


def test_killed_teacher_replica_is_blamed_and_replaced(ray_local, sim_raw, tmp_path):
    cfg = small(sim_raw, tmp_path, "kill-teacher", backend__teacher_latency_s=0.1)
    summary, fault = run_with_fault(cfg, lambda loop: loop.fleet.teachers["teacher"].members["teacher:teacher-0"].actor, "teacher")
    assert_recovered(summary, cfg, "teacher", fault, "teacher replica")


def test_killed_router_scorer_is_replaced_without_losing_a_batch(ray_local, sim_raw, tmp_path):
    # A short routing deadline: a batch the new scorer never got would fail this test in 20 s (the
    # teacher deadline below it, as the config requires).
    cfg = small(sim_raw, tmp_path, "kill-router", backend__teacher_latency_s=0.1, deadlines__route_s=20.0,
                deadlines__teacher_s=10.0)
    summary, fault = run_with_fault(cfg, lambda loop: loop.fleet.scorer.only, "router")
    acct = assert_recovered(summary, cfg, "router", fault, "router (scorer)")
    assert acct["lost"] == 0  # batches being scored were scored again by the new scorer


def test_killed_driver_resumes_from_its_checkpoint_with_exact_accounting(ray_local, sim_raw, tmp_path, write_config):
    """The driver holds the pipeline's whole state (tickets, routes, replay contents, weights):
    SIGKILL it mid-run (its actors die with it) and `--resume auto` finishes the job from the
    last checkpoint, the route sequence continuing at the checkpoint's ticket."""
    import subprocess
    import sys

    import psutil

    from danceopd.checkpoint import load_json

    cfg = small(sim_raw, tmp_path, "driver", learner__steps=12, checkpoint__every=3, checkpoint__keep=10)
    path = write_config({k: v for k, v in cfg.model_dump(mode="json").items() if k != "base_dir"})
    cmd = [sys.executable, "-m", "services.cli", "train", str(path), "--mode", "ray", "--address",
           ray_local.get_runtime_context().gcs_address]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            ckpt = latest_checkpoint(cfg.output_path)
            if ckpt is not None and int(ckpt.name.split("-")[1]) >= 6:
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the job ended before it could be killed"
        children = psutil.Process(proc.pid).children(recursive=True)
        proc.kill()  # SIGKILL: no final checkpoint, no clean shutdown
        proc.wait(timeout=30)
    finally:
        for child in [proc, *locals().get("children", [])]:
            try:
                child.kill()
            except (ProcessLookupError, psutil.NoSuchProcess):
                pass
    ckpt = latest_checkpoint(cfg.output_path)
    step = int(ckpt.name.split("-")[1])
    assert 6 <= step < cfg.learner.steps
    state = load_json(ckpt / "state.json")
    t_resume = time.perf_counter()
    resumed = TrainLoop(cfg, "ray", resume_from=ckpt, show_progress=False)
    try:
        assert resumed.step == step and resumed.router.next_ticket == state["router"]["next_ticket"]
        assert resumed.run_id == state["run_id"]
        summary = resumed.run()
    finally:
        resumed.shutdown()
    assert summary["steps"] == cfg.learner.steps
    acct = summary["accounting"]
    assert_accounting_closes(acct)
    per_step = cfg.learner.world_size * cfg.learner.grad_accum * cfg.rollout.batch_size
    assert acct["consumed"] == (cfg.learner.steps - step) * per_step  # the resumed run learned exactly the rest
    report("driver", fault="SIGKILL", outcome=f"its actors die with it; `--resume auto` from step {step} "
           f"finishes every step, accounting exact ({time.perf_counter() - t_resume:.2f} s with start-up)")


def test_hung_teacher_is_restarted_and_the_job_finishes(ray_local, sim_raw, tmp_path):
    cfg = small(sim_raw, tmp_path, "hung-teacher", deadlines__teacher_s=1.5)
    summary, fault = run_with_fault(cfg, lambda loop: loop.fleet.teachers["teacher"].members["teacher:teacher-0"].actor, "teacher", signal.SIGSTOP)
    assert_recovered(summary, cfg, "teacher", fault, "teacher replica (hung)")


def test_hung_rollout_worker_is_restarted_and_the_job_finishes(ray_local, sim_raw, tmp_path):
    cfg = small(sim_raw, tmp_path, "hung-rollout", deadlines__rollout_s=1.5)
    summary, fault = run_with_fault(cfg, lambda loop: loop.fleet.rollout.members["rollout-1"].actor, "rollout",
                                    signal.SIGSTOP)
    assert_recovered(summary, cfg, "rollout", fault, "rollout worker (hung)")


def test_killed_learner_rank_fails_fast_naming_it_and_resume_finishes(ray_local, sim_raw, tmp_path):
    cfg = small(sim_raw, tmp_path, "kill-learner", learner__world_size=2, learner__num_cpus=0.2, checkpoint__every=3,
                checkpoint__keep=5, learner__steps=12)
    loop = TrainLoop(cfg, "ray", show_progress=False)
    fault = Fault(loop, lambda lp: lp.learner.ranks[1], "learner", at_step=7)
    msg, failed_after = fails_with(loop, fault)
    assert msg.startswith("learner learner-1: ") and "died" in msg and "\n" not in msg, msg
    assert failed_after < 60, failed_after  # not the collective's timeout
    assert loop.status()["state"] == "failed"
    ckpt = latest_checkpoint(cfg.output_path)
    assert ckpt is not None and int(ckpt.name.split("-")[1]) >= 6
    t0 = time.perf_counter()
    resumed = TrainLoop(cfg, "ray", resume_from=ckpt, show_progress=False)
    try:
        summary = resumed.run()
    finally:
        resumed.shutdown()
    assert summary["steps"] == cfg.learner.steps
    assert_accounting_closes(summary["accounting"])
    report("learner rank", role="learner", fault="SIGKILL", failed_after_s=round(failed_after, 2),
           resume_to_end_s=round(time.perf_counter() - t0, 2), outcome="fails naming the rank; --resume auto finishes")


def test_a_recovered_fault_is_one_line_on_the_console(ray_local, sim_raw, tmp_path, write_config):
    """`danceopd train` as a user runs it (joined to a cluster, so actor output streams to the
    console): a rollout worker SIGKILLed mid-run shows as our one line, with no traceback and
    none of Ray's worker-death paragraphs."""
    import subprocess
    import sys

    import ray._private.state as gcs

    cfg = small(sim_raw, tmp_path, "console", learner__steps=16)
    path = write_config({k: v for k, v in cfg.model_dump(mode="json").items() if k != "base_dir"})
    mine = ray_local.get_runtime_context().get_job_id()
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "train", str(path), "--mode", "ray", "--address",
                             ray_local.get_runtime_context().gcs_address, "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        victim, deadline = None, time.time() + 240
        while victim is None and time.time() < deadline and proc.poll() is None:
            metrics = cfg.output_path / "metrics.jsonl"
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 4:
                workers = [a for a in gcs.actors().values() if a["ActorClassName"] == "RolloutWorkerActor"
                           and a["State"] == "ALIVE" and a["JobID"] != mine]
                victim = min(workers, key=lambda a: a["Name"] or a["ActorID"]) if workers else None
            time.sleep(0.1)
        assert victim is not None, "no rollout worker of the job was found"
        os.kill(int(victim["Pid"]), signal.SIGKILL)
        out, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-3000:]
    died = [line for line in out.splitlines() if ": died" in line]
    assert len(died) == 1 and died[0].startswith("rollout rollout-") and died[0].endswith("restarting"), out[-3000:]
    assert "Traceback" not in out and "(raylet)" not in out, out[-3000:]


def test_hung_learner_rank_is_named_not_rank_0_blocked_waiting_for_it(ray_local, sim_raw, tmp_path):
    """SIGSTOP learner rank 1 mid-run: rank 0 blocks in the step's collective (or a weight export)
    waiting for it, so neither finishes; past the deadline the job fails in one line naming rank 1,
    the one rank that does not answer the liveness probe, within the deadline plus the probe's bound."""
    from services.runtime.ray_learner import PROBE_S

    deadline_s = 3.0  # the step's deadline, and the weight export's (the push after a step may be in flight)
    cfg = small(sim_raw, tmp_path, "hung-learner", learner__world_size=2, learner__num_cpus=0.2, learner__steps=12,
                deadlines__learner_step_s=deadline_s, sync__timeout_s=deadline_s)
    loop = TrainLoop(cfg, "ray", show_progress=False)
    fault = Fault(loop, lambda lp: lp.learner.ranks[1], "learner", signal.SIGSTOP)
    msg, failed_after = fails_with(loop, fault)
    assert msg.startswith("learner learner-1: ") and "hung: no answer to a liveness probe" in msg and "\n" not in msg, msg
    assert failed_after < deadline_s + PROBE_S + 10, failed_after
    assert loop.status()["state"] == "failed"
    report("learner rank (hung)", role="learner", fault="SIGSTOP", failed_after_s=round(failed_after, 2),
           outcome="fails naming the rank")


def test_a_late_call_with_every_rank_alive_is_slow_not_hung(ray_local):
    """The other side of the probe: ranks busy in a long call still answer it, so a call past its
    deadline is reported as slow on all ranks, naming none as hung (no DeepSpeed needed)."""
    from services.runtime.actors import learner_rank_actor
    from services.runtime.ray_learner import RayLearner

    class Busy:
        def work(self) -> None:
            time.sleep(30)

    cls = ray_local.remote(num_cpus=0, concurrency_groups={"probe": 1})(learner_rank_actor(Busy))
    learner = object.__new__(RayLearner)
    learner.ranks, learner.failed = [cls.remote() for _ in range(2)], None
    try:
        ray_local.get([r.alive.remote() for r in learner.ranks])
        with pytest.raises(RoleFailure) as err:
            learner.wait([r.work.remote() for r in learner.ranks], "exporting weights", 1.0, fetch=False)
    finally:
        for r in learner.ranks:
            ray_local.kill(r)
    assert str(err.value) == ("learner: exporting weights: not done within 1 s on learner-0, learner-1; "
                              "all ranks alive (they answer a liveness probe): slow, not hung")
