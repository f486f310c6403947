"""Checkpoints: a folder per step, written under a temporary name and renamed when complete,
so a crash mid-write never leaves (or replaces) a half checkpoint. Weights are safetensors;
optimizer state is torch-saved and read back with `weights_only=True` (no pickle code)."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PREFIX = "step-"


def checkpoints_root(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


@contextlib.contextmanager
def atomic_checkpoint(output_dir: Path, step: int):
    root = checkpoints_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
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


def prune(output_dir: Path, keep: int) -> None:
    for p in list_checkpoints(output_dir)[:-keep]:
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


def load_torch(path: Path):
    return torch.load(str(path), weights_only=True)
