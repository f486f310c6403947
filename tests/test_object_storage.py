"""Checkpoints on object storage (issue 24, point 4): job.output_dir an s3:// URI (a real
S3-speaking server, moto's, on loopback) or a file:// one. The layout, COMPLETE last, `--resume
auto` from the store into a fresh staging folder, a prefix without COMPLETE skipped in one line,
the lock as an object, and the learner ranks' own uploads."""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import tempfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from danceopd.checkpoint import save_json, save_tensors
from danceopd.remote_checkpoint import RemoteOutput
from danceopd.run_lock import LOCK_FILE, ObjectRunLock, RunLocked
from danceopd.storage import ORIGIN, address, open_store
from services.cli import app

HOST = socket.gethostname()


@pytest.fixture(scope="module")
def s3_server():
    """moto's S3 server on a free loopback port, this module's only; the AWS SDK pointed at it
    by the environment, as a user points it at MinIO (AWS_ENDPOINT_URL, fake credentials)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test",
                           "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1",
                           "AWS_EC2_METADATA_DISABLED": "true"}.items():
            mp.setenv(key, value)
        yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def bucket(s3_server) -> str:
    """A new, empty bucket: its s3:// URI."""
    import pyarrow.fs as pafs

    name = f"b-{secrets.token_hex(4)}"
    pafs.S3FileSystem(endpoint_override=s3_server, allow_bucket_creation=True).create_dir(name)
    return f"s3://{name}"


@pytest.fixture
def job(toy_raw, write_config, tmp_path):
    """A 4-step local-mode toy job writing to `uri` (checkpoints every 2 steps, 2 kept, no evaluation)."""
    def make(uri: str) -> Path:
        raw = dict(toy_raw, learner={**toy_raw["learner"], "steps": 4}, checkpoint={"every": 2, "keep": 2},
                   eval={"enabled": False}, job={**toy_raw["job"], "output_dir": uri,
                                                 "local_dir": str(tmp_path / "staging")})
        return write_config(raw)

    return make


def run_cli(config: Path, *args: str):
    return CliRunner().invoke(app, ["train", str(config), "--mode", "local", "--no-progress", *args])


def objects(uri: str) -> dict[str, int]:
    return open_store(uri).files()


def read_json(uri: str, name: str):
    return json.loads(open_store(uri).read(name))


def steps_logged(uri: str) -> list[int]:
    lines = open_store(uri).read("metrics.jsonl").decode().splitlines()
    return [rec["step"] for rec in map(json.loads, lines) if "eval" not in rec]


def check_checkpoints(uri: str, steps: list[int], run_id: str) -> None:
    """Exactly these complete checkpoints, each COMPLETE naming every other object under its
    prefix at its size, each of run `run_id`."""
    store = open_store(uri)
    names = sorted({n.split("/")[1] for n in store.files() if n.startswith("checkpoints/")})
    assert names == [f"step-{s:08d}" for s in steps]
    for name in names:
        files = store.files(f"checkpoints/{name}")
        record = json.loads(store.read(f"checkpoints/{name}/COMPLETE"))
        assert record["files"] == {k: v for k, v in files.items() if k != "COMPLETE"}
        assert {"model.safetensors", "state.json", "config.yaml"} <= record["files"].keys()
        assert any(k.startswith("learner/") for k in record["files"])  # the learner's own state
        assert read_json(uri, f"checkpoints/{name}/state.json")["run_id"] == run_id
        assert ORIGIN not in files


def resume_notices(result) -> list[str]:
    return [ln for ln in result.output.splitlines() if ln.startswith("--resume")]


