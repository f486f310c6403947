"""The `danceopd` command."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console

from danceopd.config import Config, ConfigError, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help="DanceOPD: on-policy, hard-routed field distillation.")
err = Console(stderr=True)

SetOpt = typer.Option(None, "--set", help="Override a config key, e.g. --set learner.lr=3e-4 (repeatable).")


def fail(msg: str, code: int = 2):
    err.print(f"[red]error:[/] {msg}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def load_valid(config: Path, overrides: list[str] | None) -> Config:
    """Config + full validation (data, files, prompts, model folders): one line and exit 2 on error."""
    from danceopd.validate import validate

    try:
        cfg = load_config(config, overrides)
        validate(cfg)
    except (ConfigError, ValueError, KeyError, FileNotFoundError) as e:
        fail(str(e.args[0]) if isinstance(e, KeyError) else str(e))
    return cfg


@app.command()
def validate(config: Path, set_: list[str] | None = SetOpt):
    """Check a config, its dataset buckets, image files and model folders (no weights are loaded)."""
    cfg = load_valid(config, set_)
    typer.echo(f"ok: {config} — {len(cfg.routing.routes)} routes, {len(cfg.teachers)} teachers, method {cfg.method.name}")


@app.command()
def train(
    config: Path,
    mode: str = typer.Option("ray", help="`ray` (actors on a Ray cluster) or `local` (one process, the reference loop)."),
    address: str | None = typer.Option(None, help="Ray address to join (`auto`: a running cluster); default: start a local one."),
    resume: str | None = typer.Option(None, help="Checkpoint folder, or `auto` for the latest in job.output_dir."),
    set_: list[str] | None = SetOpt,
    progress: bool = typer.Option(True, help="Show the live progress line."),
):
    """Run a training job."""
    from danceopd.checkpoint import resolve_resume
    from services.progress import print_summary

    cfg = load_valid(config, set_)
    if mode not in ("ray", "local"):
        fail(f"--mode: {mode!r} is not one of ray, local")
    try:
        ckpt = resolve_resume(cfg.output_path, resume)
    except FileNotFoundError as e:
        fail(str(e))
    if resume and ckpt is None:
        err.print(f"--resume auto: no checkpoint in {cfg.output_path}, starting fresh")
    if mode == "local":
        from services.local import train_local

        summary = train_local(cfg, resume_from=ckpt, show_progress=progress)
    else:
        from services.ray_runtime import train_ray

        summary = train_ray(cfg, address=address, resume_from=ckpt, show_progress=progress)
    print_summary(summary)


@app.command("make-data")
def make_data(
    kind: str = typer.Argument(..., help="`toy` or `shapes`."),
    out: Path = typer.Option(..., help="Output folder (data.csv + images/)."),
    n_per_task: int = typer.Option(64, help="Samples per task."),
    seed: int = typer.Option(0),
    tasks: str = typer.Option("t2i,local_edit,global_edit", help="Comma-separated tasks."),
    num_classes: int = typer.Option(4, help="toy: prompt classes."),
    image_size: int = typer.Option(16, help="shapes: image side."),
):
    """Write a procedural dataset (toy vectors or ShapesBench images)."""
    task_list = [t.strip() for t in tasks.split(",") if t.strip()]
    if kind == "toy":
        from danceopd.dataset import write_toy_dataset

        path = write_toy_dataset(out, task_list, num_classes, n_per_task)
    elif kind == "shapes":
        from danceopd.shapes_world import write_shapes_dataset

        path = write_shapes_dataset(out, n_per_task, seed, image_size=image_size, tasks=tuple(task_list))
    else:
        fail(f"make-data: unknown kind {kind!r} (toy, shapes)")
    typer.echo(f"wrote {path}")


@app.command("config-doc")
def config_doc():
    """Print the configuration reference (Markdown) generated from the config models."""
    from danceopd.config_doc import render

    sys.stdout.write(render())


@app.command("show-config")
def show_config(config: Path, set_: list[str] | None = SetOpt):
    """Print the fully-resolved config (defaults filled in) as JSON."""
    try:
        cfg = load_config(config, set_)
    except ConfigError as e:
        fail(str(e))
    sys.stdout.write(json.dumps(cfg.model_dump(mode="json"), indent=1) + "\n")


def main():  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
