"""Checkpoints belong to a run: run ids, refusing to mix runs in one output_dir, pruning only the
run's own older checkpoints, metrics.jsonl per run, and resume that never unpickles."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from danceopd.checkpoint import CheckpointError, list_checkpoints, load_json, prune, read_run, save_json
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
