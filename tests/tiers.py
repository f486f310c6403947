"""The test tiers and the guard that keeps their marks honest.

Markers (declared in pyproject.toml):
  ray         a Ray cluster: the shared `ray_local` (any test using it is marked so here), or the
              test's own where cluster start-up or job submission is what it tests
  subprocess  another process: the CLI as a user runs it, a Ray head, Prometheus, a process pool
  slow        more than a few seconds: learning runs, the ShapesBench end to end, the tiny
              diffusers pipelines
The fast lane is what none of them marks: collection marks it `fast` (`make test-fast`: `-m fast`).

The guard: a test not marked `ray` cannot call ray.init or leave Ray started, and one marked
neither `ray` nor `subprocess` cannot start a process; either fails the test, naming the mark."""

from __future__ import annotations

import multiprocessing.process
import subprocess
import sys

import pytest

from tests.background import BACKGROUND_FILES

TIERS = ("ray", "subprocess", "slow")


# The files whose tests mostly wait first (deadlines, sleeps, restarts: about one core busy of two,
# measured per test from /proc/stat): the background chain (tests/background.py: about 1.4 cores
# for its first three minutes) fills their idle time, and the files that keep both cores busy (job
# submission, two-rank learners, the diffusers runs) come after it. The background files go last:
# in one process their tests read what the chain wrote; in two lanes (tests/lanes.py) the local
# lane runs their scenarios at its end, beside the Ray lane's lighter middle.
WAITING_FIRST = ("test_faults.py", "test_scale_sim.py", "test_start_faults.py", "test_object_storage.py",
                 "test_graceful_stop.py")


def on_shared_cluster(item) -> bool:
    """The test uses tests/conftest.py's `ray_local`, directly or through a fixture."""
    return "ray_local" in getattr(item, "fixturenames", ())


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(WAITING_FIRST)} | {name: len(WAITING_FIRST) + 1 for name in BACKGROUND_FILES}
    items.sort(key=lambda item: rank.get(item.path.name, len(WAITING_FIRST)))  # stable: a file keeps its order
    for item in items:
        if on_shared_cluster(item):
            item.add_marker(pytest.mark.ray)
        tiers = [m for m in TIERS if item.get_closest_marker(m)]
        if item.get_closest_marker("fast") and tiers:
            raise pytest.UsageError(f"{item.nodeid}: marked fast and {tiers[0]}; fast is set by tests/tiers.py")
        if not tiers:
            item.add_marker(pytest.mark.fast)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call":
        item.tier_call_failed = report.failed  # the guard's teardown then says nothing twice
    return report


@pytest.fixture(autouse=True)
def tier_guard(request, monkeypatch):
    marks = {m.name for m in request.node.iter_markers()}
    seen: list[str] = []

    def refuse(describe, mark):
        def call(*args, **kwargs):
            seen.append(f"{describe(*args)} but is not marked {mark}")
            pytest.fail(f"{request.node.nodeid} {seen[-1]} (tests/tiers.py)", pytrace=False)

        return call

    ray = sys.modules.get("ray")
    ray_was_up = ray is not None and ray.is_initialized()
    if "ray" not in marks:
        if ray is not None:
            monkeypatch.setattr(ray, "init", refuse(lambda *a: "calls ray.init", "ray"))
        if "subprocess" not in marks:
            monkeypatch.setattr(subprocess.Popen, "_execute_child",
                                refuse(lambda self, args, *a: f"starts a process {args!r:.120}", "subprocess"))
            monkeypatch.setattr(multiprocessing.process.BaseProcess, "start",
                                refuse(lambda self: f"starts a process ({self.name})", "subprocess"))
    yield
    ray = sys.modules.get("ray")
    if "ray" not in marks and not ray_was_up and ray is not None and ray.is_initialized():
        ray.shutdown()
        seen.append("left Ray started but is not marked ray")
    if seen and not getattr(request.node, "tier_call_failed", False):  # swallowed, or after the call
        pytest.fail(f"{request.node.nodeid} {'; '.join(seen)} (tests/tiers.py)", pytrace=False)
