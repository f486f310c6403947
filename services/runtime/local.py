"""`--mode local`: every component a plain object in this process, each call done when made.

The training loop (services/loop.py) is the same one Ray mode runs; only the fleet, learner
and weight sync differ. Nothing here imports Ray or DeepSpeed.
"""

from __future__ import annotations

import time

import torch

from danceopd.checkpoint import load_json, load_torch, save_json, save_torch
from danceopd.dataset import Dataset
from learner.learner import Learner
from rollout_workers.worker import RolloutWorker
from router.router import InProcessPool, Router
from router.teacher import Teacher
from services.replay import ReplayQueue
from services.runtime.events import Routed
from services.weights.store import state_nbytes


def used_teachers(cfg) -> list[str]:
    return sorted({r.teacher for r in cfg.routing.routes})


def build_router(cfg, pools: dict) -> Router:
    dataset = Dataset.load(cfg.resolve(cfg.data.path))
    dataset.check_routes(cfg.routing.routes)
    return Router(cfg, dataset, pools)


class LocalFleet:
    """One rollout worker, the router with in-process teachers, and the replay queue."""

    mode = "local"

    def __init__(self, cfg):
        self.cfg = cfg
        self.teachers = {name: Teacher(cfg, name) for name in used_teachers(cfg)}
        self.router = build_router(cfg, {n: InProcessPool(t) for n, t in self.teachers.items()})
        self.worker = RolloutWorker(cfg, "rollout-0")
        spill = cfg.replay.spill_dir and cfg.resolve(cfg.replay.spill_dir)
        self.replay = ReplayQueue(cfg.replay.capacity, cfg.sync.max_policy_lag, spill, cfg.routing.granularity == "update")
        self._events: list = []

    # ---- data path -----------------------------------------------------------------------
    def workers(self) -> list[str]:
        return [self.worker.worker_id]

    def worker_versions(self) -> dict[str, int]:
        return {self.worker.worker_id: self.worker.version}

    def next_orders(self, n: int, owed: list[str] = ()) -> list:
        return self.router.next_orders(n, self.cfg.rollout.batch_size, owed)

    def submit(self, worker: str, order) -> None:
        self._events.append(Routed(order.ticket, self.router.route(self.worker.rollout(order))))

    def poll(self, timeout: float, learner=None) -> list:
        events, self._events = self._events, []
        return events

    def replay_put(self, handles: list) -> None:
        for rb in handles:
            if not self.replay.put(rb):
                raise RuntimeError("replay queue: full although the pipeline respects its capacity")

    def replay_take(self, n: int, version: int):
        return self.replay.take(n, version)

    def replay_purge(self, version: int) -> dict:
        return self.replay.purge(version)

    def replay_drain(self) -> dict[int, int]:
        return self.replay.drain("unconsumed")

    def replay_stats(self) -> dict:
        return self.replay.stats()

    # ---- router state (checkpoints) ------------------------------------------------------
    def router_state_before(self, ticket: int) -> dict:
        return self.router.state_before(ticket)

    def router_forget_before(self, ticket: int) -> None:
        self.router.forget_before(ticket)

    def router_load(self, state: dict) -> None:
        self.router.load_state_dict(state)

    # ---- fleet -----------------------------------------------------------------------------
    def counts(self) -> dict:
        return {"rollout": 1, "learner": 1, "teacher": len(self.teachers)}

    def teacher_counts(self) -> dict[str, int]:
        return {r.name: 1 for r in self.cfg.routing.routes}

    def restarts(self) -> dict:
        return {"rollout": 0, "teacher": 0}

    def failures(self) -> dict:
        return {}

    def pending_counts(self) -> dict[str, int]:
        return {}

    def busy_stats(self) -> dict:
        return {"rollout": [self.worker.get_stats()], "teacher": [t.get_stats() for t in self.teachers.values()],
                "router": [self.router.get_stats()]}

    def scale(self, rollout_workers=None, teachers=None) -> list:
        raise ValueError("scaling needs --mode ray: local mode runs one worker in this process")

    def can_grow(self) -> bool:
        return False

    def retire_drained(self, busy: set[str]) -> None:
        pass

    def shutdown(self) -> None:
        pass


class LocalLearner:
    """The plain torch learner: each step is done when it is started."""

    kind = "torch-adamw"

    def __init__(self, cfg):
        self.learner = Learner(cfg)
        self._result = None

    @property
    def busy(self) -> bool:
        return False

    def pending(self) -> list:
        return []

    def start_step(self, take) -> None:
        batches, _ = take
        self._result = self.learner.train_step(batches)

    def poll_step(self, deadline_s: float | None = None) -> dict | None:
        result, self._result = self._result, None
        return result

    def export(self) -> dict[str, torch.Tensor]:
        return self.learner.export_weights()

    def save(self, folder) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        save_torch(folder / "optimizer.pt", self.learner.optimizer_state())
        save_json(folder / "rng.json", {"torch": torch.get_rng_state().tolist()})

    def load(self, folder, weights: dict) -> None:
        self.learner.load_weights(weights)
        self.learner.load_optimizer_state(load_torch(folder / "optimizer.pt"))
        torch.set_rng_state(torch.tensor(load_json(folder / "rng.json")["torch"], dtype=torch.uint8))

    def load_weights(self, weights: dict) -> None:
        self.learner.load_weights(weights)

    def set_version(self, version: int) -> None:
        self.learner.version = version

    def shutdown(self) -> None:
        pass


class LocalSync:
    """Weights straight from the learner into the one worker, between batches."""

    def __init__(self, learner: LocalLearner, fleet: LocalFleet, pipeline):
        self.learner, self.fleet, self.pipeline = learner, fleet, pipeline
        self.records: list[dict] = []
        self.nbytes = 0

    def push(self, version: int) -> None:
        t0 = time.perf_counter()
        state = self.learner.export()
        self.fleet.worker.set_weights(state, version)
        self.pipeline.worker_version[self.fleet.worker.worker_id] = version
        self.nbytes = state_nbytes(state)
        dt = time.perf_counter() - t0
        self.records.append({"version": version, "seconds": dt, "transfer_s": dt, "wait_s": 0.0, "bytes": self.nbytes})

    def poll(self, block: bool = False) -> None:
        pass

    def fleet_changed(self) -> None:
        pass

    def close(self) -> None:
        pass


class LocalEvaluation:
    """The evaluator in this process: each evaluation runs when it is asked for (on the learner's
    path; Ray mode moves it to an actor of its own). A failing evaluation stops evaluating, never
    the job."""

    where = "in process"

    def __init__(self, cfg):
        from danceopd.evaluate import Evaluator

        self.evaluator = Evaluator(cfg)
        self.done: list[dict] = []
        self.skipped, self.failed = 0, None

    def submit(self, step: int, learner: LocalLearner) -> None:
        if self.failed:
            return
        try:
            self.done.append(self.evaluator.evaluate(learner.export(), step))
        except Exception as e:  # noqa: BLE001 — evaluation is not worth the job
            self.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            print(f"evaluation failed at step {step}, evaluation stops: {self.failed}", flush=True)

    def poll(self, wait_s: float = 0.0) -> list[dict]:
        done, self.done = self.done, []
        return done

    def shutdown(self) -> None:
        pass


def build_local(cfg):
    fleet = LocalFleet(cfg)
    learner = LocalLearner(cfg)
    return fleet, learner, lambda pipeline: LocalSync(learner, fleet, pipeline)
