"""Router: the single authority on routing.

It owns the RoutePolicy and the data-sampling generator (both checkpointed), hands out work
orders, and sends every RolloutBatch to the teacher pool of each row's route, producing the
RoutedBatch. A pool has two calls, `submit(state, sigma, cond, cfg_scale, route) -> handle` and
`result(handle) -> ndarray`, so all the routes of one batch are asked before any answer is
awaited (their pools work concurrently): `InProcessPool` in local mode, a load-balanced group
of teacher actors in Ray mode. `route` is thread-safe: the Ray router scores several batches
at once.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pyarrow as pa
import torch

from danceopd.batch import replace_columns, scalars, to_tensors
from danceopd.dataset import Dataset
from danceopd.methods import make_method
from danceopd.routing import RoutePolicy
from danceopd.work import WorkItem, WorkOrder, sample_seed


class TeacherFailure(RuntimeError):
    """A teacher replica failed to answer (died, timed out): the replica is to blame, not the
    rollout worker whose batch it was scoring."""

    def __init__(self, teacher: str, replica: str, cause: str, incarnation: str = ""):
        super().__init__(f"teacher {replica}: {cause}")
        # `incarnation` names the actor that failed, so a failure reported after the replica
        # was already replaced does not restart the replacement.
        self.teacher, self.replica, self.cause, self.incarnation = teacher, replica, cause, incarnation

    def __reduce__(self):  # crosses process boundaries inside Ray's task errors
        return TeacherFailure, (self.teacher, self.replica, self.cause, self.incarnation)


class InProcessPool:
    """A teacher in this process: it answers at submit time."""

    def __init__(self, teacher):
        self.teacher = teacher

    def submit(self, state, sigma, cond, cfg_scale: float, route: str = ""):
        return self.teacher.query(state, sigma, cond, cfg_scale, route)

    def result(self, handle):
        return handle


class Router:
    def __init__(self, cfg, dataset: Dataset, pools: dict):
        self.cfg = cfg
        self.dataset = dataset
        self.routes = {r.name: r for r in cfg.routing.routes}
        missing = {r.teacher for r in self.routes.values()} - set(pools)
        if missing:
            raise ValueError(f"router: no teacher pool for {sorted(missing)}")
        self.pools = pools
        self.method = make_method(cfg.method)
        self.policy = RoutePolicy({r.name: r.weight for r in cfg.routing.routes}, seed=cfg.job.seed)
        self.data_rng = np.random.Generator(np.random.PCG64([cfg.job.seed, 1]))
        self.next_sample = 0
        self.next_ticket = 0
        # routing.granularity update: one route per optimizer update = per_step consecutive orders
        self.per_update = cfg.learner.world_size * cfg.learner.grad_accum if cfg.routing.granularity == "update" else 0
        self.group_route, self.group_left = "", 0
        self.stats = {"routed_rows": {n: 0 for n in self.routes}, "busy_s": 0.0}
        # Router state as it was before each outstanding ticket was issued: a checkpoint taken
        # while later tickets are still in flight resumes from the first unconsumed one.
        self._before: dict[int, dict] = {}
        self._lock = threading.Lock()  # orders and stats; routing itself runs unlocked

    def set_pool(self, teacher: str, pool) -> None:
        """Swap a teacher's pool (e.g. after scaling its replicas)."""
        self.pools[teacher] = pool

    # ---- work hand-out ------------------------------------------------------------------
    def next_orders(self, n: int, batch_size: int, owed: list[str] = ()) -> list[WorkOrder]:
        """`n` orders in one call (one round trip for the whole hand-out). `owed` routes first:
        replacements for lost or dropped batches of an update that is still short (fresh data,
        the same route, the open group untouched)."""
        owed = list(owed)[:n]
        with self._lock:
            return [self._next_order(batch_size, owed[i] if i < len(owed) else None) for i in range(n)]

    def next_order(self, batch_size: int) -> WorkOrder:
        with self._lock:
            return self._next_order(batch_size)

    def _order_route(self, owed: str | None) -> str | None:
        """The route every item of this order shares (granularity update), or None (per sample)."""
        if owed is not None:
            return owed
        if not self.per_update:
            return None
        if self.group_left == 0:
            self.group_route, self.group_left = self.policy.next(), self.per_update
        self.group_left -= 1
        return self.group_route

    def _next_order(self, batch_size: int, owed: str | None = None) -> WorkOrder:
        groups = self.method.group_size()
        self._before[self.next_ticket] = self.state_dict()
        order_route = self._order_route(owed)
        items = []
        while len(items) < batch_size:
            route = order_route or self.policy.next()
            row = self.dataset.sample(self.routes[route].task, self.data_rng)
            group = self.next_sample
            for _ in range(groups):  # a group: the same prompt rolled out with distinct seeds
                idx = self.next_sample
                self.next_sample += 1
                items.append(WorkItem(idx, route, row, sample_seed(self.cfg.job.seed, idx), group))
        order = WorkOrder(self.next_ticket, tuple(items))
        self.next_ticket += 1
        return order

    # ---- routing ------------------------------------------------------------------------
    def _cfg_scale(self, route: str) -> float:
        r = self.routes[route]
        return self.cfg.method.teacher_cfg_scale if r.cfg_scale is None else r.cfg_scale

    def route(self, rb: pa.RecordBatch) -> pa.RecordBatch:
        """RolloutBatch -> RoutedBatch: fill `target` from the routed teacher (hard routing) or the
        weight-average of every route's teacher (`mix`), tag `teacher_id`, and add the columns the
        method computes once targets exist (flowopd's advantages)."""
        t0 = time.perf_counter()
        routes = scalars(rb, "route")
        for r in set(routes):
            if r not in self.routes:
                raise KeyError(f"router: unknown route {r!r} in batch from {scalars(rb, 'worker_id')[0]} (known: {', '.join(self.routes)})")
        if self.method.routing == "none":  # plain flow matching: the data velocity is already the target
            return rb
        state = rb.column("state").to_numpy_ndarray()
        sigma = rb.column("sigma").to_numpy()
        cond = rb.column("cond").to_numpy_ndarray()
        target = np.zeros_like(state)
        teacher_ids = [""] * len(routes)
        asks = []  # (rows or None for all, weight, pool, handle): every pool asked before any answer
        if self.method.routing == "mix":
            total = sum(r.weight for r in self.routes.values())
            for name, r in self.routes.items():
                if r.weight > 0:
                    pool = self.pools[r.teacher]
                    asks.append((None, r.weight / total, pool, pool.submit(state, sigma, cond, self._cfg_scale(name), name)))
            teacher_ids = ["softmix"] * len(routes)
        else:
            routes_arr = np.asarray(routes)
            for name in sorted(set(routes)):
                sel = np.nonzero(routes_arr == name)[0]
                teacher = self.routes[name].teacher
                pool = self.pools[teacher]
                asks.append((sel, 1.0, pool, pool.submit(state[sel], sigma[sel], cond[sel], self._cfg_scale(name), name)))
                for i in sel:
                    teacher_ids[i] = teacher
        for sel, weight, pool, handle in asks:
            if sel is None:
                target += weight * pool.result(handle)
            else:
                target[sel] = pool.result(handle)
        extra = self.method.annotate({**to_tensors(rb), "target": torch.from_numpy(target)})
        with self._lock:
            for name in routes:
                self.stats["routed_rows"][name] += 1
            self.stats["busy_s"] += time.perf_counter() - t0
        return replace_columns(rb, target=target, teacher_id=teacher_ids, **extra)

    # ---- state --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"policy": self.policy.state_dict(), "data_rng": self.data_rng.bit_generator.state,
                "next_sample": self.next_sample, "next_ticket": self.next_ticket,
                "group_route": self.group_route, "group_left": self.group_left}

    def state_before(self, ticket: int) -> dict:
        """The state to resume from when tickets < `ticket` are consumed and later ones are not."""
        with self._lock:
            return self._before.get(ticket) or self.state_dict()

    def forget_before(self, ticket: int) -> None:
        with self._lock:
            for t in [t for t in self._before if t < ticket]:
                del self._before[t]

    def load_state_dict(self, state: dict) -> None:
        self.policy.load_state_dict(state["policy"])
        self.data_rng.bit_generator.state = state["data_rng"]
        self.next_sample = int(state["next_sample"])
        self.next_ticket = int(state["next_ticket"])
        self.group_route, self.group_left = state.get("group_route", ""), int(state.get("group_left", 0))

    def get_stats(self) -> dict:
        with self._lock:
            return {"routed_rows": dict(self.stats["routed_rows"]), "busy_s": self.stats["busy_s"]}
