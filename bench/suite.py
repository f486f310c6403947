"""The test suite's own time: `make test-fast` and `make test` as a developer and CI run them,
each timed from outside with the machine's busy CPU (from /proc/stat, every process), and written
to bench/results/suite.json and suite.md.

    make bench-suite            # both commands
    python bench/suite.py test  # one of them

Run it alone: anything else on the machine is counted in the busy CPU and slows the suite.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results"
COMMANDS = ("test-fast", "test")


def busy_cpu_s() -> float:
    """Seconds of CPU every core spent busy since boot (idle and iowait apart)."""
    v = list(map(int, Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]))
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def python_loop_s() -> float:
    """A fixed pure-Python loop's CPU seconds: the machine's speed at the time of the run (it
    varies between runs on a shared machine)."""
    t = time.process_time()
    sum(i * i for i in range(30_000_000))
    return round(time.process_time() - t, 2)


def run(target: str) -> dict:
    print(f"suite: make {target}", flush=True)
    loop_s, b0, t0 = python_loop_s(), busy_cpu_s(), time.monotonic()
    proc = subprocess.run(["make", target], cwd=ROOT, capture_output=True, text=True)
    wall, busy = time.monotonic() - t0, busy_cpu_s() - b0
    tail = proc.stdout.strip().splitlines()[-40:]
    final = next((ln for ln in reversed(tail) if re.search(r"\d+ (passed|failed)", ln)), "")
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", final)}
    return {"target": target, "rc": proc.returncode, "wall_s": round(wall, 1), "busy_cpu_s": round(busy, 1),
            "cores": os.cpu_count(), "python_loop_s": loop_s, "counts": counts, "pytest_line": final.strip("= ")}


def markdown(rows: list[dict], commit: str) -> str:
    lines = ["# The test suite's time (bench/suite.py)", "",
             f"Commit `{commit}`, {rows[0]['cores']} cores ({platform.machine()}), each command alone. Busy CPU: every "
             "process's, from /proc/stat. The Python loop's seconds show the machine's speed at the time.", "",
             "| command | wall | busy CPU core-s | result | Python loop s |", "|---|---|---|---|---|"]
    for r in rows:
        result = ", ".join(f"{n} {k}" for k, n in r["counts"].items()) or f"exit {r['rc']}"
        lines.append(f"| `make {r['target']}` | {r['wall_s']} s ({r['wall_s'] / 60:.1f} min) | {r['busy_cpu_s']} | "
                     f"{result} | {r['python_loop_s']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    targets = argv or list(COMMANDS)
    unknown = [t for t in targets if t not in COMMANDS]
    if unknown:
        print(f"error: unknown command {unknown[0]!r}; one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    rows = [run(t) for t in targets]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "suite.json").write_text(json.dumps({"commit": commit, "runs": rows}, indent=1) + "\n")
    (OUT / "suite.md").write_text(markdown(rows, commit))
    sys.stdout.write(markdown(rows, commit))
    return max(r["rc"] for r in rows)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
