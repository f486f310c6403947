"""Checkpoints belong to a run: run ids, refusing to mix runs in one output_dir, pruning only the
run's own older checkpoints, metrics.jsonl per run, and resume that never unpickles."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from danceopd.checkpoint import (
    CheckpointError,
    checkpoint_run_id,
    damage,
    list_checkpoints,
    load_json,
    prune,
    read_run,
    save_json,
    save_tensors,
)
from services.checkpoints import prepare_output
from services.cli import app
from services.loop import TrainLoop, train
from services.telemetry.progress import read_metrics
from tests.conftest import cfg_for


class Payload:
    """Unpickling this runs code: it creates the folder `marker`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def run_cli(config: Path, *args: str):
    return CliRunner().invoke(app, ["train", str(config), "--mode", "local", "--no-progress", *args])


def error_lines(result) -> list[str]:
    return [ln for ln in result.output.splitlines() if ln.startswith("error:")]


def steps_logged(out: Path) -> list[int]:
    return [rec["step"] for rec in read_metrics(out / "metrics.jsonl")[0]]  # learner steps, not evaluations


def run_ids(out: Path) -> list[str]:
    return [load_json(p / "state.json")["run_id"] for p in list_checkpoints(out)]


@pytest.fixture
def toy_config(toy_raw, write_config):
    raw = dict(toy_raw, learner={**toy_raw["learner"], "steps": 4}, checkpoint={"every": 2, "keep": 2})
    return write_config(raw), Path(raw["job"]["output_dir"])


def test_fresh_run_into_a_used_output_dir_is_refused_before_anything_starts(toy_config, monkeypatch):
    config, out = toy_config
    first = run_cli(config)
    assert first.exit_code == 0, first.output
    rid = read_run(out)["run_id"]
    assert run_ids(out) == [rid, rid] and steps_logged(out) == [1, 2, 3, 4]

    import services.loop

    started = []
    monkeypatch.setattr(services.loop, "train", lambda *a, **k: started.append(1))
    again = run_cli(config)
    assert again.exit_code == 2 and not started, again.output
    (line,) = error_lines(again)
    assert f"holds 2 checkpoint(s) up to step-00000004 of run {rid}" in line and "--resume auto" in line
    assert "--overwrite" in line
    both = run_cli(config, "--resume", "auto", "--overwrite")
    assert both.exit_code == 2 and not started and "give one" in error_lines(both)[0]
    assert run_ids(out) == [rid, rid] and steps_logged(out) == [1, 2, 3, 4]  # nothing touched
    # Metrics alone (a run that died before its first checkpoint) count as another run's output.
    (out / "checkpoints").rename(out / "elsewhere")
    assert run_cli(config).exit_code == 2 and not started
    (out / "elsewhere").rename(out / "checkpoints")


def test_overwrite_moves_the_old_run_aside_and_starts_a_new_one(toy_config):
    config, out = toy_config
    assert run_cli(config).exit_code == 0
    old = read_run(out)["run_id"]
    r = run_cli(config, "--overwrite", "--set", "learner.steps=2")
    assert r.exit_code == 0, r.output
    new = read_run(out)["run_id"]
    assert new != old and run_ids(out) == [new]
    assert steps_logged(out) == [1, 2]  # a new metrics.jsonl
    (aside,) = out.glob(".overwritten-*")
    assert run_ids(aside) == [old, old] and steps_logged(aside) == [1, 2, 3, 4]


def test_run_id_is_carried_over_resume(toy_config):
    config, out = toy_config
    assert run_cli(config, "--set", "learner.steps=2").exit_code == 0
    rid = read_run(out)["run_id"]
    r = run_cli(config, "--resume", "auto")
    assert r.exit_code == 0, r.output
    assert run_ids(out) == [rid, rid]  # step 2 of the first part, step 4 written after the resume
    run = read_run(out)
    assert run["run_id"] == rid and run["resumed_from"].endswith("step-00000002") and run["step"] == 2
    assert prepare_output(load_cfg(config), "auto")[1] == rid


def load_cfg(config: Path):
    from danceopd.config import load_config

    return load_config(config)