@pytest.mark.subprocess  # a server (in a thread of this process)
@pytest.mark.slow
def test_a_run_on_s3_checkpoints_there_and_resumes_from_there(bucket, job, tmp_path):
    uri = f"{bucket}/run"
    config = job(uri)
    first = run_cli(config)
    assert first.exit_code == 0, first.output
    run = read_json(uri, "run.json")
    check_checkpoints(uri, [2, 4], run["run_id"])
    assert steps_logged(uri) == [1, 2, 3, 4]
    assert LOCK_FILE not in objects(uri)  # released
    summary = read_json(uri, "summary.json")
    assert summary["checkpoint"] == f"{uri}/checkpoints/step-00000004"
    assert summary["output_dir"] == uri and summary["local_dir"].startswith(str(tmp_path / "staging"))

    # Another machine: an empty staging folder; everything it resumes from comes from the store.
    again = run_cli(config, "--resume", "auto", "--set", "learner.steps=6",
                    "--set", f"job.local_dir={tmp_path / 'elsewhere'}")
    assert again.exit_code == 0, again.output
    assert not resume_notices(again)
    run2 = read_json(uri, "run.json")
    assert run2["run_id"] == run["run_id"] and run2["step"] == 4
    assert run2["resumed_from"] == f"{uri}/checkpoints/step-00000004"
    assert steps_logged(uri) == [1, 2, 3, 4, 5, 6]  # the first run's metrics, continued
    check_checkpoints(uri, [4, 6], run["run_id"])  # step 2 pruned (keep 2)
    assert LOCK_FILE not in objects(uri)

    # A fresh run into the used URI is refused, as for a folder; --overwrite too (no rename there).
    fresh = run_cli(config)
    assert fresh.exit_code == 2 and f"job.output_dir {uri} holds 2 checkpoint(s) up to step-00000006" in fresh.output
    over = run_cli(config, "--overwrite")
    assert over.exit_code == 2 and "is object storage" in over.output, over.output
    assert read_json(uri, "run.json") == run2


@pytest.mark.subprocess
@pytest.mark.slow
def test_resume_auto_skips_a_checkpoint_without_its_complete_object(bucket, job):
    uri = f"{bucket}/run"
    config = job(uri)
    assert run_cli(config).exit_code == 0
    rid = read_json(uri, "run.json")["run_id"]
    open_store(uri).delete("checkpoints/step-00000004/COMPLETE")  # an upload cut short before its manifest
    r = run_cli(config, "--resume", "auto", "--set", "learner.steps=5")
    assert r.exit_code == 0, r.output
    assert resume_notices(r) == ["--resume auto: skipping step-00000004, it is incomplete: no COMPLETE object (its "
                                 "upload did not finish)"]
    run = read_json(uri, "run.json")
    assert run["run_id"] == rid and run["resumed_from"] == f"{uri}/checkpoints/step-00000002" and run["step"] == 2
    assert steps_logged(uri) == [1, 2, 3, 4, 5]
    check_checkpoints(uri, [4, 5], rid)  # step 4 written again, whole; step 2 pruned


@pytest.mark.subprocess
def test_a_second_run_into_a_live_uri_is_refused_until_the_first_releases(bucket, job):
    uri = f"{bucket}/run"
    config = job(uri)
    holder = ObjectRunLock(open_store(uri), run_id="r1", settle_s=0).acquire()
    try:
        r = run_cli(config)
        assert r.exit_code == 2, r.output
        (line,) = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
        assert f"job.output_dir {uri} is in use by run r1 (pid {os.getpid()} on host {HOST}" in line
        assert set(objects(uri)) == {LOCK_FILE}  # nothing else written
    finally:
        holder.release()
    assert objects(uri) == {}


@pytest.mark.subprocess
def test_of_two_runs_taking_the_lock_together_the_later_writer_wins(bucket, monkeypatch):
    """No create-if-absent on object storage: a run writes its record, waits, reads it back. A
    run that looked at the same moment and wrote meanwhile holds it; the first is refused."""
    import danceopd.run_lock as rl

    store = open_store(f"{bucket}/run")
    first, second = ObjectRunLock(store, run_id="first"), ObjectRunLock(store, run_id="second")
    monkeypatch.setattr(rl.time, "sleep", lambda s: second._rewrite())  # the other run's write lands meanwhile
    with pytest.raises(RunLocked, match="is in use by run second"):
        first.acquire()
    assert second.held() and not first.held()
    first.release()  # not its lock: left alone
    assert second.held()
    second.release()
    assert store.stat(LOCK_FILE) is None


