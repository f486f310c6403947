"""The job on a simulated multi-node cluster (tests/multinode.py): every role on its node group,
and a whole node lost mid-run per group. One cluster serves every scenario; it runs in a
process of its own, so this session's shared `ray_local` is left alone, started when collection
ends (tests/background.py) so that its minutes of waiting overlap the other files."""

import collections
from pathlib import Path

import pytest

from tests.background import scenario_result
from tests.test_faults import report
from tests.test_ray_runtime import assert_accounting_closes

pytestmark = [pytest.mark.ray, pytest.mark.subprocess, pytest.mark.slow]

# Where each role must run: its group's node (the router's scorer by its label selector, as in
# the cluster configs; never the head, whose num_cpus is 0).
HOME = {"rollout": {"rollout"}, "teacher": {"teacher"}, "learner": {"learner"}, "evaluator": {"teacher"},
        "router": {"rollout"}, "cache": {"rollout"}, "registry": {"head"}}  # the driver's node


@pytest.fixture(scope="module")
def results(request, tmp_path_factory):
    return scenario_result(request, tmp_path_factory, "test_multinode.py", "results", timeout_s=900)


def finished(res: dict, steps: int) -> dict:
    assert res["outcome"] == "finished", res.get("error")
    summary = res["summary"]
    assert summary["steps"] == steps
    assert_accounting_closes(summary["accounting"])
    return summary


def assert_at_home(res: dict) -> None:
    where = collections.defaultdict(set)
    for p in res["placements"]:
        where[p["role"]].add(p["node"].split(":")[0])
    for role, nodes in where.items():
        assert nodes <= HOME[role] | {"gone"}, f"{role} ran on {sorted(nodes)}"
    assert {"rollout", "teacher", "learner", "router"} <= set(where)


def test_every_role_runs_on_its_node_group(results):
    res = results["placement"]
    finished(res, 12)
    assert_at_home(res)
    assert sum(p["role"] == "learner" for p in res["placements"]) == 2
    assert {"evaluator", "registry"} <= {p["role"] for p in res["placements"]}  # where HOME says


def test_a_lost_rollout_node_with_the_router_costs_its_tickets_and_the_job_goes_on(results):
    """The node held the rollout workers and the router's scorer (pinned to the rollout group):
    the workers' tickets are lost and re-issued, the batches being scored wait for the new
    scorer, and every replacement waits for a node of the group, then joins."""
    res = results["rollout_node"]
    summary = finished(res, 16)
    assert_at_home(res)
    assert summary["accounting"]["lost"] > 0  # the node's batches were lost and re-issued
    restarts = summary["restarts"]
    assert restarts["rollout"] == 2 and restarts["router"] == 1, restarts  # one per member on the node
    assert restarts["teacher"] == 0, restarts
    # Two workers and the scorer died with the node; their replacements ran on the returned node.
    lost = collections.Counter(p["role"] for p in res["placements"] if p["node"].startswith("gone"))
    assert lost == {"rollout": 2, "router": 1}, lost
    assert res["fault"]["recovered_s"] is not None
    report("rollout node (2 workers + router)", role="node", fault="node removed", recovered_s=res["fault"]["recovered_s"],
           lost_samples=summary["accounting"]["lost"], back_after_s=res["fault"]["back_after_s"], outcome="finished")


def test_a_lost_teacher_node_rebuilds_its_replicas(results):
    res = results["teacher_node"]
    summary = finished(res, 16)
    assert_at_home(res)
    assert summary["restarts"]["teacher"] == 2  # each teacher's one replica was there
    assert summary["restarts"]["rollout"] == 0 and summary["restarts"]["router"] == 0, summary["restarts"]
    assert summary["accounting"]["lost"] > 0  # batches being scored on the node were re-issued
    assert res["fault"]["recovered_s"] is not None
    report("teacher node (2 replicas + evaluator)", role="node", fault="node removed", recovered_s=res["fault"]["recovered_s"],
           lost_samples=summary["accounting"]["lost"], back_after_s=res["fault"]["back_after_s"], outcome="finished")


def test_a_lost_learner_node_fails_naming_the_rank_and_resume_finishes(results):
    res = results["learner_node"]
    assert res["outcome"] == "failed" and res["error"].startswith("learner learner-"), res.get("error")
    assert "--resume auto" in res["error"]
    assert res["fault"]["until_end_s"] < 30
    assert res["resumed_from"], "no checkpoint to resume from"
    resumed = finished(res["resumed"], 16)
    assert_at_home(res["resumed"])
    # It re-issued exactly what the checkpoint had not consumed: (16 - its step) steps' samples.
    step = int(Path(res["resumed_from"]).name.split("-")[1])
    assert resumed["accounting"]["consumed"] == (16 - step) * 2 * 8
    report("learner node (2 ranks)", role="node", fault="node removed", failed_after_s=res["fault"]["until_end_s"],
           resume_to_end_s=res["resumed"]["wall_s"], outcome="failed, resumed")


def test_the_condition_cache_is_built_on_a_worker_node_and_the_driver_holds_no_model(results):
    """sd3 (a latent backend) from the driver's side: the missing cache is built by an actor with
    the rollout role's placement, on the rollout node, with progress lines here; once current,
    asking again is a no-op that starts nothing; and the driver never instantiates a diffusers or
    transformers model (validation's weightless meta skeleton aside), evaluator included."""
    res = results["sd3_cache"]
    finished(res, 2)
    assert_at_home(res)
    assert [p["node"] for p in res["placements"] if p["role"] == "cache"] == ["rollout"]
    assert "evaluator" in {p["role"] for p in res["placements"]}
    (built,) = [ln for ln in res["cache_lines"] if ln.startswith("condition cache built on ")]
    assert f"(node {res['nodes']['rollout'][:8]})" in built, res["cache_lines"]
    assert res["cache_lines"][1].startswith("building the condition cache on "), res["cache_lines"]
    assert res["cache_before"] == [] and len(res["cache_after"]) == 1 and res["cache_after"][0] in built
    assert res["again_built"] is False and res["again_actors"] == 0  # current: no actor, no encoder
    assert res["driver_models_made"] == [], res["driver_models_made"]
    assert res["driver_models_live"] == [], res["driver_models_live"]
    assert res["validate_models"] and all(devices == ["meta"] for _, devices in res["validate_models"])


@pytest.fixture(scope="module")
def autoscaled(request, tmp_path_factory):
    return scenario_result(request, tmp_path_factory, "test_multinode.py", "autoscale", timeout_s=600)["autoscale"]


def test_scaling_grows_and_shrinks_the_cluster_through_the_autoscaler(autoscaled):
    """Ray's autoscaler (fake nodes: rollout type min 1, max 3) adds nodes for the pending
    workers of `scale --rollout-workers 6` and removes them once `scale` back to 2 left them idle;
    the loop trains throughout and the accounting closes."""
    res = autoscaled
    assert res["outcome"] == "finished", res.get("error")
    grown, shrunk = res["fault"]["trace"]
    assert grown["workers"] == 6 and grown["nodes"] == 3, grown  # 2 workers per 2-CPU node
    assert shrunk["workers"] == 2 and shrunk["nodes"] == 1, shrunk  # the idle nodes went
    assert shrunk["step"] > grown["step"] > res["fault"]["at_step"]  # training went on throughout
    assert_accounting_closes(res["summary"]["accounting"])
    assert res["summary"]["restarts"] == {"rollout": 0, "teacher": 0, "router": 0}
