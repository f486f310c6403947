"""Checkpoint and resume of a training loop — one layout and one state schema for both modes.

    output_dir/run.json                 the run writing here: run_id (new at a fresh start,
                                        carried over a resume), resumed_from, step
    output_dir/checkpoints/step-00000050/
        model.safetensors   the trainable weights (LoRA adapters only for a LoRA student)
        ema.safetensors     with learner.ema_decay: their moving average (fp32), which `eval.weights:
                            ema` evaluates and samples; either mode's resume restores it
        lora/               a LoRA student's adapter as a PEFT LoRA folder (adapter_config.json +
                            adapter_model.safetensors): `student.init_lora` / a teacher's `lora` take it
        learner/            the learner's own state, no pickle anywhere: `torch-adamw` (local mode)
                            optimizer.pt + rng.json; `deepspeed` (Ray mode) per-rank optimizer
                            state (optimizer-rankNNN.pt) + weights.safetensors + engine.json
        state.json          schema, run_id, step, weight version, router state at the first
                            unconsumed ticket, sample accounting, mode and learner kind
        config.yaml         the job's resolved config (`danceopd sample` and `danceopd eval` read it)
        COMPLETE            written last (danceopd/checkpoint.py): every file above with its size, after
                            `save` checked that every expected one (each learner rank's) is there

`--resume auto` resumes the newest undamaged checkpoint of the run in run.json (danceopd.checkpoint.
damage says why it skips one); a run whose checkpoint is at learner.steps is finished (`finished`).
Resuming with the other mode carries the weights, routes, data cursor and step over; the
optimizer state belongs to one learner kind and restarts (said in one line).

A job.output_dir on object storage (s3://, gs://, file://) keeps this layout under its URI; the
job stages in a local folder (cfg.output_path) and danceopd.remote_checkpoint uploads, COMPLETE
last, and downloads to resume.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from danceopd.batch import nonfinite
from danceopd.checkpoint import (
    RUN_FILE,
    CheckpointError,
    atomic_checkpoint,
    checkpoint_dir,
    checkpoint_run_id,
    list_checkpoints,
    load_json,
    load_tensors,
    new_run_id,
    prune,
    read_run,
    require,
    resolve_resume,
    save_json,
    save_tensors,
    verify_no_pickle,
    write_run,
)
from danceopd.config import dump_config
from danceopd.remote_checkpoint import push, remote_output
from danceopd.storage import address

if TYPE_CHECKING:  # annotations only: no import cycle, no cost
    from danceopd.config import Config

SCHEMA = 3
EMA_FILE = "ema.safetensors"
MOVED = ("checkpoints", "metrics.jsonl", "summary.json", RUN_FILE, "samples", "plots", "tensorboard",
         "error.log", "profile")  # what --overwrite moves aside


def prepare_output(cfg: Config, resume: str | None, overwrite: bool = False) -> tuple[Path | None, str]:
    """Decide, before anything starts, where a `train` run begins: (checkpoint to resume or None,
    run id). A fresh run into a job.output_dir that holds another run's checkpoints or metrics is
    refused unless `overwrite`, which moves them to output_dir/.overwritten-<time>/."""
    out = cfg.output_path
    if resume and overwrite:
        raise CheckpointError("--resume and --overwrite: give one (continue the run, or start a new one)")
    remote = remote_output(cfg)
    if remote is not None:
        remote.start()  # the store's run.json and metrics.jsonl into the staging folder
    if resume:
        try:
            rid = (read_run(out) or {}).get("run_id")
            ckpt = remote.resolve(resume, rid) if remote is not None else resolve_resume(out, resume, rid)
        except FileNotFoundError as e:
            raise CheckpointError(str(e)) from None
        if ckpt is not None:
            return ckpt, load_state(ckpt)["run_id"]
        # --resume auto with no (undamaged) checkpoint of the run yet (e.g. a retried job that died
        # before its first): a fresh start; metrics.jsonl restarts with it (JobLog truncates to step 0).
    else:
        held = _held(out, remote)
        where = remote.uri if remote is not None else out
        if held and not overwrite:
            other = ("give the new run another job.output_dir" if remote is not None else
                     "--overwrite to move it aside (to .overwritten-<time>/) and start a new run")
            raise CheckpointError(f"job.output_dir {where} holds {held}: pass --resume auto to continue that run, "
                                  f"or {other}")
        if held and remote is not None:  # no rename there: moving a run aside would copy every object
            raise CheckpointError(f"--overwrite: job.output_dir {where} is object storage, where moving {held} aside "
                                  "means copying it; give the new run another job.output_dir, or delete the old run's "
                                  "objects first")
        if held:
            aside = out / f".overwritten-{time.strftime('%Y%m%d-%H%M%S')}"
            aside.mkdir()
            for name in MOVED:
                if (out / name).exists():
                    (out / name).rename(aside / name)
            print(f"--overwrite: moved {held} to {aside}", file=sys.stderr, flush=True)
    run_id = new_run_id()
    write_run(out, run_id)
    push(cfg, RUN_FILE)
    return None, run_id


def _held(out: Path, remote=None) -> str | None:
    """What another run left in `out` (its checkpoints, its metrics), or None. On object
    storage, the checkpoints under its URI (`remote`) and its metrics (downloaded into `out`)."""
    found = [Path(n) for n in remote.checkpoints()] if remote is not None else list_checkpoints(out)
    metrics = out / "metrics.jsonl"
    parts = []
    if found:
        last = remote.run_id_of(found[-1].name) if remote is not None else checkpoint_run_id(found[-1])
        rid = last or (read_run(out) or {}).get("run_id")
        parts.append(f"{len(found)} checkpoint(s) up to {found[-1].name}" + (f" of run {rid}" if rid else ""))
    if metrics.is_file() and metrics.stat().st_size > 0:
        parts.append("metrics.jsonl")
    return " and ".join(parts) or None


def load_state(path: Path) -> dict:
    """state.json of a checkpoint, after checking its schema and that no file in it holds pickle."""
    path = Path(path)
    state = load_json(path / "state.json")
    if state.get("schema") != SCHEMA:
        raise CheckpointError(f"--resume {path}: checkpoint schema {state.get('schema')!r} is not {SCHEMA} "
                              "(written by an older DanceOPD); start a fresh run")
    verify_no_pickle(path)
    return state


def finished(cfg: Config, ckpt: Path) -> str | None:
    """The one line saying the run is finished, when checkpoint `ckpt` is at learner.steps or
    beyond (a resume would train 0 steps), else None."""
    state = load_json(Path(ckpt) / "state.json")  # checked by prepare_output already
    if int(state["step"]) < cfg.learner.steps:
        return None
    return (f"run {state['run_id']} is finished: {Path(ckpt).name} is at step {state['step']}, learner.steps is "
            f"{cfg.learner.steps}; nothing to train (raise learner.steps to train it further)")


def run_id_of(cfg: Config, resume_from=None) -> str:
    """The run writing job.output_dir: the checkpoint's run when resuming from one, else
    output_dir/run.json (written by prepare_output), else a new one."""
    if resume_from:
        return load_state(resume_from)["run_id"]
    rid = (read_run(cfg.output_path) or {}).get("run_id")
    if not rid:
        rid = new_run_id()
        write_run(cfg.output_path, rid)
        push(cfg, RUN_FILE)
    return rid


def save(cfg: Config, state, learner, router_state: dict) -> str:
    """Write the checkpoint of `state` (a LoopState): the learner's weights and own state, the
    router's state at the first unconsumed ticket, the accounting. Returns its folder."""
    run_id = state.run_id or run_id_of(cfg)
    weights = learner.export()
    bad = nonfinite(**weights)
    if bad:  # never written, so the newest checkpoint (which pruning keeps) is always a finite one
        raise CheckpointError(f"checkpoint of step {state.step}: NaN/Inf in the weights ({bad}); not written")
    remote = remote_output(cfg)  # object storage: staged here, uploaded with COMPLETE last
    with (remote.checkpoint(state.step) if remote else atomic_checkpoint(cfg.output_path, state.step)) as tmp:
        learner_files = learner.save(tmp / "learner")  # every rank's, for the check before COMPLETE
        expected = ["model.safetensors", "state.json", "config.yaml", *(f"learner/{n}" for n in learner_files)]
        save_tensors(tmp / "model.safetensors", weights)
        if cfg.learner.ema_decay is not None:
            save_tensors(tmp / EMA_FILE, learner.export_ema())
            expected.append(EMA_FILE)
        if cfg.student.lora.enabled:  # also as a PEFT LoRA folder, for diffusers/peft inference
            from danceopd.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, write_lora_folder

            write_lora_folder(weights, tmp / "lora", cfg.student.lora)
            expected += [f"lora/{ADAPTER_CONFIG}", f"lora/{ADAPTER_WEIGHTS}"]
        save_json(tmp / "state.json", {"schema": SCHEMA, "run_id": run_id, "step": state.step, "version": state.step,
                                       "router": router_state, "mode": state.mode, "learner": learner.kind,
                                       "accounting": state.accounting})
        (tmp / "config.yaml").write_text(dump_config(cfg))  # `danceopd sample` / `eval` rebuild the student from it
        require(tmp, expected)  # a rank's file missing (storage not shared): no COMPLETE
    if remote is not None:
        remote.prune(cfg.checkpoint.keep, run_id, state.step)
        remote.push("metrics.jsonl")  # no append on object storage: the whole file, at every checkpoint
        return remote.uri_of(checkpoint_dir(cfg.output_path, state.step).name)
    written = checkpoint_dir(cfg.output_path, state.step)
    prune(cfg.output_path, cfg.checkpoint.keep, run_id, written)
    return str(written)