def test_an_unreachable_bucket_fails_the_lock_in_one_line_naming_the_uri(tmp_path):
    lock = ObjectRunLock(open_store(f"file://{tmp_path}/run"), settle_s=0)
    (tmp_path / "run").write_text("a file where the folder should be")
    with pytest.raises(OSError) as e:
        lock.acquire()
    assert str(e.value).startswith(f"job.output_dir file://{tmp_path}/run: ") and "\n" not in str(e.value)


@pytest.mark.slow
def test_a_file_uri_run_keeps_the_object_layout_and_resumes(job, tmp_path):
    uri = f"file://{tmp_path}/store/run"
    config = job(uri)
    assert run_cli(config).exit_code == 0
    rid = read_json(uri, "run.json")["run_id"]
    check_checkpoints(uri, [2, 4], rid)
    assert (tmp_path / "store" / "run" / "checkpoints" / "step-00000004" / "COMPLETE").is_file()
    # eval and sample take the checkpoint's URI: a verified download, gone after the command
    ckpt = f"{uri}/checkpoints/step-00000004"
    before = set(Path(tempfile.gettempdir()).glob("danceopd-checkpoint-*"))
    remote = CliRunner().invoke(app, ["eval", ckpt, "--json"])
    assert remote.exit_code == 0, remote.output
    local = CliRunner().invoke(app, ["eval", str(tmp_path / "store" / "run" / "checkpoints" / "step-00000004"), "--json"])
    assert json.loads(remote.output)["routes"] == json.loads(local.output)["routes"]
    assert json.loads(remote.output)["checkpoint"] == ckpt and json.loads(remote.output)["step"] == 4
    out = tmp_path / "samples"
    sampled = CliRunner().invoke(app, ["sample", ckpt, "--route", "t2i", "--prompt", "class 1", "--n", "2", "--out", str(out)])
    assert sampled.exit_code == 0, sampled.output
    assert json.loads((out / "samples.json").read_text())["checkpoint"] == ckpt and len(list(out.glob("*.png"))) == 2
    assert set(Path(tempfile.gettempdir()).glob("danceopd-checkpoint-*")) == before
    missing = CliRunner().invoke(app, ["eval", f"{uri}/checkpoints/step-00000009"])
    assert missing.exit_code == 2 and f"checkpoint {uri}/checkpoints/step-00000009: not a complete checkpoint" in missing.output

    r = run_cli(config, "--resume", f"{uri}/checkpoints/step-00000002", "--set", "learner.steps=3")
    assert r.exit_code == 0, r.output
    assert read_json(uri, "run.json")["resumed_from"] == f"{uri}/checkpoints/step-00000002"
    assert steps_logged(uri) == [1, 2, 3]


# ---- COMPLETE last: what a reader can see while a checkpoint uploads ------------------------------

def write_remote_checkpoint(remote: RemoteOutput, step: int, run_id: str) -> None:
    with remote.checkpoint(step) as tmp:
        save_tensors(tmp / "model.safetensors", {"w": torch.full((64,), float(step))})
        save_json(tmp / "state.json", {"schema": 3, "run_id": run_id, "step": step, "router": {"next_ticket": step}})
        (tmp / "learner").mkdir()
        (tmp / "learner" / "rng.json").write_text("{}")


