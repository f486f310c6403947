"""The tiers' guard (tests/tiers.py) on a nested pytest run: a test that starts a process or calls
ray.init without its mark fails, naming the mark; marked, it runs; collection sets `fast`."""

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CONFTEST = "from tests.tiers import pytest_collection_modifyitems, pytest_runtest_makereport, tier_guard  # noqa: F401\n"
INI = ("[pytest]\nmarkers =\n    ray: r\n    subprocess: s\n    slow: l\n    fast: f\n"
       "addopts = --strict-markers -p no:cacheprovider\n")


@pytest.fixture
def nested(pytester):
    pytester.makeconftest(CONFTEST)
    pytester.makeini(INI)
    return pytester


def test_an_unmarked_process_or_ray_init_fails_naming_the_mark(nested):
    nested.makepyfile(test_x="""
        import subprocess
        import ray

        def test_process():
            subprocess.run(["true"])

        def test_swallowed():
            try:
                subprocess.run(["true"])
            except BaseException:
                pass

        def test_ray():
            ray.init(num_cpus=1)
    """)
    res = nested.runpytest_inprocess()
    res.assert_outcomes(failed=2, passed=1, errors=1)  # the swallowed one fails at teardown
    for line in ("test_x.py::test_process starts a process ?'true'? but is not marked subprocess*",
                 "test_x.py::test_swallowed starts a process ?'true'? but is not marked subprocess*",
                 "test_x.py::test_ray calls ray.init but is not marked ray*"):
        res.stdout.fnmatch_lines([line])


def test_collection_marks_the_fast_lane_and_refuses_a_fast_mark_on_a_tier(nested):
    nested.makepyfile(test_y="""
        import pytest

        def test_pure():
            pass

        @pytest.mark.slow
        def test_long():
            pass

        @pytest.fixture
        def ray_local():
            yield None

        def test_cluster(ray_local):
            pass
    """)
    res = nested.runpytest_inprocess("-m", "fast", "--collect-only", "-q")
    res.stdout.fnmatch_lines(["test_y.py::test_pure", "*1/3 tests collected (2 deselected)*"])
    res = nested.runpytest_inprocess("-m", "ray", "--collect-only", "-q")
    res.stdout.fnmatch_lines(["test_y.py::test_cluster"])
    nested.makepyfile(test_z="""
        import pytest

        @pytest.mark.fast
        @pytest.mark.ray
        def test_both():
            pass
    """)
    res = nested.runpytest_inprocess("--collect-only", "-q", "test_z.py")
    assert res.ret == pytest.ExitCode.USAGE_ERROR
    res.stderr.fnmatch_lines(["*test_both: marked fast and ray*"])


@pytest.mark.subprocess
def test_a_marked_process_runs(nested):
    nested.makepyfile(test_w="""
        import subprocess
        import pytest

        @pytest.mark.subprocess
        def test_process():
            assert subprocess.run(["true"]).returncode == 0
    """)
    nested.runpytest_inprocess().assert_outcomes(passed=1)


@pytest.mark.subprocess
def test_lanes_run_the_cluster_tests_in_one_worker_and_the_rest_in_the_other(nested, monkeypatch, tmp_path):
    # pytest-xdist's loadgroup spreads these round robin on pytest 9.2 (pytest-xdist#1386)
    nested.makeconftest(CONFTEST + 'pytest_plugins = ("tests.lanes",)\n')
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    monkeypatch.setenv("LANES_LOG", str(tmp_path / "log"))
    for var in ("PYTEST_XDIST_WORKER", "DANCEOPD_LANES_DIR"):  # this run's own, where it runs in a lane
        monkeypatch.delenv(var, raising=False)
    nested.makepyfile(test_v="""
        import os
        import pytest

        def record(lane):
            with open(os.environ["LANES_LOG"], "a") as f:
                f.write(f"{lane} {os.environ['PYTEST_XDIST_WORKER']}\\n")

        @pytest.fixture
        def ray_local():  # the shared cluster's name (tests/conftest.py)
            yield None

        @pytest.fixture
        def cluster(ray_local):
            yield ray_local

        @pytest.mark.parametrize("i", range(4))
        def test_cluster(i, ray_local):
            record("cluster")

        def test_through_a_fixture(cluster):
            record("cluster")

        @pytest.mark.ray
        @pytest.mark.subprocess
        def test_own_head():  # a cluster of its own, in another process
            record("local")

        @pytest.mark.subprocess
        def test_process():
            record("local")

        @pytest.mark.parametrize("i", range(8))
        def test_local(i):
            record("local")
    """)
    nested.runpytest_subprocess("-n", "2", "--lanes").assert_outcomes(passed=15)
    workers: dict[str, set] = {}
    for line in (tmp_path / "log").read_text().split("\n")[:-1]:
        lane, worker = line.split()
        workers.setdefault(lane, set()).add(worker)
    assert len(workers["cluster"]) == len(workers["local"]) == 1 and workers["cluster"] != workers["local"], workers
    res = nested.runpytest_subprocess("--lanes")
    assert res.ret == pytest.ExitCode.USAGE_ERROR
    res.stderr.fnmatch_lines(["*--lanes needs pytest-xdist's -n*"])
