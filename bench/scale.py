"""Scale benchmark on the `sim` backend: learned samples/s against rollout workers, lag 0 and 1,
next to the ideal of the slowest role; plus the control-plane ceiling.

    python bench/scale.py [--workers 1,2,4,8,16,32] [--quick]     (make bench-scale)

Writes bench/results/scale.{json,md} and scale.png. Each point is one real job of the training
loop on a local Ray cluster (real actors, the router's scorer, teacher pools, the driver's pipeline, DeepSpeed learner,
weight pushes); only the GPU time of each role is a sleep (configs/sim.yaml).

Ideal, in batches/s (B samples each), with r, t, l the rollout / teacher-call / learner
micro-batch latencies, N workers, R_t replicas of teacher t, q_t = 1 - (1 - w_t)^B the chance that
a batch holds a row of route t (one call per route present), W ranks, A micro-batches per rank
and step, P = W*A batches per step, L = max_policy_lag:
    lag >= 1:  min(N / r,  min_t R_t / (q_t t),  W / l,  (L + 1) P / (r + t + A l))
               (the last term: a batch for step s may start only once step s-L-1 is done)
    lag 0:     P / (ceil(P / N) r + burst + A l)
               (a step's batches are made in ceil(P/N) waves after the previous step; the last
               wave's teacher calls arrive together, R_t at a time). With `routing.granularity:
               update` (the default) a step is ONE route's, so the whole wave goes to that
               route's teacher: burst = sum_t w_t ceil(min(N, P) / R_t) t, the mean over the
               step's route; per-sample routing spreads it: burst = max_t ceil(min(N, P) q_t / R_t) t.
               (A trace of the 32-worker point: routing after the last rollout took 0.76-0.87 s
               on t2i steps, 2 replicas, and 1.45-1.61 s on the others, 1 replica: 32 calls of
               0.05 s. The formula before this one took q_t for every step: 0.5 s.)
Measured samples/s counts steps after the first (start-up and the first step excluded), from the
step times in metrics.jsonl.

The staleness window (the README's sizing rule, `lag_for`): at lag L at most (L + 1) P batches
are between hand-out and consumption, and each spends about r + t + A l + P r / (2 N) of wall
time there (rollout, scoring, the step that consumes it, and on average half the time its step
takes to fill at N / r batches a second), so N workers stay busy only if
    (L + 1) P >= 1.4 N (r + t + A l + P r / (2 N)) / r
(the 1.4 is measured: at 1.25 the 32-worker point got lag 2 and 0.874 of ideal; lag 3 gave
0.979). The lag >= 1 series keeps P = 32 and raises L where that fails: raising A instead does
not help, since a bigger step holds each batch longer (32 workers at lag 1: A = 35 gave 0.627
of ideal, A = 48 0.684). At lag 0 every step waits for the one before, so P stays 32 (a
multiple of every fleet size measured).
With `routing.granularity: update` (the default) every batch has one route, so q_t = w_t.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from danceopd.config import load_config  # noqa: E402

R_S, T_S, L_S = 1.0, 0.05, 0.02  # rollout batch, teacher call, learner micro-batch (seconds)
W, A, B = 1, 32, 8


def lag_for(n: int, lag: int, accum: int = A) -> int:
    """The least lag >= `lag` whose staleness window keeps n workers busy (module doc); lag 0
    stays 0 (synchronous is a choice, not a size)."""
    if lag == 0:
        return 0
    p = W * accum
    while (lag + 1) * p < 1.4 * n * (R_S + T_S + accum * L_S + p * R_S / (2 * n)) / R_S:
        lag += 1
    return lag


def route_share(cfg) -> dict[str, float]:
    """q_t: the chance that a batch holds a row of teacher t's route (one teacher call each)."""
    total = sum(r.weight for r in cfg.routing.routes)
    if cfg.routing.granularity == "update":
        return {r.teacher: r.weight / total for r in cfg.routing.routes}
    return {r.teacher: 1 - (1 - r.weight / total) ** B for r in cfg.routing.routes}


def teacher_replicas(cfg, n_workers: int) -> dict[str, int]:
    """Replicas per teacher so that no teacher runs above 60 % busy at the rollout bound."""
    return {t: max(1, math.ceil(n_workers / R_S * q * T_S / 0.6)) for t, q in route_share(cfg).items()}


