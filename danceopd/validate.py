"""`danceopd validate`: check everything a job needs — config, dataset buckets against routes,
image files, prompts, model folders — without loading a single weight."""

from __future__ import annotations

from pathlib import Path

from danceopd.config import Config, ConfigError
from danceopd.dataset import Dataset


def _model_folder(path: Path, key: str) -> None:
    if not path.is_dir():
        raise ConfigError(f"{key}: model folder {path} does not exist")
    if not (path / "config.json").is_file():
        raise ConfigError(f"{key}: {path} has no config.json (expected a save_pretrained folder)")
    if not any(path.glob("*.safetensors")):
        raise ConfigError(f"{key}: {path} has no .safetensors weights (pickle checkpoints are refused)")


def validate(cfg: Config) -> Dataset:
    """Raises ConfigError / DatasetError / ValueError with a one-line message."""
    if cfg.student.init != "random":
        _model_folder(cfg.resolve(cfg.student.init), "student.init")
    for i, t in enumerate(cfg.teachers):
        if t.kind == "pretrained":
            _model_folder(cfg.resolve(t.path), f"teachers.{i}.path")
    if cfg.sync.max_policy_lag < cfg.sync.sync_every - 1:
        raise ConfigError(f"sync.max_policy_lag: {cfg.sync.max_policy_lag} is below sync_every-1 = {cfg.sync.sync_every - 1}; "
                          "samples made between pushes would all be stale")
    per_step = cfg.learner.world_size * cfg.learner.grad_accum
    if cfg.replay.capacity < per_step and cfg.replay.spill_dir is None:
        raise ConfigError(f"replay.capacity: {cfg.replay.capacity} is below the batches one learner step needs ({per_step})")
    dataset = Dataset.load(cfg.resolve(cfg.data.path))
    dataset.check_routes(cfg.routing.routes)
    from danceopd.backends import make_backend  # after the cheap checks: backends import model code

    backend = make_backend(cfg)
    routed = {r.task for r in cfg.routing.routes}
    for row in dataset.rows:
        if row.task in routed:
            backend.check_row(row)
    return dataset
