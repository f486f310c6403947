import copy
import json
import os
import platform
import shutil
import socket
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.background import (  # noqa: F401
    pytest_collection_finish,
    pytest_configure,
    pytest_sessionfinish,
    pytest_unconfigure,
)
from tests.tiers import pytest_collection_modifyitems, pytest_runtest_makereport, tier_guard  # noqa: F401

pytest_plugins = ("tests.lanes",)  # hooks named as tests/background.py's: a plugin of its own

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# One torch thread per process (inherited by subprocesses and Ray's workers): the models are tiny
# and every process shares two cores; more threads spin against each other (3-10x slower here).
os.environ.setdefault("OMP_NUM_THREADS", "1")
if "torch" in sys.modules:  # imported before this file: the variable came too late
    sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
# platform.processor() runs `uname -p` once per process and caches it: here, at collection, not in
# the first test that imports mlflow (its telemetry schema calls platform.platform(); deepspeed's
# autotuner imports mlflow wherever it is installed), which the tier guard would count as a process.
platform.uname().processor  # noqa: B018
# Matplotlib builds its font cache (running `fc-list`) the first time a figure is drawn on a new
# machine: here, once, at collection, not inside whichever fast test draws first.
import matplotlib  # noqa: E402

if not any(Path(matplotlib.get_cachedir()).glob("fontlist-*.json")):
    import matplotlib.font_manager  # noqa: E402, F401


def cfg_for(raw: dict, tmp_path: Path, out: str, **over):
    """A Config from a raw dict, output in tmp_path/out; `section__key=value` overrides."""
    from danceopd.config import config_from_dict

    raw = json.loads(json.dumps(raw))
    raw["job"]["output_dir"] = str(tmp_path / out)
    for key, value in over.items():
        section, name = key.split("__")
        raw.setdefault(section, {})[name] = value
    return config_from_dict(raw, base_dir=tmp_path)


def lean(raw: dict) -> dict:
    """`raw` with one teacher (named `teacher`) serving every route and evaluation off: in Ray mode two teacher
    actors and the evaluator fewer (each a process importing torch), for the tests whose subject
    is the runtime, not the teachers' number or the evaluation."""
    raw = copy.deepcopy(raw)
    raw["teachers"] = [dict(raw["teachers"][0], name="teacher")]
    for route in raw["routing"]["routes"]:
        route["teacher"] = "teacher"
    raw.setdefault("eval", {})["enabled"] = False
    return raw


@pytest.fixture
def toy_raw(tmp_path) -> dict:
    """The toy config as a dict, with its dataset copied next to a config path in tmp_path."""
    raw = yaml.safe_load((ROOT / "configs" / "toy.yaml").read_text())
    shutil.copytree(ROOT / "configs" / "data" / "toy", tmp_path / "data" / "toy")
    raw["job"]["output_dir"] = str(tmp_path / "run")
    return copy.deepcopy(raw)


@pytest.fixture
def sim_raw(tmp_path) -> dict:
    """The sim config as a dict, its dataset copied into tmp_path, the metrics port free."""
    raw = yaml.safe_load((ROOT / "configs" / "sim.yaml").read_text())
    shutil.copytree(ROOT / "configs" / "data" / "toy", tmp_path / "data" / "toy")
    raw["control"] = {"metrics_port": 0}
    return raw


@pytest.fixture
def write_config(tmp_path):
    def _write(raw: dict, name: str = "config.yaml") -> Path:
        p = tmp_path / name
        p.write_text(yaml.safe_dump(raw))
        return p

    return _write


def ipv6_loopback() -> bool:
    """This machine can bind ::1 (containers often cannot)."""
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray cluster for the whole session (started by this test run, stopped by it)."""
    import ray

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # Ray's per-node metrics export port, so the monitoring test can point Prometheus at it.
    os.environ["DANCEOPD_TEST_RAY_METRICS_PORT"] = str(free_port())
    # address="local": a new cluster, never one a test started with `ray start` (its address file
    # in /tmp/ray outlives it).
    kw = dict(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False, namespace="danceopd-tests",
              _metrics_export_port=int(os.environ["DANCEOPD_TEST_RAY_METRICS_PORT"]),
              runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "RAY_USAGE_STATS_ENABLED": "0"}})
    try:
        ray.init(**kw)
    except Exception as e:  # noqa: BLE001
        # Ray gives a new raylet a fixed 30 s to register with its GCS. Beside other test processes
        # starting clusters of their own on two cores (pytest-xdist), it can take longer: once more.
        if "timed out during startup" not in str(e):
            raise
        ray.shutdown()
        print(f"ray_local: {e}; starting it again", file=sys.stderr)
        ray.init(**kw)
    yield ray
    ray.shutdown()


def our_live_actors() -> dict[str, str] | None:
    """This process's live Ray actors (id -> class), or None when it is not connected."""
    import ray

    if not ray.is_initialized():
        return None
    import ray._private.state as gcs

    job = ray.get_runtime_context().get_job_id()
    return {i: a["ActorClassName"] for i, a in gcs.actors().items() if a["State"] != "DEAD" and a["JobID"] == job}


@pytest.fixture(autouse=True)
def no_actor_outlives_its_test(request):
    """A test on the shared cluster leaves none of the actors it started alive. One that does
    holds CPUs that the next test's members wait for (seen: a teacher pending for minutes behind
    a finished job's fleet, freed only when the garbage collector dropped its handles). Wider
    fixtures are set up before this one, so a module's shared actors are not the test's."""
    before = our_live_actors() if "ray_local" in request.fixturenames else None
    yield
    if before is None:
        return
    deadline = time.monotonic() + 15
    while True:  # ray.kill returns before the actor is dead
        left = sorted(c for i, c in (our_live_actors() or {}).items() if i not in before)
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not left, f"actors this test started are still alive after it: {left}"
