"""Recovery from one fault per role and per node: runs tests/test_faults.py (Ray mode, `sim`
backend, real SIGKILL / SIGSTOP of the actor's process) and the node-loss tests of
tests/test_multinode.py (a whole node of a simulated cluster removed), and writes what each test
measured to bench/results/faults.json and faults.md.

    make bench-faults
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results"
ORDER = ["rollout worker", "rollout worker (hung)", "teacher replica", "teacher replica (hung)", "router (scorer)",
         "learner rank"]
NODES = ["rollout node (2 workers + router)", "teacher node (2 replicas + evaluator)", "learner node (2 ranks)"]
ROUND3 = ["members killed / hung while starting", "router and a rollout worker at once", "teacher answers NaN (2 calls)",
          "driver", "damaged newest checkpoint (model.safetensors truncated)",
          "damaged newest checkpoint (state.json truncated)", "damaged newest checkpoint (learner/optimizer.pt truncated)"]
TESTS = ["tests/test_faults.py", "tests/test_multinode.py", "tests/test_start_faults.py", "tests/test_nonfinite.py",
         "tests/test_checkpoints.py"]
SELECT = "not autoscaler and not condition_cache and (faults or multinode or ray_teacher_nan or damaged_newest)"


def _row(label: str, r: dict | None, finished: str) -> str:
    """One table row: not measured, a learner loss (the job fails, resume finishes), or a recovery."""
    if r is None:
        return f"| {label} | not measured (test failed or skipped) | | |"
    if "failed_after_s" in r:
        return (f"| {label} | the job fails naming the rank after {r['failed_after_s']} s; `--resume auto` finishes it "
                f"({r['resume_to_end_s']} s with start-up) | — | — |")
    return f"| {label} | {finished} | {r['recovered_s']} | {r['lost_samples']} |"


def markdown(rows: dict) -> str:
    def head(first: str) -> list[str]:
        return [f"| {first} | outcome | recovery s | samples lost (re-issued) |", "|---|---|---|---|"]

    lines = ["# Fault recovery (tests/test_faults.py)", "",
             "`sim` backend, 2 rollout workers with 4 orders each (in calls of two), lag 1, this machine's CPUs. Recovery: from the "
             "signal to the first learner step after the replacement is up (hung cases include the 1.5 s "
             "deadline the tests set).", "", *head("fault")]
    for name in ORDER:
        r = rows.get(name)
        lines.append(_row(f"{name}, {r['fault']}" if r else name, r,
                          "every step, accounting exact, 1 restart of this role and 0 of any other"))
    lines += ["", "## A whole node lost (tests/test_multinode.py)", "",
              "`ray.cluster_utils.Cluster`: a head with num_cpus 0 and one node per group; the node is removed without a "
              "graceful shutdown and a node of its group joins a few seconds later. Recovery: from the loss to the first "
              "learner step after every member is back.", "", *head("node")]
    for name in NODES:
        r = rows.get(name)
        lines.append(_row(name, r, f"every step, accounting exact; the group's node back after {r and r.get('back_after_s')} s"))
    lines += ["", "## Start-up, two roles at once, bad numbers, the driver, damaged checkpoints", "",
              "Same set-up; tests/test_start_faults.py, test_nonfinite.py, test_faults.py, test_checkpoints.py.", "",
              *head("fault")]
    for name in ROUND3:
        r = rows.get(name)
        lines.append(f"| {name}, {r['fault']} | {r['outcome']} | {r.get('recovered_s', '—')} | {r.get('lost_samples', '—')} |"
                     if r else f"| {name} | not measured (test failed or skipped) | | |")
    return "\n".join(lines) + "\n"


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "faults.json"
        env = {**os.environ, "DANCEOPD_FAULT_REPORT": str(report)}
        rc = subprocess.call([sys.executable, "-m", "pytest", "-q", *TESTS, "-k", SELECT], cwd=ROOT, env=env)
        rows = json.loads(report.read_text()) if report.exists() else {}
    (OUT / "faults.json").write_text(json.dumps({"rc": rc, "faults": rows}, indent=1) + "\n")
    (OUT / "faults.md").write_text(markdown(rows))
    sys.stdout.write(markdown(rows))
    return rc


if __name__ == "__main__":
    sys.exit(main())