def test_prune_never_deletes_the_checkpoint_just_written(toy_raw, tmp_path):
    """A run resumed into a folder holding later-numbered checkpoints of another run keeps its own
    new checkpoint (and never deletes the other run's)."""
    a = cfg_for(toy_raw, tmp_path, "a", learner__steps=2, checkpoint__every=2)
    train(a, show_progress=False)
    other = cfg_for(toy_raw, tmp_path, "b", learner__steps=8, checkpoint__every=4, checkpoint__keep=1)
    train(other, show_progress=False)
    (theirs,) = list_checkpoints(other.output_path)
    resumed = cfg_for(toy_raw, tmp_path, "b", learner__steps=3, checkpoint__every=1, checkpoint__keep=1)
    summary = train(resumed, resume_from=list_checkpoints(a.output_path)[0], show_progress=False)
    names = [p.name for p in list_checkpoints(other.output_path)]
    assert names == ["step-00000003", theirs.name] and summary["checkpoint"].endswith("step-00000003")
    assert run_ids(other.output_path) == [run_ids(a.output_path)[0], load_json(theirs / "state.json")["run_id"]]


def test_prune_keeps_the_written_one_and_the_newest_of_its_run(tmp_path):
    def ckpt(step: int, run_id: str | None) -> Path:
        p = tmp_path / "checkpoints" / f"step-{step:08d}"
        p.mkdir(parents=True)
        save_json(p / "state.json", {"run_id": run_id} if run_id else {})
        (p / "COMPLETE").write_text(str(step))
        return p

    mine = [ckpt(s, "r1") for s in (1, 2, 9)]
    others = [ckpt(5, "r0"), ckpt(7, None)]
    written = ckpt(4, "r1")  # resumed from step 2: step 9 of this run is a later-numbered leftover
    prune(tmp_path, 2, "r1", written)
    assert list_checkpoints(tmp_path) == sorted([written, mine[2], *others])
    prune(tmp_path, 1, "r1", written)
    assert list_checkpoints(tmp_path) == sorted([written, *others])


def test_metrics_are_truncated_to_the_resumed_step(toy_raw, tmp_path):
    full = cfg_for(toy_raw, tmp_path, "m", learner__steps=6, checkpoint__every=3)
    train(full, show_progress=False)
    assert steps_logged(full.output_path) == [1, 2, 3, 4, 5, 6]
    (first, _) = list_checkpoints(full.output_path)
    again = cfg_for(toy_raw, tmp_path, "m", learner__steps=5, checkpoint__every=0)
    train(again, resume_from=first, show_progress=False)
    assert steps_logged(full.output_path) == [1, 2, 3, 4, 5]


def _tamper(path: Path, kind: str, marker: Path, ckpt: Path | None = None) -> None:
    if kind == "torch-save":
        torch.save({"state": Payload(marker), "param_groups": []}, path)
    else:
        path.write_bytes(pickle.dumps({"state": Payload(marker)}))
    if ckpt is not None:  # and fix COMPLETE's record of its size: the record is no security boundary
        record = load_json(ckpt / "COMPLETE")
        record["files"][str(path.relative_to(ckpt))] = path.stat().st_size
        save_json(ckpt / "COMPLETE", record)


@pytest.mark.parametrize("kind", ["torch-save", "plain-pickle"])
def test_a_tampered_local_optimizer_file_is_refused(toy_config, tmp_path, kind):
    config, out = toy_config
    assert run_cli(config).exit_code == 0
    marker = tmp_path / "code-ran"
    ckpt = list_checkpoints(out)[-1]
    _tamper(ckpt / "learner" / "optimizer.pt", kind, marker, ckpt)

    r = run_cli(config, "--resume", "auto")
    assert r.exit_code == 2, r.output
    (line,) = error_lines(r)
    assert "optimizer.pt: refused" in line and "never unpickled" in line
    assert ("os.makedirs" if kind == "torch-save" else "not a torch.save zip archive") in line
    with pytest.raises(CheckpointError, match="optimizer.pt: refused"):  # the loop refuses it too
        TrainLoop(load_cfg(config), resume_from=ckpt, show_progress=False)
    assert not marker.exists()


@pytest.mark.ray
def test_a_tampered_deepspeed_optimizer_file_is_refused(ray_local, toy_raw, tmp_path):
    from learner.deepspeed_learner import checkpoint_files
    from tests.test_deepspeed_learner import close, make_cfg, routed_batches, spawn, step_all

    cfg = make_cfg(toy_raw, tmp_path, zero_stage=1)
    (micro,) = routed_batches(cfg, 1)
    (rank,) = spawn(ray_local, cfg, 1)
    try:
        for _ in range(2):
            step_all(ray_local, [rank], [[micro]])
        folder = tmp_path / "ckpt"
        ray_local.get(rank.save_checkpoint.remote(str(folder)))
        assert sorted(p.name for p in folder.iterdir()) == ["engine.json", "optimizer-rank000.pt", "weights.safetensors"]
        assert sorted(checkpoint_files(1)) == sorted(p.name for p in folder.iterdir())  # what the checkpoint checks
        nxt = step_all(ray_local, [rank], [[micro]])
        assert ray_local.get(rank.load_checkpoint.remote(str(folder))) == 2  # ZeRO-1 round trip, exact
        assert step_all(ray_local, [rank], [[micro]]) == nxt

        marker = tmp_path / "code-ran"
        for kind in ("torch-save", "plain-pickle"):
            _tamper(folder / "optimizer-rank000.pt", kind, marker)
            with pytest.raises(Exception, match="optimizer-rank000.pt: refused") as e:
                ray_local.get(rank.load_checkpoint.remote(str(folder)))
            assert "CheckpointError" in str(e.value)
        assert not marker.exists()
    finally:
        close(ray_local, [rank])


