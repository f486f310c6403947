"""Checkpoints: a folder per step, written under a temporary name, every file and folder fsynced,
then renamed into place, so a crash mid-write never leaves (or replaces) a half checkpoint.
`COMPLETE`, written last, records every file of the checkpoint with its size: `damage()` checks
them again before a resume (a file truncated or lost since, a state.json that does not parse, a
safetensors file whose header does not cover it). Weights are safetensors; optimizer state is
torch-saved tensors and plain values, read back with `weights_only=True`: a file that holds
pickled objects (code) is refused, never unpickled.

Every checkpoint carries the id of the run that wrote it (state.json `run_id`; the run's id
also sits in output_dir/run.json). `--resume auto` takes the newest undamaged checkpoint of that
run; pruning deletes only older checkpoints of the same run, never the newest undamaged one."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import secrets
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from danceopd.storage import address, is_uri, open_store

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
    """Yields an empty temporary folder to write the checkpoint into. When the block ends, every
    file and folder in it is fsynced, COMPLETE (the files and their sizes) is written and synced,
    and the folder is renamed into place: after a crash at any point the checkpoint is either
    absent or whole. The block checks what must be there (`require`) before it ends."""
    root = checkpoints_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(output_dir, step)
    tmp = root / f".tmp-{PREFIX}{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        paths = sorted(tmp.rglob("*"))
        for path in paths:  # other processes (learner ranks) wrote some of them: sync them all here
            fsync(path)
        files = {str(path.relative_to(tmp)): path.stat().st_size for path in paths if path.is_file()}
        write_synced(tmp / "COMPLETE", json.dumps({"step": step, "files": files}, indent=1))
        fsync(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # re-checkpointing the same step: keep the old one until the new is in place
        old = root / f".old-{PREFIX}{step:08d}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    fsync(root)  # the rename itself


def require(folder: Path, names: list[str]) -> None:
    """Every file in `names` (relative to `folder`) is there, or a CheckpointError naming the
    missing ones: raised inside `atomic_checkpoint`, so no COMPLETE is written."""
    missing = [n for n in names if not (Path(folder) / n).is_file()]
    if missing and is_uri(where := address(folder)):  # a staging copy: learner ranks upload their own files
        there = open_store(where).files()
        missing = [n for n in missing if n not in there]
    if missing:
        name = Path(folder).name.removeprefix(".tmp-")
        raise CheckpointError(f"checkpoint {name}: {', '.join(missing)} missing after the save, so it is "
                              "not complete (each learner rank writes its own files into job.output_dir: it must "
                              "be storage every learner node shares)")


def damage(path: Path) -> str | None:
    """Why the checkpoint at `path` cannot be resumed from, in a few words, or None: every file
    COMPLETE records is there at its recorded size, state.json parses with a run id, step and
    router state, and every safetensors file's header covers the file."""
    from safetensors import safe_open

    path = Path(path)
    try:
        record = load_json(path / "COMPLETE")
    except (OSError, ValueError):
        return "COMPLETE does not parse"
    files = record.get("files", {}) if isinstance(record, dict) else {}  # older ones record only the step
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} is {f.stat().st_size} bytes, {size} were written"
    try:
        state = load_json(path / "state.json")
    except (OSError, ValueError) as e:
        return f"state.json does not parse ({type(e).__name__})"
    if not isinstance(state, dict) or not {"schema", "run_id", "step", "router"} <= state.keys():
        return "state.json lacks the schema, run_id, step or router"
    model = path / "model.safetensors"
    for f in [model, *(f for f in sorted(path.rglob("*.safetensors")) if f != model)]:
        try:
            with safe_open(str(f), "pt") as st:
                st.keys()
        except Exception as e:  # noqa: BLE001 — a missing or truncated file, a bad header: all damage
            text = str(e).strip().splitlines()
            return f"{f.relative_to(path)} does not load ({text[0] if text else type(e).__name__})"
    return None


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
    except (OSError, ValueError, AttributeError):
        return None


def prune(output_dir: Path, keep: int, run_id: str, written: Path) -> None:
    """Keep `written` (the checkpoint just written) and the newest `keep - 1` other checkpoints of
    run `run_id`; checkpoints of other runs are never touched, nor is the newest of the run that
    is undamaged (should `written` be damaged, the resume point stays the one before it)."""
    written = Path(written)
    mine = [p for p in list_checkpoints(output_dir) if p != written and checkpoint_run_id(p) == run_id]
    doomed = mine[:max(len(mine) - (keep - 1), 0)]
    if doomed and damage(written):
        resume_point = next((p for p in reversed(mine) if not damage(p)), None)
        doomed = [p for p in doomed if p != resume_point]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)


def resolve_resume(output_dir: Path, resume: str | None, run_id: str | None = None) -> Path | None:
    """`auto`: the newest undamaged checkpoint of run `run_id` in output_dir (of any run if
    `run_id` is None; None if there is none), saying in one line on stderr each damaged one it
    skips and why. Else a folder, which must be complete and undamaged, or the URI of one on object
    storage (danceopd.remote_checkpoint), downloaded under output_dir."""
    if resume is None:
        return None
    if resume == "auto":
        for path in reversed(list_checkpoints(output_dir)):
            why = damage(path)  # before the run id: a damaged state.json names no run
            if why:
                print(f"--resume auto: skipping {path.name}, it is damaged: {why}", file=sys.stderr, flush=True)
            elif run_id is None or checkpoint_run_id(path) == run_id:
                return path
        return None
    if is_uri(resume):  # object storage: a downloaded copy, checked as a local one
        from danceopd.remote_checkpoint import DOWNLOADS, fetch_uri

        return fetch_uri(resume, Path(output_dir) / DOWNLOADS)
    path = Path(resume)
    if not (path / "COMPLETE").exists():
        raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint folder")
    why = damage(path)
    if why:
        raise CheckpointError(f"--resume {resume}: the checkpoint is damaged: {why}")
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
    """run.json, replaced atomically: `--resume auto` reads the run id from it."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{RUN_FILE}.tmp"
    write_synced(tmp, json.dumps({"run_id": run_id, "resumed_from": resumed_from, "step": step, "time": time.time()},
                                 indent=1, sort_keys=True))
    os.replace(tmp, out / RUN_FILE)
    fsync(out)


# ---- files ----------------------------------------------------------------------------------------

def fsync(path: Path) -> None:
    """Flush a file's data, or a folder's entries (a rename, a new file), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


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
