"""A routed batch is stored once in Ray's object store, by the scorer that made it: the driver
queues its ref and the learner ranks fetch that same object (no copy through the driver or a
queue actor). Measured on the raylet's plasma statistics with batches large enough for plasma
(Ray keeps objects under 100 KiB in the owner's memory instead)."""

import re
import time

import pytest

from services.loop import TrainLoop
from tests.conftest import cfg_for

pytestmark = pytest.mark.ray


def plasma(ray) -> tuple[int, int]:
    """(MiB used, objects) of the local object store, as the raylet reports them."""
    from ray._private.internal_api import memory_summary

    text = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
    m = re.search(r"Plasma memory usage (\d+) MiB, (\d+) objects", text)
    return int(m.group(1)), int(m.group(2))


def test_a_routed_batch_is_one_object_and_the_learner_reads_it_in_place(ray_local, sim_raw, tmp_path):
    ray = ray_local
    cfg = cfg_for(sim_raw, tmp_path, "bytes", backend__dim=4096, backend__hidden=8, backend__rollout_latency_s=0.0,
                  backend__teacher_latency_s=0.0, backend__learner_latency_s=1.0, rollout__workers=2,
                  rollout__batch_size=32, learner__grad_accum=2, learner__steps=2, sync__max_policy_lag=1,
                  replay__capacity=4, eval__enabled=False, checkpoint__every=0)
    base_mib, base_objects = plasma(ray)
    loop = TrainLoop(cfg, "ray", show_progress=False)
    try:
        deadline = time.time() + 120
        while (loop.pipe.held() < cfg.replay.capacity or loop.pipe.in_flight) and time.time() < deadline:
            loop.issue()
            loop.collect(timeout=0.05)
        queued = list(loop.pipe.queued.values())
        assert len(queued) == cfg.replay.capacity and not loop.pipe.ready and not loop.pipe.in_flight
        handles = [q.handle for q in queued]
        assert all(isinstance(h, ray.ObjectRef) for h in handles)
        # Locations reach the GCS asynchronously: wait until each batch has one.
        t0 = time.time()
        while True:
            locations = ray.experimental.get_object_locations(handles)
            if all(locations[h]["node_ids"] for h in handles) or time.time() - t0 > 10:
                break
            time.sleep(0.1)
        rows = 0
        for h in handles:
            rb = ray.get(h)
            rows += rb.num_rows
            where = locations[h]
            assert len(where["node_ids"]) == 1  # one copy, on the scorer's node
            assert rb.nbytes <= where["object_size"] < rb.nbytes * 1.05 + 65536  # the Arrow batch itself
        stored = sum(locations[h]["object_size"] for h in handles)
        time.sleep(1.0)  # rollout batches that were scored are released by now
        mib, objects = plasma(ray)
        # The queued batches, plus the weights the workers were given (their export): nothing else.
        objects, mib = objects - base_objects, mib - base_mib  # what earlier tests left in the shared store
        assert objects <= len(handles) + 2, (objects, len(handles))
        assert stored / 2**20 - 1 <= mib <= stored / 2**20 + 2, (mib, stored)
        # A step: its ranks fetch the refs themselves; the store holds no second copy meanwhile.
        loop.learn()
        assert loop.learner.busy
        time.sleep(0.5)
        during_mib, during_objects = plasma(ray)
        during_mib, during_objects = during_mib - base_mib, during_objects - base_objects
        assert during_objects <= objects and during_mib <= mib, ((during_mib, during_objects), (mib, objects))
        print(f"object-store bytes per routed row: {stored / rows:.0f} "
              f"(Arrow batch bytes per row: {sum(ray.get(h).nbytes for h in handles) / rows:.0f})")
    finally:
        loop.shutdown()