def student_weights(cfg: Config, ckpt: Path) -> Path:
    """The weights file of checkpoint `ckpt` that `eval.weights` picks (`danceopd sample` / `eval`)."""
    if cfg.eval.weights == "online":
        return Path(ckpt) / "model.safetensors"
    path = Path(ckpt) / EMA_FILE
    if not path.is_file():
        raise CheckpointError(f"{ckpt}: eval.weights is `ema`, but the checkpoint holds no {EMA_FILE} (trained without "
                              "learner.ema_decay); pass --set eval.weights=online")
    return path


@dataclass(frozen=True)
class Resumed:
    """What a checkpoint restored into the learner, and what the loop continues from."""

    step: int
    run_id: str
    router: dict  # the router's state at the first unconsumed ticket
    next_ticket: int
    accounting: dict


def resume(cfg: Config, path, learner, mode: str) -> Resumed:
    """Load a checkpoint into `learner` (its own state too, when it is of the same kind) and
    return the state it read."""
    path = Path(path)
    state = load_state(path)
    weights = load_tensors(path / "model.safetensors")
    if state["learner"] == learner.kind:
        learner.load(path / "learner", weights)
    else:
        learner.load_weights(weights)
        print(f"resume: a {state['mode']}-mode checkpoint ({state['learner']} learner) in {mode} mode: weights, "
              "routes, data cursor and step carry over; the optimizer state restarts", file=sys.stderr, flush=True)
    if cfg.learner.ema_decay is not None:
        if (path / EMA_FILE).is_file():
            learner.load_ema(load_tensors(path / EMA_FILE))
        else:
            learner.load_ema(weights)
            print(f"resume: {path.name} holds no {EMA_FILE} (trained without learner.ema_decay): the EMA starts "
                  "from its weights", file=sys.stderr, flush=True)
    step = int(state["step"])
    write_run(cfg.output_path, state["run_id"], resumed_from=address(path), step=step)  # a download: its URI
    push(cfg, RUN_FILE)
    return Resumed(step, state["run_id"], state["router"], int(state["router"]["next_ticket"]), state.get("accounting", {}))
