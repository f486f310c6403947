"""SIGTERM / SIGINT to the driver (what `ray job stop`, a RayJob deletion or a pod eviction
sends): the job finishes the running step, writes the final checkpoint and exits 0, and
`--resume auto` continues from it; with slow rollouts in flight it exits within
`checkpoint.stop_grace_s` of the checkpoint, the rollouts counted as dropped."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import yaml

from danceopd.checkpoint import latest_checkpoint, load_json
from services.telemetry.progress import read_metrics
from tests.conftest import ROOT, cfg_for, lean
from tests.test_ray_runtime import assert_accounting_closes


def steps_logged(out) -> int:
    path = out / "metrics.jsonl"
    return len(read_metrics(path)[0]) if path.exists() else 0  # learner steps (evaluations have lines too)


def start_job(tmp_path, toy_raw, mode: str, steps: int, **extra):
    raw = dict(toy_raw)
    raw["learner"] = {**raw["learner"], "steps": steps}
    raw["checkpoint"] = {"every": 0, "keep": 2}
    raw["control"] = {"metrics_port": 0}
    raw.update(extra)
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0", "DS_ACCELERATOR": "cpu"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "services.cli", "train", str(cfg_path), "--mode", mode, "--no-progress"]
    # Its own session: the signal goes to exactly this driver, not to the test run.
    return subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True), cfg_path


def wait_for_steps(proc, out, n: int, timeout_s: float) -> None:
    t0 = time.time()
    while steps_logged(out) < n:
        if proc.poll() is not None:
            raise AssertionError(f"the job ended early (rc {proc.returncode}): {proc.stderr.read()[-2000:]}")
        if time.time() - t0 > timeout_s:
            proc.kill()
            raise AssertionError(f"fewer than {n} steps within {timeout_s} s")
        time.sleep(0.1)


@pytest.mark.subprocess
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_in_local_mode_checkpoints_and_exits_0(tmp_path, toy_raw, sig):
    out = tmp_path / "run"
    proc, cfg_path = start_job(tmp_path, toy_raw, "local", steps=100_000)
    wait_for_steps(proc, out, 5, timeout_s=180)
    t0 = time.time()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    stop_s = time.time() - t0
    assert proc.returncode == 0, err[-2000:]
    assert signal.Signals(sig).name in err and "final checkpoint" in err
    ckpt = latest_checkpoint(out)
    assert ckpt is not None
    step = load_json(ckpt / "state.json")["step"]
    assert step == steps_logged(out) and 5 <= step < 100_000  # the checkpoint holds every step done
    assert stop_s < 60, stop_s
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == step and summary.get("stopped_by") == signal.Signals(sig).name


@pytest.mark.ray
@pytest.mark.subprocess
def test_sigterm_in_ray_mode_checkpoints_exits_0_and_resumes(tmp_path, toy_raw):
    out = tmp_path / "run"
    proc, cfg_path = start_job(tmp_path, lean(toy_raw), "ray", steps=100_000)
    wait_for_steps(proc, out, 5, timeout_s=300)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    stop_s = time.time() - t0
    assert proc.returncode == 0, err[-3000:]
    # The console is the job's own: no Ray start-up log lines, no warnings (they stay in Ray's log folder).
    assert not [ln for ln in err.splitlines() if " INFO " in ln or "WARNING" in ln or "Warning" in ln], err[-3000:]
    ckpt = latest_checkpoint(out)
    step = load_json(ckpt / "state.json")["step"]
    assert step == steps_logged(out) >= 5
    assert stop_s < 60, stop_s
    # The same command with --resume auto goes on from there (to a nearer end).
    raw = yaml.safe_load(cfg_path.read_text())
    raw["learner"]["steps"] = step + 3
    cfg_path.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0", "DS_ACCELERATOR": "cpu"}
    r = subprocess.run([sys.executable, "-m", "services.cli", "train", str(cfg_path), "--mode", "local",
                        "--resume", "auto", "--no-progress"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert load_json(latest_checkpoint(out) / "state.json")["step"] == step + 3


@pytest.mark.ray
def test_stop_with_slow_rollouts_in_flight_is_bounded(ray_local, sim_raw, tmp_path):
    """Rollouts of 20 s in flight when the stop comes: the job is done within stop_grace_s (2 s)
    of the final checkpoint, not when they land; they are dropped as `stopped`, so the accounting
    closes. In process (TrainLoop.request_stop, which the SIGTERM handler calls) on the session's
    Ray cluster: the signal path itself is the CLI tests' above, and a driver of its own would add
    a Ray start-up to the suite."""
    from services.loop import TrainLoop

    grace = 2.0
    # The fewest actors (each a process to start): one worker holding 2 orders (one rolling out,
    # one queued behind it), one route and its teacher, the router, one learner rank.
    raw = {**sim_raw, "teachers": sim_raw["teachers"][:1],
           "routing": {**sim_raw["routing"], "routes": sim_raw["routing"]["routes"][:1]}}
    cfg = cfg_for(raw, tmp_path, "run", backend__rollout_latency_s=20.0, learner__steps=1, rollout__workers=1,
                  rollout__orders_per_worker=2, checkpoint__stop_grace_s=grace, checkpoint__every=0,
                  eval__enabled=False)
    loop = TrainLoop(cfg, "ray", show_progress=False)
    stopped_at = []

    def stop_when_in_flight():
        while not (loop.state == "running" and loop.pipe.in_flight):
            time.sleep(0.05)
        time.sleep(0.5)  # the rollouts are under way (20 s each)
        stopped_at.append(time.perf_counter())
        loop.request_stop("SIGTERM")

    threading.Thread(target=stop_when_in_flight, daemon=True).start()
    try:
        summary = loop.run()
        done_s = time.perf_counter() - stopped_at[0]
    finally:
        loop.shutdown()
    exit_s = time.perf_counter() - stopped_at[0]
    print(f"stop -> summary {done_s:.2f} s, -> actors shut down {exit_s:.2f} s (stop_grace_s {grace:g})")
    assert exit_s < grace + 15, exit_s  # the rollouts land ~20 s after they started: never waited for
    assert summary["stopped_by"] == "SIGTERM" and summary["steps"] == 0
    ckpt = latest_checkpoint(cfg.output_path)
    assert ckpt is not None and (ckpt / "COMPLETE").exists()
    assert load_json(ckpt / "state.json")["router"]["next_ticket"] == 0  # a resume re-issues both
    acct = summary["accounting"]
    assert_accounting_closes(acct)
    in_flight = 2 * cfg.rollout.batch_size  # both orders of the worker
    assert acct["issued"] == in_flight and acct["dropped"] == {"stopped": in_flight} and acct["consumed"] == 0
