"""The scorer's several-batch path (`Scorer.route_many`, what one scorer call of the Ray runtime
runs): the same targets as one batch at a time, one teacher ask per route, and a non-finite
answer that costs only its own batch."""

import numpy as np
import pyarrow as pa

from danceopd.batch import replace_columns
from rollout_workers.worker import RolloutWorker
from services.loop import make_router
from services.runtime.local import local_scorer
from tests.conftest import cfg_for


def _batches(toy_raw, tmp_path, n: int = 3):
    cfg = cfg_for(toy_raw, tmp_path, "scoring", routing__granularity="sample")
    router, worker = make_router(cfg, 1), RolloutWorker(cfg)
    return cfg, [worker.rollout(order) for order in router.next_orders(n, 8, [])]


def _queries(scorer) -> int:
    return sum(pool.teacher.stats["queries"] for pool in scorer.pools.values())


def test_several_batches_are_scored_as_one_at_a_time_with_one_ask_per_route(toy_raw, tmp_path):
    cfg, rbs = _batches(toy_raw, tmp_path)
    alone, together = local_scorer(cfg), local_scorer(cfg)
    one = [alone.route(rb) for rb in rbs]
    many = together.route_many(rbs)
    routes = {r for rb in rbs for r in rb.column("route").to_pylist()}
    assert len(routes) > 1 and _queries(together) == len(routes) < _queries(alone)
    for a, b in zip(one, many):
        assert a.schema == b.schema and a.column("ticket").equals(b.column("ticket"))
        np.testing.assert_allclose(b.column("target").to_numpy_ndarray(), a.column("target").to_numpy_ndarray(),
                                   rtol=1e-5, atol=1e-6)
        assert a.column("teacher_id").equals(b.column("teacher_id"))


def test_a_nonfinite_answer_costs_only_its_own_batch(toy_raw, tmp_path):
    from router.scoring import NonFiniteAnswer

    cfg, rbs = _batches(toy_raw, tmp_path)
    state = rbs[1].column("state").to_numpy_ndarray().copy()
    state[0] = np.nan  # the teacher answers NaN for that row
    rbs[1] = replace_columns(rbs[1], state=state)
    out = local_scorer(cfg).route_many(rbs)
    assert isinstance(out[1], NonFiniteAnswer)
    assert all(isinstance(out[i], pa.RecordBatch) for i in (0, 2))
