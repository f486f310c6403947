"""Scaling past what the cluster can provide never blocks the loop or kills the job: members
the cluster cannot place now are pending (in /status and metrics), time out and are removed
with their placement groups; requests the cluster can never satisfy are refused at once."""

import threading
import time

import pytest

from services.loop import TrainLoop
from tests.conftest import cfg_for


def test_scale_beyond_capacity_is_pending_then_removed_while_training_goes_on(ray_local, toy_raw, tmp_path):
    import ray
    from ray.util.placement_group import placement_group_table

    # Steps enough for the whole story; the job is stopped once the pending worker is removed and
    # a few more steps are taken (it used to run all 600: about half the test's time).
    cfg = cfg_for(toy_raw, tmp_path, "pending", learner__steps=600, rollout__num_cpus=2.0, deadlines__placement_s=3.0,
                  checkpoint__every=0, control__metrics_port=0)
    free = ray.available_resources().get("CPU", 0)
    loop = TrainLoop(cfg, "ray", show_progress=False)
    # Take all but what the job holds, so a second 2-CPU worker fits the cluster but not now.
    hog = ray.util.placement_group([{"CPU": max(free - 2.0 - 1.4, 0.5)}])
    ray.get(hog.ready(), timeout=60)
    seen = {}

    def scale_later():
        while loop.step < 3:
            time.sleep(0.01)
        seen["answer"] = loop.request_scale(rollout_workers=2)
        t0 = time.time()
        while time.time() - t0 < 30:
            pending = loop.fleet.rollout.pending
            if pending:
                seen["pg"] = next(iter(pending.values())).pg.id.hex()
                seen["step_while_pending"] = loop.step
                break
            time.sleep(0.01)
        while loop.fleet.rollout.pending:
            seen["status_pending"] = max(seen.get("status_pending", 0), loop.status()["pending"]["rollout"])
            time.sleep(0.01)
        seen["step_after"] = loop.step
        while loop.step < seen["step_after"] + 5:  # training goes on without the removed member
            time.sleep(0.01)
        loop.request_stop("test")

    t = threading.Thread(target=scale_later, daemon=True)
    t.start()
    try:
        t_run = time.perf_counter()
        summary = loop.run()
        wall = time.perf_counter() - t_run
        gave_up = dict(loop.fleet.gave_up)
    finally:
        loop.shutdown()
        ray.util.remove_placement_group(hog)
        t.join(timeout=5)
    assert seen["answer"]["accepted"]
    assert "pg" in seen, seen
    assert seen["status_pending"] == 1, seen
    assert seen["step_after"] > seen["step_while_pending"]  # the loop kept stepping while it waited
    assert seen["step_after"] + 5 <= summary["steps"] < cfg.learner.steps
    assert gave_up == {"rollout": 1}
    assert placement_group_table()[seen["pg"]]["state"] == "REMOVED"  # nothing left reserved
    assert summary["accounting"]["consumed"] == summary["steps"] * cfg.rollout.batch_size
    assert wall < 120


def report_node_groups(groups: list[tuple[str, dict, int]]) -> None:
    """What an autoscaler reports to the GCS (Ray's own record, read back by the fleet)."""
    import ray
    from ray.core.generated import autoscaler_pb2

    config = autoscaler_pb2.ClusterConfig()
    for name, resources, most in groups:
        g = config.node_group_configs.add(name=name, max_count=most)
        g.resources.update(resources)
    ray._private.worker.global_worker.gcs_client.report_cluster_config(config.SerializeToString())


@pytest.mark.ray
def test_scale_requests_the_cluster_can_never_hold_are_refused(ray_local, toy_raw, tmp_path):
    cfg = cfg_for(toy_raw, tmp_path, "refuse", learner__steps=2, rollout__num_cpus=2.0, rollout__max_workers=64,
                  control__metrics_port=0)
    loop = TrainLoop(cfg, "ray", show_progress=False)
    try:
        with pytest.raises(ValueError, match=r"above rollout.max_workers=64"):
            loop.request_scale(rollout_workers=65)
        with pytest.raises(ValueError, match=r"^teachers.t2i: 17 is above teachers\[t2i_teacher\].max_replicas=16"):
            loop.request_scale(teachers={"t2i": 17})
        # No autoscaler: the nodes alive are all there will be (the session's cluster: 8 CPUs).
        with pytest.raises(ValueError, match=r"^rollout_workers: 5 is more than the 1 node\(s\) of this cluster "
                                             r"\(no autoscaler\) can ever hold \(4\)"):
            loop.request_scale(rollout_workers=5)
        loop.request_scale(rollout_workers=4)  # pending at worst, never refused
        # An autoscaler that reported its node groups: each group at its most nodes bounds a role.
        loop.fleet.autoscaled = lambda: True
        try:
            report_node_groups([("rollout", {"CPU": 4, "memory": 8 * 1024**3}, 3), ("teacher", {"CPU": 1, "GPU": 1}, 2)])
            with pytest.raises(ValueError, match=r"^rollout_workers: 7 is more than the autoscaler's node groups at "
                                                 r"their most \(rollout x3, teacher x2\) can ever hold \(6\)"):
                loop.request_scale(rollout_workers=7)
            loop.request_scale(teachers={"t2i": 16})  # 0.1 CPU replicas: 10 a CPU, on either group
            report_node_groups([("rollout", {"CPU": 1}, 1), ("teacher", {"GPU": 1}, 4)])  # Ray counts whole units
            with pytest.raises(ValueError, match=r"^teachers.t2i: 16 is more than .* \(10\)"):
                loop.request_scale(teachers={"t2i": 16})
            report_node_groups([("rollout", {"CPU": 4}, -1)])  # a group without a bound: none known
            loop.request_scale(rollout_workers=64)
        finally:
            report_node_groups([])
        assert loop.commands.qsize() == 3  # what was accepted, and nothing else
    finally:
        loop.shutdown()
    # A job larger than the reported groups at their most is refused before any actor starts.
    from danceopd.config import ConfigError

    report_node_groups([("rollout", {"CPU": 4}, 2)])
    try:
        big = cfg_for(toy_raw, tmp_path, "big", rollout__num_cpus=2.0, rollout__workers=5, autoscale__cluster_autoscaler="on",
                      control__metrics_port=0)
        with pytest.raises(ConfigError, match=r"^num_cpus: the job needs .*; the cluster has 8 CPU"):
            TrainLoop(big, "ray", show_progress=False)
    finally:
        report_node_groups([])