def test_a_reader_never_sees_a_checkpoint_before_all_its_objects(tmp_path, monkeypatch, capsys):
    """After every object the upload writes, `--resume auto` (in a fresh staging folder) takes
    either the previous checkpoint or the new one whole. An upload cut short leaves no
    checkpoint: the next resume takes the previous one."""
    uri = f"file://{tmp_path}/store/run"
    remote = RemoteOutput(uri, tmp_path / "staging")
    write_remote_checkpoint(remote, 1, "r1")
    store = remote.store
    seen: list[str] = []

    def reader_sees() -> None:
        reader = RemoteOutput(uri, tmp_path / f"reader-{len(seen)}")
        got = reader.resolve("auto", "r1")
        seen.append(got.name if got else "none")

    for method in ("upload", "write"):  # after every object the upload writes
        def spy(*a, _real=getattr(store, method), **k):
            _real(*a, **k)
            reader_sees()

        monkeypatch.setattr(store, method, spy)
    write_remote_checkpoint(remote, 2, "r1")
    assert seen == ["step-00000001"] * 3 + ["step-00000002"]  # three files, then COMPLETE
    skipped = capsys.readouterr().err.splitlines()  # a reader mid-upload names the prefix it skips
    assert skipped == ["--resume auto: skipping step-00000002, it is incomplete: no COMPLETE object (its upload "
                       "did not finish)"] * 3
    monkeypatch.undo()

    calls = []

    def dies(*a, **k):  # the machine dies after the first file of step 3: nothing cleans up
        calls.append(a)
        if len(calls) > 1:
            raise KeyboardInterrupt("killed")
        real_upload(*a, **k)

    real_upload = store.upload
    monkeypatch.setattr(store, "upload", dies)
    monkeypatch.setattr(store, "delete_prefix", lambda prefix: None)
    with pytest.raises(KeyboardInterrupt):
        write_remote_checkpoint(remote, 3, "r1")
    monkeypatch.undo()
    assert remote.checkpoints() == ["step-00000001", "step-00000002"] and "step-00000003" in remote.prefixes()
    copy = RemoteOutput(uri, tmp_path / "after").resolve("auto", "r1")
    assert copy.name == "step-00000002"
    assert address(copy / "learner") == f"{uri}/checkpoints/step-00000002/learner"  # where Ray ranks load from
    assert "skipping step-00000003, it is incomplete" in capsys.readouterr().err


# ---- learner ranks: their own files, straight to the store ---------------------------------------

def test_ray_learner_ranks_upload_their_own_files_and_complete_lists_them(toy_raw, tmp_path):
    """Ray mode: a rank may run on a node without the driver's staging folder, so it is given the
    checkpoint's URI and uploads its own files there. A rank's file that never arrives fails the
    save in one line and leaves no COMPLETE object."""
    from types import SimpleNamespace

    from danceopd.checkpoint import CheckpointError
    from danceopd.storage import writing
    from learner.deepspeed_learner import checkpoint_files, optimizer_file
    from services import checkpoints
    from services.runtime.ray_learner import RayLearner
    from tests.conftest import cfg_for

    uri = f"file://{tmp_path}/store/run"
    cfg = cfg_for(toy_raw, tmp_path, "unused", learner__world_size=2)
    cfg.job.output_dir, cfg.job.local_dir = uri, str(tmp_path / "staging")
    lost, given = [optimizer_file(1)], []

    def ranks_save(method, folder):  # what the two ranks' save_checkpoint writes, less `lost`
        given.append(folder)
        with writing(folder) as local:
            local.mkdir(parents=True, exist_ok=True)
            for name in checkpoint_files(2):
                if name.endswith(".safetensors"):
                    save_tensors(local / name, {"w": torch.zeros(2)})
                elif name not in lost:
                    (local / name).write_text("{}")

    learner = object.__new__(RayLearner)  # no actors: the driver's side of save only
    learner.ranks, learner._all, learner.export = [0, 1], ranks_save, lambda: {"w": torch.zeros(2)}
    snap = SimpleNamespace(run_id="r1", step=3, mode="ray", accounting={})
    with pytest.raises(CheckpointError, match=r"^checkpoint step-00000003: learner/optimizer-rank001\.pt missing after the save"):
        checkpoints.save(cfg, snap, learner, {"next_ticket": 0})
    assert given == [f"{uri}/checkpoints/step-00000003/learner"]
    assert not [n for n in objects(uri) if n.endswith("COMPLETE")]

    lost.clear()
    assert checkpoints.save(cfg, snap, learner, {"next_ticket": 0}) == f"{uri}/checkpoints/step-00000003"
    record = read_json(uri, "checkpoints/step-00000003/COMPLETE")["files"]
    assert {f"learner/{n}" for n in checkpoint_files(2)} <= record.keys()

    copy = RemoteOutput(uri, tmp_path / "resume").resolve("auto", "r1")  # what a resume downloads
    learner._all = lambda method, folder: given.append((method, folder))
    learner.load(copy / "learner", {})
    assert given[-1] == ("load_checkpoint", f"{uri}/checkpoints/step-00000003/learner")  # not the driver's copy


