"""Two lanes under pytest-xdist (`pytest -n 2 --lanes`): every test on the shared Ray cluster in
one worker, in order, and the rest in the other: the fast lane, the local learning runs, the CLI
and servers in processes of their own, then the tests whose Ray cluster is their own (the jobs
tests' Ray head, a Ray-mode driver, the multi-node scenarios last).

Why not more workers: each starts a shared cluster of its own, and on two cores their raylets
miss Ray's fixed 30 s start-up registration (three workers took 31.8 min). The other lane fills
the cores the cluster lane leaves idle while it waits (start-ups, deadlines, sleeps), with at most
one more cluster at a time.

Why not xdist's own `--dist loadgroup`: it reads its group from a suffix it writes into the node
id, which pytest 9.2 no longer lets it write (pytest-xdist#1386): the tests were spread as if
ungrouped. Here each worker writes the lane of every test it collected into a directory the
controller names, and the controller's scheduler reads it: one scope per lane, so each lane is a
single work unit that one worker runs start to end.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.background import in_xdist_worker
from tests.tiers import on_shared_cluster

DIR_ENV = "DANCEOPD_LANES_DIR"
KEY = pytest.StashKey[Path]()  # the controller's directory of the workers' lanes
CLUSTER, LOCAL = "cluster", "local"


def lane_of(item) -> str:
    """The shared cluster's tests in one lane; the rest, those with a cluster of their own in
    another process (a Ray head, a Ray-mode driver, the multi-node scenarios, which
    tests/tiers.py puts last) included, beside them."""
    return CLUSTER if on_shared_cluster(item) else LOCAL


def pytest_addoption(parser):
    parser.addoption("--lanes", action="store_true",
                     help="with -n 2: the shared Ray cluster's tests in one worker, the rest in the other (tests/lanes.py)")


def lanes_on(config) -> bool:
    return bool(config.getoption("lanes", False))


def pytest_configure(config):
    if in_xdist_worker(config) or not lanes_on(config):
        return
    if getattr(config.option, "numprocesses", None) is None:
        raise pytest.UsageError("--lanes needs pytest-xdist's -n (e.g. -n 2): it splits the run between workers")
    config.stash[KEY] = Path(tempfile.mkdtemp(prefix="danceopd-lanes-"))
    os.environ[DIR_ENV] = str(config.stash[KEY])  # the workers start after this and inherit it


def pytest_unconfigure(config):
    directory = config.stash.get(KEY, None)
    if directory is not None:
        shutil.rmtree(directory, ignore_errors=True)
        os.environ.pop(DIR_ENV, None)


@pytest.hookimpl(trylast=True)  # after `-m` and `-k` have deselected: what the workers report
def pytest_collection_modifyitems(config, items):
    directory = os.environ.get(DIR_ENV)
    if not (in_xdist_worker(config) and directory):
        return
    out = Path(directory) / f"{config.workerinput['workerid']}.json"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({item.nodeid: lane_of(item) for item in items}))
    tmp.replace(out)  # whole or absent: the controller reads it after this worker's collection ends


def pytest_xdist_make_scheduler(config, log):
    if not lanes_on(config):
        return None
    from xdist.scheduler import LoadScopeScheduling

    class LaneScheduling(LoadScopeScheduling):
        """LoadScope with one scope per lane: a lane is one work unit, run by one worker."""

        lanes: dict[str, str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self.lanes is None:
                files = sorted(config.stash[KEY].glob("*.json"))
                assert files, f"no worker wrote its lanes into {config.stash[KEY]}"
                self.lanes = json.loads(files[0].read_text())
            return self.lanes[nodeid]

    return LaneScheduling(config, log)
