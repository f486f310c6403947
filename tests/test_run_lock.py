"""One run per folder (issue 22, point 3): `train` holds job.output_dir/run.lock; a second `train`
into a live run's folder exits 2 naming the holder; a dead holder's lock is reported and taken
over only by `--resume` or `--overwrite`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from danceopd.checkpoint import read_run
from danceopd.run_lock import LOCK_FILE, RunLock, RunLocked, read_holder, stale_reason
from services.cli import app
from tests.conftest import ROOT

HOST = socket.gethostname()
DEAD_PID = 2**31 - 1  # above any pid_max: never a running process


def plant(out: Path, age_s: float = 0.0, text: str | None = None, **holder) -> Path:
    """A lock file left by another holder (`text`: what it holds), its heartbeat `age_s` old."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_FILE
    record = {"pid": DEAD_PID, "host": HOST, "run_id": "r-old", "started": 0, "token": "t", **holder}
    path.write_text(json.dumps(record) if text is None else text)
    t = time.time() - age_s
    os.utime(path, (t, t))
    return path


def test_a_second_holder_is_refused_naming_the_first_until_it_releases(tmp_path):
    first = RunLock(tmp_path, run_id="r1").acquire()
    holder = read_holder(tmp_path / LOCK_FILE)
    assert (holder["pid"], holder["host"], holder["run_id"]) == (os.getpid(), HOST, "r1")
    for takeover in (False, True):  # a live lock is never taken over
        with pytest.raises(RunLocked) as e:
            RunLock(tmp_path).acquire(takeover)
        msg = str(e.value)
        assert f"is in use by run r1 (pid {os.getpid()} on host {HOST}, heartbeat 0 s ago)" in msg and "\n" not in msg
    first.set_run_id("r2")
    assert read_holder(tmp_path / LOCK_FILE)["run_id"] == "r2"
    first.release()
    assert not (tmp_path / LOCK_FILE).exists()
    with RunLock(tmp_path):
        assert (tmp_path / LOCK_FILE).exists()
    assert not (tmp_path / LOCK_FILE).exists()


@pytest.mark.parametrize(("holder", "age_s", "why"), [
    ({}, 0, "its process is not running"),  # this host, its pid gone
    ({"pid": os.getpid()}, 300, "no heartbeat for 300 s"),  # this host, the pid reused by a live process
    ({"host": "elsewhere", "pid": 1}, 300, "no heartbeat for 300 s"),  # another host: the heartbeat alone
    ({"text": '{"pid": 12'}, 300, "no heartbeat for 300 s"),  # its writer died mid-write: the heartbeat alone
])
def test_a_stale_lock_is_reported_and_taken_over_only_when_asked(tmp_path, capsys, holder, age_s, why):
    path = plant(tmp_path, age_s, **holder)
    assert stale_reason(read_holder(path)) == why
    with pytest.raises(RunLocked, match=rf"which is gone \({why}\): pass --resume auto .* or --overwrite"):
        RunLock(tmp_path).acquire()
    lock = RunLock(tmp_path, run_id="r-new").acquire(takeover=True)
    try:
        assert read_holder(path)["run_id"] == "r-new"
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith("run lock: taking over the stale lock of run ") and line.endswith(why)
    finally:
        lock.release()


def test_a_live_holder_on_another_host_is_not_stale(tmp_path):
    plant(tmp_path, 30, host="elsewhere", pid=DEAD_PID)  # its pid means nothing here
    with pytest.raises(RunLocked, match=r"in use by run r-old \(pid 2147483647 on host elsewhere, heartbeat 30 s ago\)"):
        RunLock(tmp_path).acquire(takeover=True)


def test_the_heartbeat_refreshes_the_lock_and_release_spares_a_successor(tmp_path):
    lock = RunLock(tmp_path, heartbeat_s=0.05).acquire()
    path = tmp_path / LOCK_FILE
    os.utime(path, (time.time() - 500,) * 2)
    deadline = time.time() + 10
    while time.time() - path.stat().st_mtime > 5 and time.time() < deadline:
        time.sleep(0.05)
    assert time.time() - path.stat().st_mtime < 5
    plant(tmp_path, run_id="successor")  # its lock was taken over while it was thought gone
    lock.release()
    assert read_holder(path)["run_id"] == "successor"


def test_train_into_a_dead_runs_folder_needs_resume_or_overwrite(tmp_path, toy_raw, write_config):
    config = write_config(dict(toy_raw, learner={**toy_raw["learner"], "steps": 2}, checkpoint={"every": 2, "keep": 2}))
    out = Path(toy_raw["job"]["output_dir"])
    plant(out, run_id="r-dead")
    train = ["train", str(config), "--mode", "local", "--no-progress"]
    refused = CliRunner().invoke(app, train)
    assert refused.exit_code == 2, refused.output
    (line,) = refused.output.splitlines()
    assert line.startswith(f"error: job.output_dir {out} holds the lock of run r-dead (pid {DEAD_PID} on host {HOST}")
    r = CliRunner().invoke(app, [*train, "--resume", "auto"])
    assert r.exit_code == 0, r.output
    assert "run lock: taking over the stale lock of run r-dead" in r.output
    assert not (out / LOCK_FILE).exists()  # released at the end


def start_train(tmp_path: Path, cfg_path: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [sys.executable, "-m", "services.cli", "train", str(cfg_path), "--mode", "local", "--no-progress"]
    return subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def stepped(out: Path) -> bool:
    path = out / "metrics.jsonl"
    return path.exists() and any('"loss"' in ln for ln in path.read_text().splitlines()[:-1])  # whole lines


@pytest.mark.subprocess
@pytest.mark.slow
def test_two_trains_into_one_folder_one_second_apart_one_runs(tmp_path, toy_raw):
    """Whichever takes the lock first runs; the other exits 2 with one line naming it. The lock is
    released when the run ends (here by SIGTERM: the final checkpoint, exit 0)."""
    raw = dict(toy_raw, learner={**toy_raw["learner"], "steps": 100_000}, checkpoint={"every": 0, "keep": 2},
               control={"metrics_port": 0})
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    out = Path(raw["job"]["output_dir"])
    procs = [start_train(tmp_path, cfg_path)]
    time.sleep(1.0)
    procs.append(start_train(tmp_path, cfg_path))
    try:
        deadline = time.time() + 240
        while all(p.poll() is None for p in procs) and time.time() < deadline:
            time.sleep(0.1)
        (loser,) = [p for p in procs if p.poll() is not None]
        (winner,) = [p for p in procs if p is not loser]
        _, err = loser.communicate(timeout=30)
        assert loser.returncode == 2, err[-2000:]
        (line,) = err.splitlines()
        assert line.startswith(f"error: job.output_dir {out} is in use by run ") and "one run per folder" in line
        assert f"(pid {winner.pid} on host {HOST}, heartbeat " in line
        while not stepped(out):  # training: the signal stops the loop gracefully
            assert winner.poll() is None and time.time() < deadline, winner.communicate()[1][-2000:]
            time.sleep(0.1)
        assert read_holder(out / LOCK_FILE)["run_id"] == read_run(out)["run_id"]  # named once it is decided
        winner.send_signal(signal.SIGTERM)
        _, err = winner.communicate(timeout=120)
        assert winner.returncode == 0, err[-2000:]
        assert not (out / LOCK_FILE).exists()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
