"""Ray at the edge: the plain component classes deployed as actors.

Each actor adds only what Ray needs: metrics, a (meta, batch) pair of returns so the loop learns
that a batch is done (or failed) without fetching it, and weight transfer by reference.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from typing import TYPE_CHECKING

import numpy as np
import ray

from danceopd.packed import pack_state, unpack_state
from rollout_workers.worker import RolloutWorker
from router.scoring import NonFiniteAnswer, Scorer, TeacherFailure
from router.teacher import Teacher
from services.runtime.groups import mark_started
from services.runtime.ports import free_port
from services.telemetry.metrics import ActorMetrics
from services.weights.state import state_nbytes

if TYPE_CHECKING:  # annotations only: no import cycle, no cost
    from danceopd.config import Config


def actor_env(cfg: Config) -> dict:
    # MLflow, where installed, is imported by deepspeed: it reports no usage from our actors either.
    env = {"RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    if cfg.learner.num_gpus == 0 and cfg.rollout.num_gpus == 0:
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed would otherwise probe for CUDA
    return env


class WeightGroupMember:
    """The `collective` transport's side of an actor: join the current epoch's group, then
    send (learner rank 0) or receive (rollout workers) bucketed broadcasts."""

    weight_group = None

    def join_weight_group(self, backend: str, addr: str, port: int, rank: int, world: int, epoch: int, timeout_s: float) -> int:
        from danceopd.collective import make_group

        if self.weight_group is not None:
            self.weight_group.close()
        self.weight_group = make_group(backend, addr, port, rank, world, epoch, timeout_s)
        return epoch


class RolloutWorkerActor(WeightGroupMember, RolloutWorker):
    """A rollout worker created (or restarted) with the driver's latest weights, so it never
    rolls out with initial weights; records its metrics with the run's `labels` (job_labels()).
    `latest`: (version, [ref]) of the last push, or None (before the first, and under
    `collective`, which broadcasts to joiners)."""

    def __init__(self, cfg: Config, worker_id: str, labels: dict, latest=None):
        mark_started()
        super().__init__(cfg, worker_id)
        self.metrics = ActorMetrics("rollout", worker_id, labels)
        self.t_start = time.perf_counter()
        if latest is not None:
            version, (ref,) = latest  # the ref inside a list: fetched here, where it is timed out by the caller
            self.set_weights(unpack_state(ray.get(ref)), version)

    def rollout_meta(self, orders: list, latest=None):
        """([meta per order], RolloutBatch per order): the loop waits on the small metas, the
        scorer gets the batches. One call carries the orders the loop issued to this worker
        together (`rollout.orders_per_worker`): Ray's cost per call is paid once for them.
        `latest` — (version, [ref]) of the driver's newest weights (`object_store`) — rides on
        every call: newer weights are applied first, between batches as always, with no call of
        their own. A meta says which version its batch was made with and what applying cost."""
        applied = None
        if latest is not None and latest[0] > self.version:
            applied = self.apply_weights(latest[1], latest[0])
        metas, batches = [], []
        for order in orders:
            t0, nfe0 = time.perf_counter(), self.stats["nfe"]
            batches.append(self.rollout(order))
            per_route = collections.Counter(it.route for it in order.items)
            nfe = self.stats["nfe"] - nfe0
            for route, n in per_route.items():
                self.metrics.inc("danceopd_rollout_samples", n, route=route)
                self.metrics.inc("danceopd_rollout_nfes", nfe * n / len(order.items), route=route)
            self.metrics.observe("danceopd_rollout_latency_seconds", time.perf_counter() - t0)
            metas.append({"ticket": order.ticket, "worker": self.worker_id, "version": self.version, "applied": applied})
            applied = None  # reported once
        wall = max(time.perf_counter() - self.t_start, 1e-9)
        self.metrics.set("danceopd_rollout_idle_ratio", max(0.0, 1 - self.stats["busy_s"] / wall))
        if traces := self.profiler.take():  # `logging.profile_steps`: worker 0's traces ride on the meta
            metas[0]["traces"] = traces
        return (metas, *batches)

    def apply_weights(self, refs: list, version: int) -> dict:
        """Fetch the weights by reference and apply them. The ref travels inside a list so Ray
        does not fetch it before the call starts, and the transfer is timed here."""
        t0 = time.perf_counter()
        state = unpack_state(ray.get(refs[0]))
        self.set_weights(state, version)
        return {"version": version, "transfer_s": time.perf_counter() - t0, "bytes": state_nbytes(state)}

    def receive_weights(self) -> dict:
        """`collective`: receive a broadcast and apply it."""
        from danceopd.collective import BucketBroadcaster
        from danceopd.lora import trainable_state_dict

        t0 = time.perf_counter()
        version, state = BucketBroadcaster().recv(self.weight_group, trainable_state_dict(self.model))
        self.set_weights(state, version)
        return {"version": version, "transfer_s": time.perf_counter() - t0, "bytes": state_nbytes(state)}

    def pid(self) -> int:
        return os.getpid()


class TeacherActor(Teacher):
    def __init__(self, cfg: Config, teacher_name: str, replica: int, labels: dict):
        mark_started()
        super().__init__(cfg, teacher_name, replica)
        self.metrics = ActorMetrics("teacher", self.teacher_id, labels)

    def query(self, state, sigma, cond, cfg_scale: float, route: str = ""):
        t0 = time.perf_counter()
        out = super().query(state, sigma, cond, cfg_scale, route)
        self.metrics.inc("danceopd_teacher_queries", len(out), teacher=self.name, route=route)
        self.metrics.observe("danceopd_teacher_latency_seconds", time.perf_counter() - t0, teacher=self.name)
        return out

    def pid(self) -> int:
        return os.getpid()


class RayTeacherPool:
    """A teacher's replicas. Each ask goes to the replica with the fewest outstanding asks, so
    concurrent batches spread over the replicas; an answer late past `deadline_s`, or a dead
    replica, is that replica's `TeacherFailure`.

    The deadline measures service time: a replica answers its asks one at a time, in the order
    they were sent (one caller, a sequential actor), so an ask's clock starts when the asks sent
    before it to the same replica are answered, not when it was queued behind them."""

    def __init__(self, teacher: str, replicas: dict[str, object], deadline_s: float):
        self.teacher, self.replicas, self.deadline_s = teacher, dict(replicas), deadline_s
        self._setup()

    def _setup(self):
        self._lock = threading.Lock()
        self._queues = {name: collections.deque() for name in self.replicas}  # refs sent, oldest first
        self._since = dict.fromkeys(self.replicas, 0.0)  # when the oldest unanswered ask began service

    def __getstate__(self):
        return {"teacher": self.teacher, "replicas": self.replicas, "deadline_s": self.deadline_s}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._setup()

    def submit(self, state, sigma, cond, cfg_scale: float, route: str = ""):
        if not self.replicas:  # every replica is being replaced (e.g. its node was lost): re-issue
            raise TeacherFailure(self.teacher, "", "no live replica")
        with self._lock:
            name = min(self._queues, key=lambda n: len(self._queues[n]))
            ref = self.replicas[name].query.remote(state, sigma, cond, cfg_scale, route)
            q = self._queues[name]
            if not q:
                self._since[name] = time.perf_counter()
            q.append(ref)
        return name, ref

    def _head_since(self, name: str) -> float:
        """When replica `name` began serving its oldest unanswered ask: past the deadline, the
        replica owes an answer, whichever ask (this caller's or one queued behind it) waits."""
        with self._lock:
            q = self._queues[name]
            while q and ray.wait([q[0]], timeout=0)[0]:
                q.popleft()  # answered (or failed): the next one is being served from now
                self._since[name] = time.perf_counter()
            return self._since[name]

    def _done(self, name: str, ref) -> None:
        with self._lock:
            q = self._queues[name]
            if q and q[0] is ref:
                q.popleft()
                self._since[name] = time.perf_counter()
            elif ref in q:
                q.remove(ref)

    def result(self, handle) -> np.ndarray:
        name, ref = handle
        who = self.replicas[name]._actor_id.hex()
        try:
            while True:
                left = min(0.2, self._head_since(name) + self.deadline_s - time.perf_counter())
                if left <= 0:
                    raise TeacherFailure(self.teacher, name, f"no answer within deadlines.teacher_s={self.deadline_s:g}", who)
                if ray.wait([ref], timeout=left)[0]:
                    return ray.get(ref)
        except ray.exceptions.RayActorError as e:
            raise TeacherFailure(self.teacher, name, f"died ({type(e).__name__})", who) from None
        finally:
            self._done(name, ref)


class ScorerActor(Scorer):
    """The router's scoring side as a threaded actor: several batches are scored at once
    (`routing.max_concurrent_batches`). Stateless: a dead one is replaced and re-scores."""

    def __init__(self, routes, method, pools, name: str, labels: dict):
        mark_started()
        super().__init__(routes, method, pools)
        self.metrics = ActorMetrics("router", name, labels)
        self._backlog: collections.Counter = collections.Counter()

    def route_meta(self, *rbs):
        """([meta per batch], RoutedBatch per batch), like the rollout worker's: the driver learns
        each ticket, policy version and size without fetching the batch. The batches of one call
        (a rollout call's) are asked of their teachers together: one ask per teacher and route.
        A batch with NaN/Inf in a teacher answer is no batch: (meta naming it under `nonfinite`,
        None)."""
        # batches of each route in this call (a batch counts once per route it holds)
        batches = collections.Counter(r for rb in rbs for r in set(rb.column("route").to_pylist()))
        self._report(batches, +1)
        metas, outs = [], []
        try:
            for rb, out in zip(rbs, self.route_many(list(rbs))):
                bad = (out.teacher, out.route, out.what) if isinstance(out, NonFiniteAnswer) else None
                versions = rb.column("policy_version").to_numpy()
                metas.append({"ticket": rb.column("ticket")[0].as_py(), "rows": rb.num_rows, "nonfinite": bad,
                              "version": int(versions.min()) if len(versions) else 0})
                outs.append(None if bad else out)
        finally:
            self._report(batches, -1)
        return (metas, *outs)

    def _report(self, batches: collections.Counter, sign: int) -> None:
        """`batches`: route -> batches of a call holding it (one gauge update per route and call)."""
        with self._lock:  # batches of each route being scored right now
            for r in self.routes:
                self._backlog[r] += sign * batches.get(r, 0)
                self.metrics.set("danceopd_router_backlog", self._backlog[r], route=r)


def learner_rank_actor(base):
    class LearnerRankActor(WeightGroupMember, base):
        def train_refs(self, *micro_batches) -> dict:
            """One step on this rank's batches, passed as top-level refs: Ray fetches them here
            from the object store, where each was stored once by the scorer."""
            return self.train_step(list(micro_batches))

        def export_packed(self) -> dict | None:
            """`export_weights` as numpy arrays (danceopd/packed.py): what a push publishes."""
            state = self.export_weights()
            return None if state is None else pack_state(state)

        def broadcast_weights(self, version: int) -> int:
            """Every rank exports (ZeRO-3 gathers); rank 0 broadcasts to the weight group."""
            from danceopd.collective import BucketBroadcaster

            state = self.export_weights()
            return BucketBroadcaster().send(self.weight_group, state, version) if state is not None else 0

        def free_port(self) -> tuple[str, int]:
            return free_port()

        @ray.method(concurrency_group="probe")
        def alive(self) -> int:
            """The liveness probe, in a concurrency group of its own (the class is deployed with
            `ray.remote(concurrency_groups={"probe": 1})`): it answers while a default-group call
            waits in a collective for a hung peer; a hung or stopped process does not answer it.
            With a group, default-group calls run on one thread of their own (not the main
            thread), still one at a time in submission order (tests/test_ray_semantics.py)."""
            return os.getpid()

    return LearnerRankActor
