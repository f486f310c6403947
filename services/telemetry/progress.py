"""Job log: per-step JSONL metrics, named timers, a live progress line and the final summary."""

from __future__ import annotations

import contextlib
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from danceopd.remote_checkpoint import push

if TYPE_CHECKING:  # annotations only: no import cycle, no cost
    from danceopd.config import Config


class JobLog:
    def __init__(self, cfg: Config, start_step: int, show_progress: bool = True, console: Console | None = None):
        self.cfg = cfg
        self.start_step = start_step
        self.out = cfg.output_path
        self.out.mkdir(parents=True, exist_ok=True)
        # One run's steps only: a resumed run drops what it will redo (steps after start_step), a
        # fresh one (start_step 0) starts an empty file.
        self.metrics_file = truncate_metrics(self.out / "metrics.jsonl", start_step).open("a")
        self.timers: dict[str, float] = defaultdict(float)
        self.route_losses: dict[str, list[float]] = defaultdict(list)
        self.t0 = time.perf_counter()
        self.samples = 0
        self.last: dict = {}
        self.console = console or Console(stderr=True)
        self.progress = None
        if show_progress:
            self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=self.console,
                                     transient=False)
            self.progress.start()
            self.task = self.progress.add_task(cfg.job.name, total=cfg.learner.steps, completed=start_step, info="")

    @contextlib.contextmanager
    def timer(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.timers[name] += time.perf_counter() - t

    def samples_per_s(self) -> float:
        return self.samples / max(time.perf_counter() - self.t0, 1e-9)

    def step(self, step: int, metrics: dict, samples: int, lag: int = 0, workers: dict | None = None) -> None:
        self.samples += samples
        for r, v in metrics.get("route_loss", {}).items():
            self.route_losses[r].append(v)
        rec = {"step": step, "time": time.time(), "samples_per_s": self.samples_per_s(), "lag": lag, **metrics}
        if workers:
            rec["workers"] = workers
        self.last = rec
        self.metrics_file.write(json.dumps(rec) + "\n")
        self.metrics_file.flush()
        if self.progress is not None:
            losses = " ".join(f"{r}={v:.4f}" for r, v in sorted(metrics.get("route_loss", {}).items()))
            wk = " ".join(f"{k}:{v}" for k, v in (workers or {}).items())
            info = f"{self.samples_per_s():.1f} samples/s  lag {lag}  {losses}  {wk}"
            self.progress.update(self.task, completed=step, info=info)

    def evaluation(self, result: dict) -> Path:
        """One evaluation: a metrics.jsonl record ({step, time, eval: {route: {metric: value}},
        eval_seconds}), a PNG grid per route under samples/step-NNNNNNNN/, one console line."""
        from danceopd.evaluate import headline
        from danceopd.pictures import save_png

        rec = {"step": result["step"], "time": time.time(), "eval": result["routes"], "eval_seconds": result["seconds"]}
        self.metrics_file.write(json.dumps(rec) + "\n")
        self.metrics_file.flush()
        folder = self.out / "samples" / f"step-{result['step']:08d}"
        for route, img in result["grids"].items():
            save_png(img, folder / f"{route}.png")
        scores = "  ".join(f"{r} {h[0]} {h[1]:.4g}" for r, m in result["routes"].items() if (h := headline(m)))
        self.console.print(f"eval step {result['step']} ({result['seconds']:.2f} s): {scores}", highlight=False, soft_wrap=True)
        return folder

    def close(self) -> None:
        """Stop the progress line and close the metrics file (a failed job never reaches finish)."""
        if self.progress is not None:
            self.progress.stop()
        self.metrics_file.close()
        push(self.cfg, "metrics.jsonl")  # object storage: no append there, the whole file at the end

    def finish(self, checkpoint: str | None, extra: dict | None = None) -> dict:
        if self.progress is not None:
            self.progress.stop()
        self.metrics_file.close()
        summary = {
            "job": self.cfg.job.name,
            "steps": self.last.get("step", self.start_step),
            "samples": self.samples,
            "samples_per_s": round(self.samples_per_s(), 3),
            "route_loss": {r: {"start": _window(v, first=True), "end": _window(v, first=False)}
                           for r, v in sorted(self.route_losses.items())},
            "timers_s": {k: round(v, 3) for k, v in self.timers.items()},
            "checkpoint": checkpoint,
            "output_dir": self.cfg.output_location,
            **({"local_dir": str(self.out)} if self.cfg.output_location != str(self.out) else {}),
        }
        summary.update(extra or {})
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
        push(self.cfg, "metrics.jsonl", "summary.json")
        return summary


def truncate_metrics(path: Path, step: int) -> Path:
    """Drop the lines of steps after `step`, evaluations of `step` and later (the resumed run
    evaluates its first step again) and a torn last line from a metrics.jsonl."""
    if not path.is_file():
        return path
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
            if rec["step"] < step or (rec["step"] == step and "eval" not in rec):
                keep.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(keep))
    tmp.replace(path)
    return path


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """A metrics.jsonl as (learner step records, evaluation records)."""
    recs = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r for r in recs if "eval" not in r], [r for r in recs if "eval" in r]


def _window(values: list[float], first: bool) -> float:
    n = max(1, len(values) // 10)
    part = values[:n] if first else values[-n:]
    return round(sum(part) / len(part), 6)


def print_summary(summary: dict, console: Console | None = None) -> None:
    console = console or Console()
    console.print(f"[bold]{summary['job']}[/]: {summary['steps']} steps, {summary['samples']} samples, "
                  f"{summary['samples_per_s']} samples/s")
    for r, v in summary["route_loss"].items():
        console.print(f"  route {r:<14} loss {v['start']:.5f} -> {v['end']:.5f}")
    ev = summary.get("eval") or {}
    first, last = (ev.get("first") or {}).get("routes"), ev.get("routes")
    if last:
        skipped = f", {ev['skipped']} skipped" if ev["skipped"] else ""
        console.print(f"  evaluation, step {ev['first']['step']} -> {ev['step']} ({ev['evaluations']} evaluations, "
                      f"{ev['seconds_mean']} s each, {ev['where']}{skipped}):", highlight=False, soft_wrap=True)
        for r, metrics in last.items():
            cells = [f"{k} {first.get(r, {}).get(k, float('nan')):.4g} -> {v:.4g}" for k, v in metrics.items()]
            console.print(f"    {r:<14} " + "  ".join(cells), highlight=False, soft_wrap=True)
        console.print(f"  samples: {ev['samples_dir']}/step-{ev['step']:08d}/ (a PNG grid per route)", highlight=False, soft_wrap=True)
    if summary.get("plots"):
        console.print(f"  curves: {', '.join(summary['plots'])}", highlight=False, soft_wrap=True)
    if summary.get("tensorboard"):
        console.print(f"  tensorboard: tensorboard --logdir {summary['tensorboard']}", highlight=False, soft_wrap=True)
    if summary.get("profile"):
        console.print(f"  profile: {len(summary['profile'])} Chrome traces in {Path(summary['profile'][0]).parent} "
                      "(open in https://ui.perfetto.dev)", highlight=False, soft_wrap=True)
    if summary.get("mlflow"):
        ml = summary["mlflow"]
        console.print(f"  mlflow: run {ml['run_id']} (experiment {ml['experiment_id']}) at {ml['uri']}", highlight=False, soft_wrap=True)
    if summary.get("checkpoint"):
        console.print(f"  checkpoint: {summary['checkpoint']}", highlight=False, soft_wrap=True)
