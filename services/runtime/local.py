"""`--mode local`: every component a plain object in this process, each call done when made.

The training loop (services/loop.py) is the same one Ray mode runs; only the fleet, learner
and weight sync differ. Nothing here imports Ray or DeepSpeed.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from danceopd.checkpoint import load_json, load_torch, save_json, save_torch
from learner.learner import Learner
from rollout_workers.worker import RolloutWorker
from router.scoring import InProcessPool, NonFiniteAnswer, Scorer
from router.teacher import Teacher
from services.runtime.events import NonFinite, Routed, Traced
from services.weights.state import state_nbytes

if TYPE_CHECKING:  # annotations only: no import cycle, no cost
    from danceopd.config import Config


def used_teachers(cfg: Config) -> list[str]:
    return sorted({r.teacher for r in cfg.routing.routes})


def local_scorer(cfg: Config, teachers: dict | None = None) -> Scorer:
    """The scorer over in-process teachers (built here unless given)."""
    teachers = teachers or {name: Teacher(cfg, name) for name in used_teachers(cfg)}
    return Scorer(cfg.routing.routes, cfg.method, {n: InProcessPool(t) for n, t in teachers.items()})


class LocalFleet:
    """One rollout worker and the scorer with in-process teachers: each order is rolled out and
    scored when it is submitted."""

    mode = "local"

    def __init__(self, cfg: Config):
        self.teachers = {name: Teacher(cfg, name) for name in used_teachers(cfg)}
        self.routes = [r.name for r in cfg.routing.routes]
        self.scorer = local_scorer(cfg, self.teachers)
        self.worker = RolloutWorker(cfg, "rollout-0")
        self._events: list = []

    # ---- data path -----------------------------------------------------------------------
    def workers(self) -> list[str]:
        return [self.worker.worker_id]

    def worker_versions(self) -> dict[str, int]:
        return {self.worker.worker_id: self.worker.version}

    def submit(self, worker: str, orders: list) -> None:
        for order in orders:
            self._one(order)

    def _one(self, order) -> None:
        try:
            rolled = self.worker.rollout(order)
            if traces := self.worker.profiler.take():
                self._events.append(Traced(traces))
            rb = self.scorer.route(rolled)
        except NonFiniteAnswer as e:
            self._events.append(NonFinite(order.ticket, e.teacher, e.route, e.what))
            return
        self._events.append(Routed(order.ticket, rb, min(rb.column("policy_version").to_pylist())))

    def poll(self, timeout: float, wake: list = ()) -> list:
        events, self._events = self._events, []
        return events

    # ---- fleet -----------------------------------------------------------------------------
    def counts(self) -> dict:
        return {"rollout": 1, "learner": 1, "teacher": len(self.teachers)}

    def teacher_counts(self) -> dict[str, int]:
        return dict.fromkeys(self.routes, 1)

    def restarts(self) -> dict:
        return {}  # nothing is restarted in one process: a failure ends the job

    def failures(self) -> dict:
        return {}

    def pending_counts(self) -> dict[str, int]:
        return {}

    def busy_stats(self) -> dict:
        return {"rollout": [self.worker.get_stats()], "teacher": [t.get_stats() for t in self.teachers.values()],
                "router": [self.scorer.get_stats()]}

    def shutdown(self) -> None:
        self._events = []


class LocalLearner:
    """The plain torch learner: each step is done when it is started."""

    kind = "torch-adamw"

    def __init__(self, cfg: Config):
        self.learner = Learner(cfg)
        self._result = None

    @property
    def busy(self) -> bool:
        return False

    def pending(self) -> list:
        return []

    def start_step(self, handles: list) -> None:
        self._result = self.learner.train_step(handles)

    def poll_step(self, deadline_s: float | None = None) -> dict | None:
        result, self._result = self._result, None
        return result

    def export(self) -> dict[str, torch.Tensor]:
        return self.learner.export_weights()

    def export_ema(self) -> dict[str, torch.Tensor] | None:
        return self.learner.export_ema()

    def load_ema(self, state: dict) -> None:
        self.learner.load_ema(state)

    def save(self, folder) -> list[str]:
        folder.mkdir(parents=True, exist_ok=True)
        save_torch(folder / "optimizer.pt", self.learner.optimizer_state())
        save_json(folder / "rng.json", {"torch": torch.get_rng_state().tolist()})
        return ["optimizer.pt", "rng.json"]

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
        self.pipeline.weights = (version, state)
        self.pipeline.worker_version[self.fleet.worker.worker_id] = version
        self.nbytes = state_nbytes(state)
        dt = time.perf_counter() - t0
        self.records.append({"version": version, "seconds": dt, "transfer_s": dt, "wait_s": 0.0, "bytes": self.nbytes})

    def poll(self, block: bool = False) -> None:
        pass  # applied when pushed

    def applied(self, ev) -> None:
        pass  # the one worker never reports: it applies each push when it is made

    def fleet_changed(self) -> None:
        pass  # one worker, always the same

    def close(self) -> None:
        pass


class LocalEvaluation:
    """The evaluator in this process: each evaluation runs when it is asked for (on the learner's
    path; Ray mode moves it to an actor of its own). A failing evaluation stops evaluating, never
    the job."""

    where = "in process"

    def __init__(self, cfg: Config):
        from danceopd.evaluate import Evaluator

        self.evaluator = Evaluator(cfg)
        self.ema = cfg.eval.weights == "ema"
        self.done: list[dict] = []
        self.skipped, self.failed = 0, None

    def submit(self, step: int, learner: LocalLearner) -> None:
        if self.failed:
            return
        try:
            weights = learner.export_ema() if self.ema else learner.export()
            self.done.append(self.evaluator.evaluate(weights, step))
        except Exception as e:  # noqa: BLE001 — evaluation is not worth the job
            self.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            print(f"evaluation failed at step {step}, evaluation stops: {self.failed}", flush=True)

    def poll(self, wait_s: float = 0.0) -> list[dict]:
        done, self.done = self.done, []
        return done

    def shutdown(self) -> None:
        pass


def build_local(cfg: Config, pipe, run_id: str):
    del run_id  # labels Ray's exported metrics; local mode exports none
    fleet = LocalFleet(cfg)
    learner = LocalLearner(cfg)
    return fleet, learner, LocalSync(learner, fleet, pipe)
