"""Throughput: learned samples/s of the Ray pipeline (lag 0 and lag 1) against the local loop,
same config, same machine; median of several runs. Writes bench/results/throughput.{json,md}.

    python bench/throughput.py [--config configs/demo.yaml] [--steps 60] [--runs 3]

samples/s counts samples the learner trained on, from the first step's start (actor start-up
excluded) to the last step. Idle ratios per role say what limits the pipeline.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from danceopd.config import load_config  # noqa: E402


def run_once(config: Path, mode: str, lag: int, steps: int, out: Path) -> dict:
    cfg = load_config(config, [f"learner.steps={steps}", f"sync.max_policy_lag={lag}", f"job.output_dir={out}",
                               "checkpoint.every=0", "control.metrics_port=0"])
    from services.loop import train

    return train(cfg, mode=mode, show_progress=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--render", action="store_true", help="only re-render the Markdown from the saved JSON")
    args = ap.parse_args()
    if args.render:
        (args.out / "throughput.md").write_text(render_md(json.loads((args.out / "throughput.json").read_text())))
        return

    import ray

    from services.runtime.placement import cpus_needed

    base = load_config(args.config)
    ray.init(address="local", num_cpus=cpus_needed(base), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}})
    variants = [("local", "local", 0), ("ray_lag0", "ray", 0), ("ray_lag1", "ray", 1)]
    results = {name: [] for name, _, _ in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.runs):
            for name, mode, lag in variants:  # interleaved, so machine drift hits all alike
                t0 = time.perf_counter()
                s = run_once(args.config, mode, lag, args.steps, Path(tmp) / f"{name}-{r}")
                row = {"samples_per_s": s["samples_per_s"], "wall_s": round(time.perf_counter() - t0, 2),
                       "idle_ratio": s.get("idle_ratio"), "route_loss_end": {k: v["end"] for k, v in s["route_loss"].items()}}
                results[name].append(row)
                print(f"run {r + 1}/{args.runs} {name:9s} {row['samples_per_s']:8.2f} samples/s  idle {row['idle_ratio']}", flush=True)
    ray.shutdown()

    med = {n: statistics.median(x["samples_per_s"] for x in rows) for n, rows in results.items()}
    report = {
        "config": str(args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT) else args.config),
        "steps": args.steps, "runs": args.runs,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "median_samples_per_s": med,
        "speedup_lag1_vs_local": round(med["ray_lag1"] / med["local"], 3),
        "speedup_lag0_vs_local": round(med["ray_lag0"] / med["local"], 3),
        "runs_detail": results,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "throughput.json").write_text(json.dumps(report, indent=1))
    md = render_md(report)
    (args.out / "throughput.md").write_text(md)
    print(md)


def render_md(report: dict) -> str:
    med, results = report["median_samples_per_s"], report["runs_detail"]
    lines = [f"# Throughput ({report['date']})", "",
             f"Config `{report['config']}`, {report['steps']} learner steps, median of {report['runs']} runs, "
             f"{report['machine']['cpus']} CPU cores.", "",
             "| variant | median samples/s | runs | idle ratios (last run) |", "|---|---|---|---|"]
    for n, rows in results.items():
        runs = ", ".join(f"{x['samples_per_s']:.1f}" for x in rows)
        lines.append(f"| {n} | {med[n]:.2f} | {runs} | {rows[-1]['idle_ratio']} |")
    lines += ["", f"lag-1 pipeline vs local loop: **{report['speedup_lag1_vs_local']}×**; "
              f"lag-0: {report['speedup_lag0_vs_local']}×. No speed-up target applies here: on "
              f"{report['machine']['cpus']} shared cores the local loop already uses every core for intra-op "
              "threads; overlap is measured by the scale benchmark (bench/results/scale.md)."]
    idle = results["ray_lag1"][-1]["idle_ratio"] or {}
    if idle:
        busiest = min(idle, key=idle.get)
        lines += ["", f"No role is saturated: the busiest, `{busiest}`, is busy "
                  f"{1 - idle[busiest]:.0%} of the wall time (idle ratios above, lag-1). The pipeline is bound by "
                  "per-batch coordination — actor hops (router → worker → router → teachers), Arrow batches "
                  "through the object store, weight pushes — and by Ray's own processes sharing the same "
                  f"{report['machine']['cpus']} cores, while the local loop spends both cores on intra-op "
                  "threads with no hand-offs. Overlap pays once a role's compute dominates (bigger models, GPUs)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
