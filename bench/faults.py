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
NODES = ["rollout node (2 workers + router)", "teacher node (3 replicas + evaluator)", "learner node (2 ranks)"]


def markdown(rows: dict) -> str:
    lines = ["# Fault recovery (tests/test_faults.py)", "",
             "`sim` backend, 2 rollout workers with 2 orders each, lag 1, this machine's CPUs. Recovery: from the "
             "signal to the first learner step after the replacement is up (hung cases include the 1.5 s "
             "deadline the tests set).", "",
             "| fault | outcome | recovery s | samples lost (re-issued) |", "|---|---|---|---|"]
    for name in ORDER:
        r = rows.get(name)
        if r is None:
            lines.append(f"| {name} | not measured (test failed or skipped) | | |")
        elif name == "learner rank":
            lines.append(f"| {name}, {r['fault']} | the job fails naming the rank after {r['failed_after_s']} s; "
                         f"`--resume auto` finishes it ({r['resume_to_end_s']} s with start-up) | — | — |")
        else:
            lines.append(f"| {name}, {r['fault']} | every step, accounting exact, 1 restart of this role and 0 of "
                         f"any other | {r['recovered_s']} | {r['lost_samples']} |")
    lines += ["", "## A whole node lost (tests/test_multinode.py)", "",
              "`ray.cluster_utils.Cluster`: a head with num_cpus 0 and one node per group; the node is removed without a "
              "graceful shutdown and a node of its group joins a few seconds later. Recovery: from the loss to the first "
              "learner step after every member is back.", "",
              "| node | outcome | recovery s | samples lost (re-issued) |", "|---|---|---|---|"]
    for name in NODES:
        r = rows.get(name)
        if r is None:
            lines.append(f"| {name} | not measured (test failed or skipped) | | |")
        elif "failed_after_s" in r:
            lines.append(f"| {name} | the job fails naming the rank after {r['failed_after_s']} s; `--resume auto` on a "
                         f"fresh node finishes it ({r['resume_to_end_s']} s with start-up) | — | — |")
        else:
            lines.append(f"| {name} | every step, accounting exact; the group's node back after {r['back_after_s']} s | "
                         f"{r['recovered_s']} | {r['lost_samples']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "faults.json"
        env = {**os.environ, "DANCEOPD_FAULT_REPORT": str(report)}
        rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "tests/test_faults.py", "tests/test_multinode.py",
                              "-k", "not autoscaler and not condition_cache"], cwd=ROOT, env=env)
        rows = json.loads(report.read_text()) if report.exists() else {}
    (OUT / "faults.json").write_text(json.dumps({"rc": rc, "faults": rows}, indent=1) + "\n")
    (OUT / "faults.md").write_text(markdown(rows))
    sys.stdout.write(markdown(rows))
    return rc


if __name__ == "__main__":
    sys.exit(main())
