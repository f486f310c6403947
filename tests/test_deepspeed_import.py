"""DeepSpeed's autotuner imports mlflow at import time; with the tracking extra installed that
costs every learner rank seconds and a `uname` subprocess. The learner imports DeepSpeed
without it, and leaves mlflow importable for whoever needs it."""

import importlib.util
import subprocess
import sys

import pytest

pytestmark = pytest.mark.subprocess

PROBE = """
import sys
from learner.deepspeed_learner import import_deepspeed
import_deepspeed()
import deepspeed.autotuning.autotuner as tuner
print("mlflow" in sys.modules, tuner.has_mlflow)
"""


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow is not installed")
def test_the_learner_imports_deepspeed_without_mlflow():
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300,
                       env={"DS_ACCELERATOR": "cpu", "PATH": "/usr/bin:/bin", "PYTHONPATH": "."})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[-2:] == ["False", "False"], r.stdout