@pytest.mark.ray
def test_a_deepspeed_rank_saves_to_and_resumes_from_a_uri(ray_local, toy_raw, tmp_path):
    from learner.deepspeed_learner import checkpoint_files
    from tests.test_deepspeed_learner import close, make_cfg, routed_batches, spawn, step_all

    cfg = make_cfg(toy_raw, tmp_path, zero_stage=1)
    (micro,) = routed_batches(cfg, 1)
    (rank,) = spawn(ray_local, cfg, 1)
    uri = f"file://{tmp_path}/store/ckpt/learner"
    try:
        for _ in range(2):
            step_all(ray_local, [rank], [[micro]])
        ray_local.get(rank.save_checkpoint.remote(uri))
        assert sorted(objects(uri)) == sorted(checkpoint_files(1))
        assert address(tmp_path) == str(tmp_path)  # a plain folder (no ORIGIN): the path itself, as before
        nxt = step_all(ray_local, [rank], [[micro]])
        assert ray_local.get(rank.load_checkpoint.remote(uri)) == 2  # downloaded by the rank, exact
        assert step_all(ray_local, [rank], [[micro]]) == nxt
    finally:
        close(ray_local, [rank])


@pytest.mark.ray
@pytest.mark.slow
def test_a_ray_mode_run_on_a_uri_resumes_every_rank_from_it(ray_local, toy_raw, tmp_path):
    """Two DeepSpeed ranks checkpoint to a file:// URI (each its own optimizer partition) and a
    run with another staging folder resumes them all from there."""
    from services.checkpoints import prepare_output
    from services.loop import train
    from tests.conftest import cfg_for, lean

    uri = f"file://{tmp_path}/store/run"

    def cfg(steps: int, staging: str):
        c = cfg_for(lean(toy_raw), tmp_path, "unused", learner__steps=steps, learner__world_size=2, checkpoint__every=2,
                    checkpoint__keep=2)
        c.job.output_dir, c.job.local_dir = uri, str(tmp_path / staging)
        return c

    first = cfg(4, "staging")
    _, rid = prepare_output(first, None)
    train(first, mode="ray", show_progress=False, run_id=rid)
    record = read_json(uri, "checkpoints/step-00000004/COMPLETE")["files"]
    assert {"learner/optimizer-rank000.pt", "learner/optimizer-rank001.pt", "learner/engine.json"} <= record.keys()

    second = cfg(6, "elsewhere")
    ckpt, rid2 = prepare_output(second, "auto")
    assert rid2 == rid and ckpt == tmp_path / "elsewhere" / ".downloads" / "step-00000004"
    summary = train(second, mode="ray", resume_from=ckpt, show_progress=False, run_id=rid2)
    assert summary["steps"] == 6 and steps_logged(uri) == [1, 2, 3, 4, 5, 6]
    check_checkpoints(uri, [4, 6], rid)
    assert read_json(uri, "checkpoints/step-00000006/state.json")["version"] == 6
