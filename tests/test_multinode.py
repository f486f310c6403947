"""The job on a simulated multi-node cluster (tests/multinode.py): every role on its node group,
and a whole node lost mid-run per group. One cluster serves every scenario; it runs in a
process of its own, so this session's shared `ray_local` is left alone."""

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.multinode import GROUPS
from tests.test_ray_runtime import assert_accounting_closes

pytestmark = [pytest.mark.ray, pytest.mark.subprocess, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ("placement", "rollout_node", "router_node", "teacher_node", "learner_node")
# Where each role must run: its group's node (the router's scorer requests no group: any worker
# node, never the head, whose num_cpus is 0).
HOME = {"rollout": {"rollout"}, "teacher": {"teacher"}, "learner": {"learner"}, "evaluator": {"teacher"},
        "router": set(GROUPS)}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("multinode") / "results.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "tests.multinode", str(out), *SCENARIOS], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert out.exists(), f"the scenarios wrote nothing (exit {proc.returncode}): {proc.stderr[-3000:]}"
    return json.loads(out.read_text())


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


def test_a_lost_rollout_node_costs_its_tickets_and_the_job_goes_on(results):
    res = results["rollout_node"]
    summary = finished(res, 16)
    assert_at_home(res)
    assert summary["accounting"]["lost"] > 0  # the node's batches were lost and re-issued
    assert summary["restarts"]["rollout"] >= 1
    assert all(n == 0 for r, n in summary["restarts"].items() if r not in ("rollout", "router")), summary["restarts"]


def test_a_lost_node_with_the_router_rebuilds_both(results):
    res = results["router_node"]
    summary = finished(res, 16)
    assert_at_home(res)
    assert summary["restarts"]["router"] == 1 and summary["restarts"]["rollout"] >= 1, summary["restarts"]
    assert summary["restarts"]["teacher"] == 0 and summary["restarts"].get("learner", 0) == 0


def test_a_lost_teacher_node_rebuilds_its_replicas(results):
    res = results["teacher_node"]
    summary = finished(res, 16)
    assert_at_home(res)
    assert summary["restarts"]["teacher"] >= 1
    assert summary["restarts"]["rollout"] == 0 and summary["restarts"]["router"] == 0, summary["restarts"]


def test_a_lost_learner_node_fails_naming_the_rank_and_resume_finishes(results):
    res = results["learner_node"]
    assert res["outcome"] == "failed" and "learner learner-" in res["error"], res.get("error")
    assert res["fault"]["until_end_s"] < 60
    assert res["resumed_from"], "no checkpoint to resume from"
    finished(res["resumed"], 16)
    assert_at_home(res["resumed"])
