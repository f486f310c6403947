"""Checkpoints: a folder per step, written under a temporary name and renamed when complete,
so a crash mid-write never leaves (or replaces) a half checkpoint. Weights are safetensors;
optimizer state is torch-saved tensors and plain values, read back with `weights_only=True`:
a file that holds pickled objects (code) is refused, never unpickled.

Every checkpoint carries the id of the run that wrote it (state.json `run_id`; the run's id
also sits in output_dir/run.json). Pruning deletes only older checkpoints of the same run."""

from __future__ import annotations

import contextlib
import json
import pickle
import re
import secrets
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PREFIX = "step-"
RUN_FILE = "run.json"


class CheckpointError(ValueError):
    """A checkpoint or output folder problem, in one line."""


def checkpoints_root(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return checkpoints_root(output_dir) / f"{PREFIX}{step:08d}"


@contextlib.contextmanager
def atomic_checkpoint(output_dir: Path, step: int):
    root = checkpoints_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(output_dir, step)
    tmp = root / f".tmp-{PREFIX}{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    (tmp / "COMPLETE").write_text(str(step))
    if final.exists():  # re-checkpointing the same step: keep the old one until the new is in place
        old = root / f".old-{PREFIX}{step:08d}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)


def list_checkpoints(output_dir: Path) -> list[Path]:
    root = checkpoints_root(output_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / "COMPLETE").exists())


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def checkpoint_run_id(path: Path) -> str | None:
    try:
        return load_json(Path(path) / "state.json").get("run_id")
    except (OSError, ValueError):
        return None


def prune(output_dir: Path, keep: int, run_id: str, written: Path) -> None:
    """Keep `written` (the checkpoint just written) and the newest `keep - 1` other checkpoints of
    run `run_id`; checkpoints of other runs are never touched."""
    written = Path(written)
    mine = [p for p in list_checkpoints(output_dir) if p != written and checkpoint_run_id(p) == run_id]
    for p in mine[:max(len(mine) - (keep - 1), 0)]:
        shutil.rmtree(p, ignore_errors=True)


def resolve_resume(output_dir: Path, resume: str | None) -> Path | None:
    """`auto`: the latest checkpoint in output_dir (None if there is none); else a folder."""
    if resume is None:
        return None
    if resume == "auto":
        return latest_checkpoint(output_dir)
    path = Path(resume)
    if not (path / "COMPLETE").exists():
        raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint folder")
    return path


# ---- the run ------------------------------------------------------------------------------------

def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def read_run(output_dir: Path) -> dict | None:
    try:
        return load_json(Path(output_dir) / RUN_FILE)
    except (OSError, ValueError):
        return None


def write_run(output_dir: Path, run_id: str, resumed_from: str | None = None, step: int = 0) -> None:
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    save_json(Path(output_dir) / RUN_FILE, {"run_id": run_id, "resumed_from": resumed_from, "step": step,
                                            "time": time.time()})


# ---- files ----------------------------------------------------------------------------------------

def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def save_json(path: Path, obj: dict) -> None:
    Path(path).write_text(json.dumps(obj, indent=1, sort_keys=True))


def load_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def save_torch(path: Path, obj) -> None:
    torch.save(obj, str(path))


def load_torch(path: Path, mmap: bool = False):
    """Tensors and plain values only (`weights_only=True`); anything else is refused in one line."""
    def refuse(why: str):
        return CheckpointError(f"{path}: refused: {why}; checkpoint files are never unpickled")

    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":
            raise refuse("not a torch.save zip archive (a plain pickle?)")
    try:
        return torch.load(str(path), weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        m = re.search(r"GLOBAL (\S+)", str(e))
        raise refuse(f"it holds the Python object {m.group(1)}, not only tensors and plain values" if m else
                     f"not a weights-only torch file ({type(e).__name__})") from None


def verify_no_pickle(folder: Path) -> None:
    """Every torch file under a checkpoint folder loads weights-only (memory-mapped: cheap)."""
    for p in sorted(Path(folder).rglob("*.pt")):
        load_torch(p, mmap=True)