def test_a_job_the_cluster_can_never_place_is_refused_naming_the_field(toy_raw, tmp_path):
    from danceopd.config import ConfigError
    from services.runtime.placement import check_capacity

    cpu_nodes = [{"CPU": 4.0}, {"CPU": 4.0}]
    check_capacity(cfg_for(toy_raw, tmp_path, "ok"), cpu_nodes)
    with pytest.raises(ConfigError, match=r"^rollout: one member needs 1 CPU, 1 GPU; no node"):
        check_capacity(cfg_for(toy_raw, tmp_path, "gpu", rollout__num_gpus=1.0), cpu_nodes)
    with pytest.raises(ConfigError, match=r"^learner: one member needs 6 CPU"):
        check_capacity(cfg_for(toy_raw, tmp_path, "big", learner__num_cpus=6.0), cpu_nodes)
    with pytest.raises(ConfigError, match=r"^num_cpus: the job needs 13.4 CPU \(rollout 3x4.*the cluster has 8"):
        check_capacity(cfg_for(toy_raw, tmp_path, "many", rollout__workers=3, rollout__num_cpus=4.0), cpu_nodes)
    # Custom resources (a KubeRay group's marker) count like CPUs: per member and in total.
    grouped = [{"CPU": 4.0, "rollout": 2.0}, {"CPU": 4.0}]
    check_capacity(cfg_for(toy_raw, tmp_path, "grp", rollout__workers=2, rollout__resources={"rollout": 1.0}), grouped)
    with pytest.raises(ConfigError, match=r"^teachers.0: one member needs 0.1 CPU, 1 teacher; no node"):
        teacher_grp = {**toy_raw, "teachers": [{**toy_raw["teachers"][0], "resources": {"teacher": 1.0}}, *toy_raw["teachers"][1:]]}
        check_capacity(cfg_for(teacher_grp, tmp_path, "nogrp"), grouped)
    with pytest.raises(ConfigError, match=r"^resources.rollout: the job needs 3 rollout \(rollout 3x1 rollout\); the cluster has 2"):
        check_capacity(cfg_for(toy_raw, tmp_path, "grp3", rollout__workers=3, rollout__resources={"rollout": 1.0}), grouped)


@pytest.mark.ray
def test_train_on_a_cluster_without_the_gpus_fails_before_any_actor(ray_local, toy_raw, tmp_path):
    from danceopd.config import ConfigError

    cfg = cfg_for(toy_raw, tmp_path, "gpu", rollout__num_gpus=1.0, control__metrics_port=0)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"^rollout: one member needs"):
        TrainLoop(cfg, "ray", show_progress=False)
    assert time.perf_counter() - t0 < 30


@pytest.mark.ray
def test_teacher_replicas_beyond_capacity_are_pending_and_stop_is_bounded(ray_local, sim_raw, tmp_path):
    """`scale --teachers` past what the cluster holds now: the new replicas wait in their
    placement groups (shown in /status) while steps keep coming, and /stop ends the job in
    bounded time, leaving nothing reserved."""
    from ray.util.placement_group import placement_group_table

    teachers = [dict(t, num_cpus=2.0) if t["name"] == "t2i_teacher" else t for t in sim_raw["teachers"]]
    cfg = cfg_for({**sim_raw, "teachers": teachers}, tmp_path, "teachers-pending", backend__rollout_latency_s=0.05,
                  learner__steps=100000, checkpoint__every=0, eval__enabled=False)
    loop = TrainLoop(cfg, "ray", show_progress=False)
    seen = {}

    def scale_then_stop():
        while loop.step < 2:
            time.sleep(0.01)
        loop.request_scale(teachers={"t2i": 4})  # 8 CPUs hold 4 alone, not next to the rest of the job
        while not loop.fleet.teachers["t2i_teacher"].pending:
            time.sleep(0.01)
        seen["pgs"] = [p.pg.id.hex() for p in loop.fleet.teachers["t2i_teacher"].pending.values()]
        step = seen["step"] = loop.step
        while loop.step < step + 5:
            time.sleep(0.01)
        seen["status_pending"] = loop.status()["pending"]["teacher"]
        seen["t_stop"] = time.perf_counter()
        loop.request_stop("test")

    t = threading.Thread(target=scale_then_stop, daemon=True)
    t.start()
    try:
        summary = loop.run()
        stopped_in = time.perf_counter() - seen["t_stop"]
    finally:
        loop.shutdown()
        t.join(timeout=5)
    assert seen["status_pending"] >= 1, seen
    assert summary["steps"] >= seen["step"] + 5  # the loop stepped while they waited
    assert stopped_in < cfg.checkpoint.stop_grace_s + 10, stopped_in
    assert all(placement_group_table()[pg]["state"] == "REMOVED" for pg in seen["pgs"])
    from tests.test_ray_runtime import assert_accounting_closes

    assert_accounting_closes(summary["accounting"])