# ---- checkpoints that survive crashes (issue 22, point 4) -----------------------------------------

def notices(result) -> list[str]:
    return [ln for ln in result.output.splitlines() if ln.startswith("--resume")]


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


@pytest.mark.parametrize("name", ["model.safetensors", "state.json", "learner/optimizer.pt"])
def test_resume_auto_skips_a_damaged_newest_checkpoint_saying_why(toy_config, name):
    config, out = toy_config
    assert run_cli(config).exit_code == 0
    rid = read_run(out)["run_id"]
    truncate(out / "checkpoints" / "step-00000004" / name)
    r = run_cli(config, "--resume", "auto", "--set", "learner.steps=5")
    assert r.exit_code == 0, r.output
    (line,) = notices(r)  # one line, naming the checkpoint, the file and why
    assert line.startswith(f"--resume auto: skipping step-00000004, it is damaged: {name} is ") and "were written" in line
    run = read_run(out)
    assert run["run_id"] == rid and run["resumed_from"].endswith("step-00000002") and run["step"] == 2
    assert steps_logged(out) == [1, 2, 3, 4, 5] and run_ids(out) == [rid, rid]  # steps 4 (rewritten) and 5
    from tests.test_faults import report

    report(f"damaged newest checkpoint ({name} truncated)", fault="truncated file",
           outcome="`--resume auto` says in one line it skips it and resumes the previous one; every step done")


def test_damage_without_a_size_record_reads_the_files_themselves(tmp_path):
    """An older checkpoint's COMPLETE holds only its step: a truncated safetensors file is still
    caught by its header, a truncated state.json by its parse."""
    ckpt = write_checkpoint(tmp_path, 3, "r1")
    assert damage(ckpt) is None
    (ckpt / "COMPLETE").write_text("3")
    assert damage(ckpt) is None
    truncate(ckpt / "model.safetensors")
    assert damage(ckpt).startswith("model.safetensors does not load (")
    ckpt = write_checkpoint(tmp_path, 4, "r1")
    (ckpt / "COMPLETE").write_text("4")
    truncate(ckpt / "state.json")
    assert damage(ckpt) == "state.json does not parse (JSONDecodeError)"


def test_resume_auto_takes_only_a_checkpoint_of_this_run(toy_config, toy_raw, tmp_path):
    """run.json names the run; a later-numbered checkpoint of another run in the same folder (an
    earlier run's leftover, a copy) is never resumed from."""
    config, out = toy_config
    assert run_cli(config, "--set", "learner.steps=2").exit_code == 0
    mine = read_run(out)["run_id"]
    other = cfg_for(toy_raw, tmp_path, "other", learner__steps=4, checkpoint__every=4)
    train(other, show_progress=False)
    (theirs,) = list_checkpoints(other.output_path)
    shutil.copytree(theirs, out / "checkpoints" / theirs.name)
    assert [p.name for p in list_checkpoints(out)] == ["step-00000002", "step-00000004"]

    r = run_cli(config, "--resume", "auto", "--set", "learner.steps=3")
    assert r.exit_code == 0 and not notices(r), r.output
    run = read_run(out)
    assert run["run_id"] == mine and run["resumed_from"].endswith("step-00000002")
    assert run_ids(out) == [mine, mine, checkpoint_run_id(theirs)]  # 2 and 3 its own; the other run's untouched


def test_resume_auto_of_a_finished_run_says_so_and_exits_0(toy_config):
    config, out = toy_config
    assert run_cli(config).exit_code == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    r = run_cli(config, "--resume", "auto")
    assert r.exit_code == 0, r.output
    rid = read_run(out)["run_id"]
    (line,) = [ln for ln in r.output.splitlines() if ln.strip()]
    assert line == (f"--resume: run {rid} is finished: step-00000004 is at step 4, learner.steps is 4; nothing to "
                    "train (raise learner.steps to train it further)")
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # nothing trained, nothing written