def ideal(cfg, n: int, lag: int, replicas: dict[str, int], accum: int = A) -> float:
    """Samples/s bound of the slowest role (see the module doc)."""
    p = W * accum
    q = route_share(cfg)
    if lag == 0:
        if cfg.routing.granularity == "update":  # the step's wave goes to its one route's teacher
            burst = sum(q[t] * math.ceil(min(n, p) / replicas[t]) for t in q) * T_S
        else:
            burst = max(math.ceil(min(n, p) * q[t] / replicas[t]) for t in q) * T_S
        return B * p / (math.ceil(p / n) * R_S + burst + accum * L_S)
    teacher = min(replicas[t] / (q[t] * T_S) for t in q)
    return B * min(n / R_S, teacher, W / L_S, (lag + 1) * p / (R_S + T_S + accum * L_S))


def run_point(n: int, lag: int, steps: int, out: Path, latencies=(R_S, T_S, L_S), accum: int | None = None,
              extra: tuple[str, ...] = ()) -> dict:
    from services.loop import train
    from services.telemetry.progress import read_metrics

    base = load_config(ROOT / "configs" / "sim.yaml")
    accum = accum or A
    reps = teacher_replicas(base, n)
    sets = [f"rollout.workers={n}", f"rollout.batch_size={B}", f"sync.max_policy_lag={lag}",
            f"learner.world_size={W}", f"learner.grad_accum={accum}", f"learner.steps={steps}",
            f"replay.capacity={n + 2 * W * accum}", f"routing.max_concurrent_batches={max(16, 2 * n)}",
            f"backend.rollout_latency_s={latencies[0]}", f"backend.teacher_latency_s={latencies[1]}",
            f"backend.learner_latency_s={latencies[2]}", f"job.output_dir={out}", "control.metrics_port=0",
            "checkpoint.every=0", "eval.enabled=false", *extra]
    sets += [f"teachers.{i}.replicas={reps[t.name]}" for i, t in enumerate(base.teachers)]
    cfg = load_config(ROOT / "configs" / "sim.yaml", sets)
    cpu0 = time.process_time()
    summary = train(cfg, mode="ray", show_progress=False)
    cpu = time.process_time() - cpu0
    rows = read_metrics(out / "metrics.jsonl")[0]  # learner steps
    window = rows[-1]["time"] - rows[0]["time"]
    batches = (len(rows) - 1) * W * accum
    return {"workers": n, "lag": lag, "accum": accum, "teacher_replicas": reps, "steps": steps,
            "batches_per_s": batches / window, "samples_per_s": B * batches / window,
            "ideal_samples_per_s": ideal(cfg, n, lag, reps, accum), "controller_cpu_s_per_batch": cpu / (steps * W * accum),
            "idle_ratio": summary["idle_ratio"], "lag_max": summary["lag_max"],
            "sync_seconds_mean": summary["sync_seconds_mean"], "sync_wait_seconds_mean": summary["sync_wait_seconds_mean"]}


CEILING_MODEL = ("backend.hidden=8", "method.rollout_steps=4")


def ceiling_accum(n: int, depth: int, lag: int = 1) -> int:
    """Batches per step that let n workers each hold `depth` orders: at lag L at most (L + 1) P
    orders are out at once, so (L + 1) P >= n * depth."""
    return math.ceil(n * depth / ((lag + 1) * W))


def ceiling(n: int, steps: int, out: Path, accum: int = 8, depth: int = 1) -> dict:
    """Near-zero latencies, many workers: batches/s the loop itself sustains, and which
    processes spent the CPU per batch between the first and the last step (actor start-up and
    shutdown excluded; psutil, by command line), sampled by a thread watching metrics.jsonl."""
    import threading

    import psutil

    me = psutil.Process()
    marks: dict[str, tuple[float, dict]] = {}
    done = threading.Event()

    def sample(tag: str, rows: int) -> None:
        path = out / "metrics.jsonl"
        while not done.is_set():
            if path.exists() and sum(1 for line in path.read_text().splitlines() if '"eval"' not in line) >= rows:
                marks[tag] = (time.perf_counter(), cpu_by_process(me))
                return
            time.sleep(0.02)  # the file is re-read: often enough for a window of seconds, no more

    def watch() -> None:
        sample("first", 1)
        sample("last", steps)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    # The control plane alone: the smallest student (its CPU is the stand-in model's, not the
    # pipeline's) and 4 rollout steps; evaluation off.
    point = run_point(n, 1, steps, out, latencies=(0.0, 0.0, 0.0), accum=accum,
                      extra=(*CEILING_MODEL, f"rollout.orders_per_worker={depth}"))
    point["orders_per_worker"] = depth
    done.set()
    watcher.join()
    if "last" in marks:
        (t0, c0), (t1, c1) = marks["first"], marks["last"]
        batches = (steps - 1) * W * accum
        per = {k: (v - c0.get(k, 0.0)) / batches * 1000 for k, v in c1.items()}
        point["window_s"] = round(t1 - t0, 3)
        point["cpu_ms_per_batch_by_process"] = {k: round(v, 2) for k, v in sorted(per.items(), key=lambda kv: -kv[1]) if v > 0.01}
        point["cpu_ms_per_batch"] = round(sum(per.values()), 2)
    return point


