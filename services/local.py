"""`--mode local`: the reference loop — every component as a plain object in one process.

Per step: hand out work -> roll out -> route to teachers -> replay queue -> learner step ->
maybe push weights -> maybe checkpoint. The Ray runtime wires the very same classes as actors.
"""

from __future__ import annotations

import torch

from danceopd.checkpoint import (
    atomic_checkpoint,
    load_json,
    load_tensors,
    load_torch,
    prune,
    save_json,
    save_tensors,
    save_torch,
)
from danceopd.dataset import Dataset
from learner.learner import Learner
from rollout_workers.worker import RolloutWorker
from router.router import Router
from router.teacher import Teacher
from services.progress import JobLog
from services.replay import ReplayQueue


def build_router(cfg, pools) -> Router:
    dataset = Dataset.load(cfg.resolve(cfg.data.path))
    dataset.check_routes(cfg.routing.routes)
    return Router(cfg, dataset, pools)


def used_teachers(cfg) -> list[str]:
    return sorted({r.teacher for r in cfg.routing.routes})


def save_local_checkpoint(cfg, step, learner, router) -> str:
    with atomic_checkpoint(cfg.output_path, step) as tmp:
        save_tensors(tmp / "model.safetensors", learner.model.state_dict())
        save_torch(tmp / "optimizer.pt", learner.optimizer_state())
        save_json(tmp / "state.json", {"step": step, "version": learner.version, "router": router.state_dict(),
                                       "torch_rng": torch.get_rng_state().tolist(), "mode": "local"})
    prune(cfg.output_path, cfg.checkpoint.keep)
    return str(cfg.output_path / "checkpoints" / f"step-{step:08d}")


def load_local_checkpoint(path, learner, router) -> int:
    state = load_json(path / "state.json")
    if state.get("mode") != "local":
        raise ValueError(f"--resume {path}: a {state.get('mode')} checkpoint cannot resume a local run")
    learner.model.load_state_dict(load_tensors(path / "model.safetensors"))
    learner.load_optimizer_state(load_torch(path / "optimizer.pt"))
    learner.version = int(state["version"])
    router.load_state_dict(state["router"])
    torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
    return int(state["step"])


def train_local(cfg, resume_from=None, show_progress: bool = True) -> dict:
    router = build_router(cfg, {name: Teacher(cfg, name) for name in used_teachers(cfg)})
    worker = RolloutWorker(cfg, "rollout-0")
    learner = Learner(cfg)
    queue = ReplayQueue(cfg.replay.capacity, cfg.sync.max_policy_lag, cfg.replay.spill_dir and cfg.resolve(cfg.replay.spill_dir))
    start = load_local_checkpoint(resume_from, learner, router) if resume_from else 0

    per_step = cfg.learner.world_size * cfg.learner.grad_accum
    if queue.capacity < per_step:
        raise ValueError(f"replay.capacity: {queue.capacity} < batches per step ({per_step})")
    worker.set_weights(learner.export_weights(), learner.version)
    log = JobLog(cfg, start, show_progress)
    last_ckpt = None
    for step in range(start, cfg.learner.steps):
        with log.timer("rollout"):
            for _ in range(per_step):
                queue.put(router.route(worker.rollout(router.next_order(cfg.rollout.batch_size))))
        with log.timer("learn"):
            metrics = learner.train_step(queue.take(per_step, learner.version))
        if (step + 1) % cfg.sync.sync_every == 0:
            with log.timer("sync"):
                worker.set_weights(learner.export_weights(), learner.version)
        if cfg.checkpoint.every and (step + 1) % cfg.checkpoint.every == 0 or step + 1 == cfg.learner.steps:
            with log.timer("checkpoint"):
                last_ckpt = save_local_checkpoint(cfg, step + 1, learner, router)
        log.step(step + 1, metrics, samples=per_step * cfg.rollout.batch_size, lag=queue.stats()["max_lag_seen"])
    queue.drain("unconsumed")
    return log.finish(last_ckpt, extra={"replay": queue.stats(), "nfe": worker.stats["nfe"]})