def test_complete_is_written_only_when_every_rank_file_is_there(toy_raw, tmp_path, monkeypatch):
    """Ray mode: each DeepSpeed rank writes its own optimizer file into the checkpoint. A rank's
    file that never arrives (its node's disk is not job.output_dir's) fails the save with one line
    naming it, and leaves no checkpoint: COMPLETE is never written."""
    from learner.deepspeed_learner import checkpoint_files, optimizer_file
    from services import checkpoints
    from services.runtime.ray_learner import RayLearner

    cfg = cfg_for(toy_raw, tmp_path, "ray", learner__world_size=2)
    lost: list[str] = [optimizer_file(1)]

    def ranks_save(method, folder):  # what the two ranks' save_checkpoint writes, less `lost`
        Path(folder).mkdir(parents=True, exist_ok=True)
        for name in checkpoint_files(2):
            if name.endswith(".safetensors"):
                save_tensors(Path(folder) / name, {"w": torch.zeros(2)})
            elif name not in lost:
                (Path(folder) / name).write_text("{}")

    learner = object.__new__(RayLearner)  # no actors: the driver's side of save only
    learner.ranks, learner._all, learner.export = [0, 1], ranks_save, lambda: {"w": torch.zeros(2)}
    snap = SimpleNamespace(run_id="r1", step=3, mode="ray", accounting={})
    with pytest.raises(CheckpointError, match=r"^checkpoint step-00000003: learner/optimizer-rank001\.pt missing after the save"):
        checkpoints.save(cfg, snap, learner, {"next_ticket": 0})
    assert list_checkpoints(cfg.output_path) == [] and not list(cfg.output_path.rglob("COMPLETE"))
    assert not list((cfg.output_path / "checkpoints").iterdir())  # nor a temporary folder

    lost.clear()
    written = Path(checkpoints.save(cfg, snap, learner, {"next_ticket": 0}))
    record = load_json(written / "COMPLETE")["files"]
    assert {f"learner/{n}" for n in checkpoint_files(2)} <= record.keys() and damage(written) is None


def test_every_file_and_folder_is_synced_before_the_rename(tmp_path, monkeypatch):
    import danceopd.checkpoint as ck

    synced: list[Path] = []
    monkeypatch.setattr(ck, "fsync", lambda p: synced.append(Path(p)))
    with ck.atomic_checkpoint(tmp_path, 5) as tmp:
        (tmp / "learner").mkdir()
        (tmp / "learner" / "optimizer-rank001.pt").write_text("x")
        (tmp / "model.safetensors").write_text("x")
    final = ck.checkpoint_dir(tmp_path, 5)
    assert set(synced[:-2]) == {tmp / "learner", tmp / "learner" / "optimizer-rank001.pt", tmp / "model.safetensors"}
    assert synced[-2:] == [tmp, ck.checkpoints_root(tmp_path)]  # COMPLETE's folder entry, then the rename
    assert load_json(final / "COMPLETE") == {"step": 5, "files": {"learner/optimizer-rank001.pt": 1,
                                                                 "model.safetensors": 1}}
    with pytest.raises(RuntimeError), ck.atomic_checkpoint(tmp_path, 6) as tmp:  # a crash mid-write
        (tmp / "model.safetensors").write_text("x")
        raise RuntimeError("killed")
    assert [p.name for p in ck.checkpoints_root(tmp_path).iterdir()] == [final.name]


def write_checkpoint(out: Path, step: int, run_id: str) -> Path:
    """A small checkpoint in the real layout (what damage() reads), written the real way."""
    from danceopd.checkpoint import atomic_checkpoint

    with atomic_checkpoint(out, step) as tmp:
        save_tensors(tmp / "model.safetensors", {"w": torch.full((64,), float(step))})
        save_json(tmp / "state.json", {"schema": 3, "run_id": run_id, "step": step, "router": {"next_ticket": step}})
    return out / "checkpoints" / f"step-{step:08d}"


def test_prune_never_removes_the_newest_undamaged_checkpoint(tmp_path):
    older = [write_checkpoint(tmp_path, s, "r1") for s in (1, 2)]
    written = write_checkpoint(tmp_path, 3, "r1")
    truncate(written / "model.safetensors")  # damaged since (a disk error): step 2 is the resume point
    prune(tmp_path, 1, "r1", written)
    assert list_checkpoints(tmp_path) == [older[1], written]
    written = write_checkpoint(tmp_path, 4, "r1")  # a good one: the older ones go, as `keep` says
    prune(tmp_path, 1, "r1", written)
    assert list_checkpoints(tmp_path) == [written]