def cpu_by_process(me) -> dict[str, float]:
    """CPU seconds (user + system) so far of this user's processes, summed by kind."""
    import psutil

    cpu: dict[str, float] = {}
    for p in psutil.process_iter():
        if not _ok(p):
            continue
        try:
            t, name = p.cpu_times(), _kind(p, me)
        except psutil.Error:
            continue
        cpu[name] = cpu.get(name, 0.0) + t.user + t.system
    return cpu


def _ok(p) -> bool:
    try:
        return p.uids().real == os.getuid()
    except Exception:  # noqa: BLE001
        return False


def _kind(p, me) -> str:
    if p.pid == me.pid:
        return "driver (training loop)"
    cmd = " ".join(p.cmdline())
    for tag, short in (("RolloutWorkerActor", "ray::RolloutWor"), ("ScorerActor", "ray::ScorerActo"),
                       ("TeacherActor", "ray::TeacherAct"), ("LearnerRankActor", "ray::LearnerRan")):
        if tag in cmd or cmd.startswith(short):
            return tag
    for tag in ("raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py", "runtime_env"):
        if tag in cmd:
            return tag
    return "ray::idle worker" if "default_worker" in cmd else p.name()


def render_md(res: dict) -> str:
    lines = ["# Scale benchmark (`sim` backend)", "",
             f"Machine: {res['machine']}. Latencies: rollout batch {R_S} s, teacher call {T_S} s, learner "
             f"micro-batch {L_S} s; batch {B}, W={W} rank(s) x A micro-batches per step (A = {A}); the lag >= 1 series "
             "raises the lag where the staleness window binds, by the sizing rule "
             "`(L+1) P >= 1.4 N (r + t + A l + P r / (2N)) / r` (column lag); "
             "3 routes (weights 0.4/0.3/0.3, one route per update). Generated by `make bench-scale`.", "",
             "Ideal (batches/s; samples/s = 8 x that): lag >= 1: `min(N/r, min_t R_t/(q_t t), W/l, (L+1)P/(r+t+A l))`; "
             "lag 0: `P/(ceil(P/N) r + sum_t w_t ceil(min(N,P)/R_t) t + A l)` (one route per step: the last wave goes to its teacher). "
             "Measured: steps after the first.", "",
             "| lag | workers | A | teacher replicas | samples/s | ideal | efficiency | controller CPU s/batch | idle: rollout / teacher / learner |",
             "|---|---|---|---|---|---|---|---|---|"]
    for p in res["points"]:
        idle = p["idle_ratio"]
        lines.append(f"| {p['lag']} | {p['workers']} | {p.get('accum', A)} | {'/'.join(str(v) for v in p['teacher_replicas'].values())} | "
                     f"{p['samples_per_s']:.1f} | {p['ideal_samples_per_s']:.1f} | {p['efficiency']:.3f} | "
                     f"{p['controller_cpu_s_per_batch'] * 1000:.1f} ms | {idle['rollout']:.2f} / {idle['teacher']:.2f} / {idle['learner']:.2f} |")
    c = res.get("ceiling")
    if c:
        lines += ["", f"Control-plane ceiling (all latencies 0, {c['workers']} workers, lag 1, "
                  f"{c.get('orders_per_worker', 1)} orders per worker in calls of {max(1, c.get('orders_per_worker', 1) // 2)}, "
                  f"{c['accum']} batches per step (the window rule: 2 P >= workers x orders per worker), "
                  f"the smallest stand-in model: {', '.join(CEILING_MODEL)}): "
                  f"**{c['batches_per_s']:.1f} batches/s**, controller CPU {c['controller_cpu_s_per_batch'] * 1000:.1f} ms/batch "
                  "(the driver process's whole run, start-up included).", ""]
        if "cpu_ms_per_batch_by_process" in c:
            lines += [f"CPU per batch between the first and the last step ({c['window_s']} s, start-up and shutdown "
                      f"excluded): **{c['cpu_ms_per_batch']} ms** over every process of the machine, by process:", ""]
            lines += [f"- {k}: {v} ms" for k, v in c["cpu_ms_per_batch_by_process"].items()]
    lines += ["", "## Reading", "", res.get("reading", "(see the closing note)"), ""]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for lag, colour in ((0, "tab:blue"), (1, "tab:orange")):
        pts = [p for p in res["points"] if p.get("series", p["lag"]) == lag]
        if not pts:
            continue
        xs = [p["workers"] for p in pts]
        ax.plot(xs, [p["samples_per_s"] for p in pts], "o-", color=colour, label=f"measured, lag {lag}")
        ax.plot(xs, [p["ideal_samples_per_s"] for p in pts], "--", color=colour, alpha=0.6, label=f"ideal, lag {lag}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("rollout workers")
    ax.set_ylabel("learned samples/s")
    ax.set_title("DanceOPD scale (sim backend, 2-core machine)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", default="1,2,4,8,16,32")
    ap.add_argument("--lags", default="0,1")
    ap.add_argument("--steps", type=int, default=4, help="least learner steps per point (the first is excluded)")
    ap.add_argument("--ceiling-workers", type=int, default=16)
    ap.add_argument("--ceiling-depth", type=int, default=16,
                    help="the ceiling's rollout.orders_per_worker (its calls carry half of it)")
    ap.add_argument("--ceiling-accum", type=int, default=None,
                    help="the ceiling's batches per step (default: the window rule, ceiling_accum())")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--render", action="store_true", help="only re-render Markdown and plot from the JSON")
    ap.add_argument("--ceiling-only", action="store_true", help="re-measure only the ceiling, into the existing JSON")
    ap.add_argument("--merge", action="store_true",
                    help="re-measure only --workers/--lags (no ceiling): their points replace those in the existing JSON")
    args = ap.parse_args()
    if args.render:
        res = json.loads((args.out / "scale.json").read_text())
        base = load_config(ROOT / "configs" / "sim.yaml")
        for p in res["points"]:  # the ideal is a formula of the stored point: recompute it
            p["ideal_samples_per_s"] = ideal(base, p["workers"], p["lag"], p["teacher_replicas"], p.get("accum", A))
            p["efficiency"] = p["samples_per_s"] / p["ideal_samples_per_s"]
        (args.out / "scale.md").write_text(render_md(res))
        plot(res, args.out / "scale.png")
        return

    import ray

    workers = [int(x) for x in args.workers.split(",")]
    ray.init(address="local", num_cpus=max(64, 2 * max(workers)), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}})
    res = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "points": []}
    if args.ceiling_only or args.merge:
        res = json.loads((args.out / "scale.json").read_text())
    if args.ceiling_only:
        workers, args.lags = [], ""
    if args.merge:
        args.ceiling_workers = 0
        redo = {(lag, n) for lag in (int(x) for x in args.lags.split(",") if x) for n in workers}
        res["points"] = [p for p in res["points"] if (p.get("series", p["lag"]), p["workers"]) not in redo]
    with tempfile.TemporaryDirectory() as tmp:
        for lag in [int(x) for x in args.lags.split(",") if x]:
            for n in workers:
                t0 = time.perf_counter()
                steps = max(args.steps, n // 2 + 2)  # a longer window where steps are short
                p = run_point(n, lag_for(n, lag), steps, Path(tmp) / f"lag{lag}-n{n}")
                p["efficiency"] = p["samples_per_s"] / p["ideal_samples_per_s"]
                p["series"] = lag  # the lag asked; p["lag"] is the rule's
                res["points"].append(p)
                res["points"].sort(key=lambda q: (q.get("series", q["lag"]), q["workers"]))
                print(f"lag {p['lag']} workers {n:>2}: {p['samples_per_s']:7.1f} samples/s (ideal {p['ideal_samples_per_s']:.1f}, "
                      f"efficiency {p['efficiency']:.3f}) in {time.perf_counter() - t0:.0f} s", flush=True)
        if args.ceiling_workers:
            accum = args.ceiling_accum or ceiling_accum(args.ceiling_workers, args.ceiling_depth)
            # Long enough that the batches made before the first step (up to (L + 1) P at lag L)
            # are a small part of those counted: 40 steps, about 5 % at lag 1.
            res["ceiling"] = ceiling(args.ceiling_workers, 40, Path(tmp) / "ceiling", accum, args.ceiling_depth)
            print(f"control-plane ceiling: {res['ceiling']['batches_per_s']:.1f} batches/s", flush=True)
    ray.shutdown()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale.json").write_text(json.dumps(res, indent=1))
    (args.out / "scale.md").write_text(render_md(res))
    plot(res, args.out / "scale.png")
    print(f"wrote {args.out / 'scale.md'}")


if __name__ == "__main__":
    main()
