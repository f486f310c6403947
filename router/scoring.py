"""Scoring: each RolloutBatch against the teacher pool of each row's route -> RoutedBatch.

Stateless (the router's state — route draws, data cursor, tickets — lives in the driver's
`Router`), so a scorer that dies is restarted like a teacher replica and the batches it was
scoring are scored again. A pool has two calls, `submit(state, sigma, cond, cfg_scale, route) ->
handle` and `result(handle) -> ndarray`, so all the routes of one batch are asked before any
answer is awaited (their pools work concurrently): `InProcessPool` in local mode, a
load-balanced group of teacher actors in Ray mode. `route` is thread-safe: the Ray scorer
scores several batches at once.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pyarrow as pa
import torch

from danceopd.batch import nonfinite, replace_columns, scalars, to_tensors
from danceopd.methods import make_method


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


class NonFiniteAnswer(ValueError):
    """A batch whose teacher answer or routed target holds NaN/Inf: it never reaches the replay
    queue (the loop drops it, counts it and re-owes its route)."""

    def __init__(self, teacher: str, route: str, what: str):
        super().__init__(f"teacher {teacher} (route {route}): NaN/Inf in the {what}")
        self.teacher, self.route, self.what = teacher, route, what


class InProcessPool:
    """A teacher in this process: it answers at submit time."""

    def __init__(self, teacher):
        self.teacher = teacher

    def submit(self, state, sigma, cond, cfg_scale: float, route: str = ""):
        return self.teacher.query(state, sigma, cond, cfg_scale, route)

    def result(self, handle):
        return handle


class MergedAsks:
    """The asks several batches make of one pool, sent as one ask per (CFG scale, route): Ray's
    cost per call is paid once, and the teacher takes the rows in one forward pass (a row's
    answer does not depend on the rows beside it). `submit` records, `send` sends, `result`
    slices a batch's rows out of the shared answer."""

    def __init__(self, pool):
        self.pool = pool
        self.waiting: dict[tuple, list] = {}  # (cfg_scale, route) -> [(state, sigma, cond)], in ask order
        self.sent: dict[tuple, object] = {}
        self.answers: dict[tuple, np.ndarray] = {}

    def submit(self, state, sigma, cond, cfg_scale: float, route: str = ""):
        key = (cfg_scale, route)
        parts = self.waiting.setdefault(key, [])
        start = sum(len(p[0]) for p in parts)
        parts.append((state, sigma, cond))
        return key, start, start + len(state)

    def send(self) -> None:
        for key, parts in self.waiting.items():
            self.sent[key] = self.pool.submit(*(np.concatenate([p[i] for p in parts]) for i in range(3)), *key)
        self.waiting = {}

    def result(self, handle) -> np.ndarray:
        key, start, end = handle
        if key not in self.answers:
            self.answers[key] = self.pool.result(self.sent[key])
        return self.answers[key][start:end]


