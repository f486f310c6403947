"""The background chain (tests/background.py): its commands run in order, each result is read
once it is done, a run that fails says why, and stop() leaves no process behind."""

import sys
import time

import psutil
import pytest

from tests.background import Chain

pytestmark = pytest.mark.subprocess


def test_runs_in_order_and_a_failed_run_says_why():
    chain = Chain.of_scenarios({"first": ("no_such_scenario",), "second": ("nor_this",)})
    try:
        with pytest.raises(AssertionError, match=r"background run 'first' wrote nothing: unknown scenario 'no_such_scenario'"):
            chain.result("first", timeout_s=60)
        with pytest.raises(AssertionError, match="unknown scenario 'nor_this'"):
            chain.result("second", timeout_s=60)
        assert chain.tail().index("no_such_scenario") < chain.tail().index("nor_this")  # in chain order
    finally:
        chain.stop()
    assert not chain.dir.exists()


def test_a_result_waits_for_its_run_and_stop_ends_the_rest():
    write = "import json, sys, time; time.sleep(float(sys.argv[2])); json.dump({'n': sys.argv[2]}, open(sys.argv[1], 'w'))"
    chain = Chain({"first": [sys.executable, "-c", write, "{out}", "1"],
                   "second": ["bash", "-c", "sleep 300 & sleep 300"]})
    try:
        assert chain.result("first", timeout_s=60) == {"n": "1"}  # written after a second: waited for
        time.sleep(0.5)
        kids = psutil.Process(chain.proc.pid).children(recursive=True)
        assert len(kids) >= 2, kids  # the second run and its background sleep
    finally:
        chain.stop()
    time.sleep(0.2)
    assert not any(k.is_running() and k.status() != psutil.STATUS_ZOMBIE for k in kids)


def test_a_reader_in_another_process_reads_the_chain_and_cannot_stop_it():
    """pytest-xdist: the controller runs the chain, a worker reads it from the directory alone."""
    write = "import json, sys, time; time.sleep(1); json.dump({'n': 1}, open(sys.argv[1], 'w'))"
    chain = Chain({"first": [sys.executable, "-c", write, "{out}"], "second": ["sleep", "300"]})
    try:
        reader = Chain(None, chain.dir)
        assert reader.result("first", timeout_s=60) == {"n": 1}
        reader.stop()  # the controller's to stop
        assert chain.proc.poll() is None and chain.dir.exists()
        with pytest.raises(pytest.fail.Exception, match="background run 'second' not done within 1 s"):
            reader.result("second", timeout_s=1)
    finally:
        chain.stop()
