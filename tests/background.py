"""Long scenario runs started in the background when collection ends, so that their wall time
overlaps the rest of the test run instead of adding to it.

The multi-node scenarios (tests/multinode.py) spend most of their minutes waiting: latencies are
sleeps, nodes leave and come back, the autoscaler takes its idle timeout. Run at their test's turn,
that waiting is added to the suite; started at once, it runs beside the other files, and their
tests (put last by tests/tiers.py) only read the results. The runs form one chain (one simulated
cluster at a time on a small machine). Under pytest-xdist the controller starts the chain when it
is configured (it collects nothing: it starts the chain only for a run of the whole suite, no
`-k`/`-m`, whose paths hold the background files) and the workers read its results from the
directory it names in DANCEOPD_BACKGROUND_DIR; otherwise a worker's fixture runs its scenarios
when its test comes.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# file -> the runs its tests read, in chain order: name -> `python -m tests.multinode` scenarios
RUNS = {"test_multinode.py": {"results": ("placement", "rollout_node", "teacher_node", "learner_node", "sd3_cache"),
                              "autoscale": ("autoscale",)}}
BACKGROUND_FILES = tuple(RUNS)
KEY = pytest.StashKey["Chain"]()
DIR_ENV = "DANCEOPD_BACKGROUND_DIR"  # the controller's chain, for pytest-xdist's workers


def scenario_argv(out: Path | str, scenarios: tuple[str, ...]) -> list[str]:
    return [sys.executable, "-m", "tests.multinode", str(out), *scenarios]


def scenario_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


class Chain:
    """One shell that runs its commands in order, each (name, argv) writing `<dir>/<name>.json`
    (argv's `{out}`) and then `<dir>/<name>.done`."""

    def __init__(self, commands: dict[str, list[str]] | None, directory: Path | None = None):
        """`commands` None: a reader of the chain another process started in `directory`."""
        self.dir = directory or Path(tempfile.mkdtemp(prefix="danceopd-background-"))
        self.log = self.dir / "chain.log"
        self.proc = None
        if commands is None:
            return
        steps = []
        for name, argv in commands.items():
            line = " ".join(shlex.quote(a.replace("{out}", str(self.dir / f"{name}.json"))) for a in argv)
            steps.append(f"{line}; echo $? > {shlex.quote(str(self.dir / name))}.done")
        with self.log.open("w") as log:
            # a session of its own: stop() ends the chain and everything it started, by process group
            self.proc = subprocess.Popen(["bash", "-c", "; ".join(steps)], cwd=ROOT, env=scenario_env(),
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    @classmethod
    def of_scenarios(cls, runs: dict[str, tuple[str, ...]]) -> Chain:
        return cls({name: scenario_argv("{out}", scenarios) for name, scenarios in runs.items()})

    def result(self, name: str, timeout_s: float) -> dict:
        done = self.dir / f"{name}.done"
        deadline = time.monotonic() + timeout_s
        while not done.exists() and (self.proc is None or self.proc.poll() is None):
            if time.monotonic() > deadline:
                pytest.fail(f"background run {name!r} not done within {timeout_s:.0f} s: {self.tail()}", pytrace=False)
            time.sleep(1)
        out = self.dir / f"{name}.json"
        assert out.exists(), f"background run {name!r} wrote nothing: {self.tail()}"
        return json.loads(out.read_text())

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def stop(self) -> None:
        if self.proc is None:
            return  # a reader: the controller stops the chain
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)  # the multinode harness stops its cluster on the way out
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)


def in_xdist_worker(config) -> bool:
    return hasattr(config, "workerinput")  # not the environment: a nested pytest run inherits it


def runs_of(files) -> dict[str, tuple[str, ...]]:
    """The background runs the test files `files` read, in chain order."""
    return {name: s for f in BACKGROUND_FILES if f in files for name, s in RUNS[f].items()}


def background_elsewhere(config) -> bool:
    """An xdist worker whose controller runs the chain: its background files' tests only read."""
    return in_xdist_worker(config) and DIR_ENV in os.environ


def pytest_configure(config):
    """pytest-xdist's controller: start the chain before the workers start (they inherit
    DIR_ENV), for a run of the whole suite."""
    if in_xdist_worker(config) or not getattr(config.option, "numprocesses", None) or config.option.collectonly:
        return
    if config.option.keyword or config.option.markexpr:
        return  # a selection: the workers run what they need
    if config.getoption("lanes", False):
        return  # the local lane runs the scenarios at its turn (tests/lanes.py)
    args = [Path(a.split("::")[0]).resolve() for a in config.args] or [ROOT / "tests"]
    tests = ROOT / "tests"
    if any(a == tests or a == ROOT or a == tests / f for a in args for f in BACKGROUND_FILES):
        chain = config.stash[KEY] = Chain.of_scenarios(runs_of(BACKGROUND_FILES))
        os.environ[DIR_ENV] = str(chain.dir)


def pytest_unconfigure(config):
    chain = config.stash.get(KEY, None)
    if chain is not None and not in_xdist_worker(config):
        chain.stop()
        os.environ.pop(DIR_ENV, None)


def pytest_collection_finish(session):
    if in_xdist_worker(session.config) or session.config.option.collectonly or KEY in session.config.stash:
        if background_elsewhere(session.config):
            session.config.stash[KEY] = Chain(None, Path(os.environ[DIR_ENV]))
        return
    runs = runs_of({item.path.name for item in session.items})
    if runs:
        session.config.stash[KEY] = Chain.of_scenarios(runs)


def pytest_sessionfinish(session):
    chain = session.config.stash.get(KEY, None)
    if chain is not None and not getattr(session.config.option, "numprocesses", None):
        chain.stop()  # one process; under xdist the controller's pytest_unconfigure stops it


def scenario_result(request, tmp_path_factory, file: str, name: str, timeout_s: float) -> dict:
    """The run `name`'s results: from the background chain, or run now (xdist, or not started)."""
    chain = request.config.stash.get(KEY, None)
    if chain is not None:
        return chain.result(name, timeout_s)
    out = tmp_path_factory.mktemp(name) / "results.json"
    proc = subprocess.run(scenario_argv(out, RUNS[file][name]), cwd=ROOT, env=scenario_env(),
                          capture_output=True, text=True, timeout=timeout_s)
    assert out.exists(), f"the scenarios wrote nothing (exit {proc.returncode}): {proc.stderr[-3000:]}"
    return json.loads(out.read_text())