class Scorer:
    """`routes`: the job's RouteConfigs; `method`: its MethodConfig; `pools`: teacher -> pool."""

    def __init__(self, routes, method, pools: dict):
        self.routes = {r.name: r for r in routes}
        missing = {r.teacher for r in self.routes.values()} - set(pools)
        if missing:
            raise ValueError(f"router: no teacher pool for {sorted(missing)}")
        self.pools = pools
        self.teacher_cfg_scale = method.teacher_cfg_scale
        self.method = make_method(method)
        self.stats = {"routed_rows": {n: 0 for n in self.routes}, "batches": 0, "busy_s": 0.0}
        self._lock = threading.Lock()  # stats; routing itself runs unlocked

    def set_pool(self, teacher: str, pool) -> None:
        """Swap a teacher's pool (e.g. after scaling its replicas)."""
        self.pools[teacher] = pool

    def _cfg_scale(self, route: str) -> float:
        r = self.routes[route]
        return self.teacher_cfg_scale if r.cfg_scale is None else r.cfg_scale

    def route(self, rb: pa.RecordBatch) -> pa.RecordBatch:
        """RolloutBatch -> RoutedBatch: fill `target` from the routed teacher (hard routing) or the
        weight-average of every route's teacher (`mix`), tag `teacher_id`, and add the columns the
        method computes once targets exist (flowopd's advantages). A NaN/Inf answer or routed
        column raises `NonFiniteAnswer` naming the teacher and route."""
        return self.finish(rb, self.ask(rb))

    def route_many(self, rbs: list[pa.RecordBatch]) -> list:
        """`route` for several batches (one rollout call's): each teacher is asked once per route
        for all their rows (`MergedAsks`). Each item is a RoutedBatch, or the `NonFiniteAnswer`
        that batch raised; any other error fails them all."""
        if len(rbs) == 1:
            asks = [self.ask(rbs[0])]
        else:
            merged = {t: MergedAsks(p) for t, p in self.pools.items()}
            asks = [self.ask(rb, merged) for rb in rbs]
            for m in merged.values():
                m.send()
        out = []
        for rb, asked in zip(rbs, asks):
            try:
                out.append(self.finish(rb, asked))
            except NonFiniteAnswer as e:
                out.append(e)
        return out

    def ask(self, rb: pa.RecordBatch, pools: dict | None = None) -> tuple:
        """The first half of `route`: every pool the batch needs is asked (no answer awaited), so
        several batches' asks can be out at once. Returns what `finish` needs."""
        pools = self.pools if pools is None else pools
        t0 = time.perf_counter()
        routes = scalars(rb, "route")
        for r in set(routes):
            if r not in self.routes:
                raise KeyError(f"router: unknown route {r!r} in batch from {scalars(rb, 'worker_id')[0]} (known: {', '.join(self.routes)})")
        if self.method.routing == "none":  # plain flow matching: the data velocity is already the target
            return t0, routes, None, None, None
        state = rb.column("state").to_numpy_ndarray()
        sigma = rb.column("sigma").to_numpy()
        cond = rb.column("cond").to_numpy_ndarray()
        teacher_ids = [""] * len(routes)
        asks = []  # (route, rows or None for all, weight, pool, handle): every pool asked before any answer
        if self.method.routing == "mix":
            total = sum(r.weight for r in self.routes.values())
            for name, r in self.routes.items():
                if r.weight > 0:
                    pool = pools[r.teacher]
                    asks.append((name, None, r.weight / total, pool, pool.submit(state, sigma, cond, self._cfg_scale(name), name)))
            teacher_ids = ["softmix"] * len(routes)
        else:
            routes_arr = np.asarray(routes)
            for name in sorted(set(routes)):
                sel = np.nonzero(routes_arr == name)[0]
                teacher = self.routes[name].teacher
                pool = pools[teacher]
                asks.append((name, sel, 1.0, pool, pool.submit(state[sel], sigma[sel], cond[sel], self._cfg_scale(name), name)))
                for i in sel:
                    teacher_ids[i] = teacher
        return t0, routes, np.zeros_like(state), teacher_ids, asks

    def finish(self, rb: pa.RecordBatch, asked: tuple) -> pa.RecordBatch:
        """The second half of `route`: await the answers of `ask` and build the RoutedBatch."""
        t0, routes, target, teacher_ids, asks = asked
        if asks is None:
            return rb
        bad = None  # (teacher, route) of the first non-finite answer; every answer is awaited first
        for name, sel, weight, pool, handle in asks:
            answer = pool.result(handle)
            if bad is None and nonfinite(answer=answer):
                bad = (self.routes[name].teacher, name)
            if sel is None:
                target += weight * answer
            else:
                target[sel] = answer
        if bad:
            raise NonFiniteAnswer(*bad, "answer")
        extra = self.method.annotate({**to_tensors(rb), "target": torch.from_numpy(target)})
        what = nonfinite(target=target, **extra)
        if what:
            raise NonFiniteAnswer(self.routes[routes[0]].teacher, routes[0], f"routed {what}")
        with self._lock:
            for name in routes:
                self.stats["routed_rows"][name] += 1
            self.stats["batches"] += 1
            self.stats["busy_s"] += time.perf_counter() - t0
        return replace_columns(rb, target=target, teacher_id=teacher_ids, **extra)

    def get_stats(self) -> dict:
        with self._lock:
            return {"routed_rows": dict(self.stats["routed_rows"]), "busy_s": self.stats["busy_s"]}
