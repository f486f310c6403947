"""The `danceopd` command."""

from __future__ import annotations

import contextlib
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


def load_valid(config: Path, overrides: list[str] | None, local_paths: bool = True, cluster_paths=()) -> Config:
    """Config + full validation (data, files, prompts, model folders, ports, writable folders):
    one line and exit 2 on any error, never a traceback. `local_paths=False`: the job runs on
    another machine, so the folders it writes are not checked here; nor are the paths under
    `cluster_paths` prefixes this machine lacks (danceopd.validate.cluster_side)."""
    from rich.markup import escape

    try:
        from danceopd.validate import validate

        cfg = load_config(config, overrides)
        validate(cfg, local_paths=local_paths, cluster_paths=cluster_paths)
    except Exception as e:  # whatever validation raises ends as one line
        text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e).strip()
        msg = text.splitlines()[0] if text else ""
        if not isinstance(e, ValueError):
            msg = f"{config}: validation failed: {type(e).__name__}{': ' + msg if msg else ''}"
        fail(escape(msg))
    return cfg


@app.command()
def validate(
    config: Path,
    set_: list[str] | None = SetOpt,
    remote: bool = typer.Option(False, "--remote", help="The job runs on another machine (a cluster): do not check "
                                "here that the folders it writes (job.output_dir, replay.spill_dir) can be written, "
                                "nor that control.host / metrics_host resolve and bind (their form still is)."),
):
    """Check a config, its dataset buckets, images, prompts, model folders, ports and output folders (no weights are loaded)."""
    cfg = load_valid(config, set_, local_paths=not remote)
    typer.echo(f"ok: {config} — {len(cfg.routing.routes)} routes, {len(cfg.teachers)} teachers, method {cfg.method.name}")


@app.command()
def train(
    config: Path,
    mode: str = typer.Option("ray", help="`ray` (actors on a Ray cluster) or `local` (one process, the reference loop)."),
    address: str | None = typer.Option(None, help="Ray address to join (`auto`: a running cluster); default: start a local one."),
    resume: str | None = typer.Option(None, help="Checkpoint folder, or `auto` for the newest undamaged one of the run in job.output_dir."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start a new run in a job.output_dir that holds another run: its checkpoints and metrics move to job.output_dir/.overwritten-<time>/."),
    set_: list[str] | None = SetOpt,
    progress: bool = typer.Option(True, help="Show the live progress line."),
    profile: int | None = typer.Option(None, "--profile", min=0, help="Record torch.profiler traces of this many learner steps and rollout batches (after a warm-up) into job.output_dir/profile/ (sets logging.profile_steps)."),
):
    """Run a training job."""
    from danceopd.run_lock import lock_for
    from services.checkpoints import finished, prepare_output
    from services.telemetry.progress import print_summary

    if profile is not None:
        set_ = [*(set_ or []), f"logging.profile_steps={profile}"]
    cfg = load_valid(config, set_)
    if mode not in ("ray", "local"):
        fail(f"--mode: {mode!r} is not one of ray, local")
    lock = lock_for(cfg)  # a file, or an object on object storage
    try:  # one run per folder; a dead run's lock is taken over only to continue or replace its run
        lock.acquire(takeover=bool(resume or overwrite))
    except (ValueError, OSError) as e:  # RunLocked is a ValueError
        fail(str(e))
    try:  # released however the run ends; a killed driver's lock is stale once its pid is gone
        try:  # before anything starts: refuse to mix runs in one output_dir, or a tampered checkpoint
            ckpt, _run_id = prepare_output(cfg, resume, overwrite)
            done = ckpt and finished(cfg, ckpt)
        except (ValueError, OSError) as e:  # CheckpointError is a ValueError
            fail(str(e))
        lock.set_run_id(_run_id)
        if done:  # exit 0: a retried job whose run already ended has nothing left to do
            err.print(f"--resume: {done}", highlight=False, soft_wrap=True)
            return
        if resume and ckpt is None:
            where = cfg.job.output_dir if "://" in cfg.job.output_dir else cfg.output_path
            err.print(f"--resume auto: no checkpoint of this run in {where}, starting fresh")
        from services.loop import train as run_job
        from services.runtime.failures import RoleFailure

        try:
            summary = run_job(cfg, mode=mode, address=address, resume_from=ckpt, show_progress=progress, run_id=_run_id)
        except ConfigError as e:  # found once connected: what the cluster can never provide
            fail(str(e))
        except KeyboardInterrupt as e:
            fail(f"interrupted: {e}" if str(e) else "interrupted", 130)
        except Exception as e:  # noqa: BLE001 — one line here (a RoleFailure names the role), the rest in the logs
            from rich.markup import escape

            text = str(e).strip().splitlines()[0] if str(e).strip() else ""
            what = str(e) if isinstance(e, RoleFailure) else f"{type(e).__name__}{': ' + text if text else ''}"
            fail(escape(f"{what} (full log: {error_log(cfg, e)}{ray_logs(mode)})"), 1)
    finally:
        lock.release()
    print_summary(summary)


def error_log(cfg: Config, e: BaseException) -> Path:
    """The traceback of a failed job, in its output folder (moved aside by --overwrite)."""
    import traceback

    path = cfg.output_path / "error.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(traceback.format_exception(e)))
    from danceopd.remote_checkpoint import push

    with contextlib.suppress(Exception):  # the job failed already: its one line matters more
        push(cfg, "error.log", "metrics.jsonl")
    return path


def ray_logs(mode: str) -> str:
    if mode != "ray":
        return ""
    from services.runtime import cluster

    return f"; actor logs: {cluster.LOG_DIR}"


def comma_list(text: str) -> list[str]:
    """The non-empty, stripped items of a comma-separated option."""
    return [item.strip() for item in text.split(",") if item.strip()]


@app.command("make-data")
def make_data(
    kind: str = typer.Argument(..., help="`toy` or `shapes`."),
    out: Path = typer.Option(..., help="Output folder (data.csv + images/)."),
    n_per_task: int = typer.Option(64, help="Samples per task."),
    seed: int = typer.Option(0),
    tasks: str = typer.Option("t2i,local_edit,global_edit", help="Comma-separated tasks."),
    num_classes: int = typer.Option(4, help="toy: prompt classes."),
    image_size: int = typer.Option(16, help="shapes: image side."),
    partial_t2i: float = typer.Option(0.0, help="shapes: fraction of t2i prompts leaving position and/or background free."),
    heldout: int = typer.Option(0, help="shapes: held-out examples per task, written to heldout.csv (unseen in data.csv)."),
    t2i_free: str = typer.Option("position,background", help="shapes: what a partly specified t2i prompt may leave free."),
):
    """Write a procedural dataset (toy vectors or ShapesBench images)."""
    task_list = comma_list(tasks)
    if kind == "toy":
        from danceopd.dataset import write_toy_dataset

        path = write_toy_dataset(out, task_list, num_classes, n_per_task)
    elif kind == "shapes":
        from danceopd.shapes_world import write_shapes_dataset

        try:
            path = write_shapes_dataset(out, n_per_task, seed, image_size=image_size, tasks=tuple(task_list),
                                        partial_t2i=partial_t2i, heldout=heldout,
                                        t2i_free=tuple(comma_list(t2i_free)))
        except ValueError as e:
            fail(f"make-data: {e}")
    else:
        fail(f"make-data: unknown kind {kind!r} (toy, shapes)")
    typer.echo(f"wrote {path}")


@app.command("make-tiny")
def make_tiny(
    family: str = typer.Argument(..., help="`sd3` or `zimage`."),
    out: Path = typer.Option(..., help="Pipeline folder to write (model_index.json, transformer/, vae/, text encoders, tokenizers, scheduler/)."),
    seed: int = typer.Option(0, help="Seed of the random weights."),
    loras: str = typer.Option("realism,style", help="Comma-separated names of random LoRA folders written to OUT/loras/NAME ('' for none)."),
    layers: int = typer.Option(2, min=1, max=64, help="sd3: transformer blocks (a GPU smoke test: 12)."),
    heads: int = typer.Option(2, min=1, max=64, help="sd3: attention heads (a GPU smoke test: 16)."),
    head_dim: int = typer.Option(8, min=4, max=256, help="sd3: attention head width (a GPU smoke test: 64)."),
):
    """Write a tiny random diffusers pipeline of the real classes, to smoke-test a cluster before downloading weights."""
    from danceopd.backends import backend_class, backends_where

    tiny = backends_where(lambda c: c.write_tiny is not None)
    if family not in tiny:
        fail(f"make-tiny: unknown family {family!r} ({', '.join(tiny)})")
    write = backend_class(family).write_tiny
    if (out / "model_index.json").exists():
        fail(f"--out: {out} already holds a pipeline; remove it or pick another folder")
    from danceopd.backends.latent import write_tiny_loras

    path = write(out, seed=seed, layers=layers, heads=heads, head_dim=head_dim)
    names = comma_list(loras)
    write_tiny_loras(path, names, seed=seed)
    typer.echo(f"wrote {path}" + (f" (+ LoRA folders {', '.join(names)} in {path / 'loras'})" if names else ""))


@app.command("cache")
def cache(config: Path, set_: list[str] | None = SetOpt,
          force: bool = typer.Option(False, "--force", help="Rebuild even if a cache with the current fingerprint exists."),
          mode: str = typer.Option("local", help="`local` (encode in this process) or `ray` (in an actor with the rollout role's placement, on a worker node)."),
          address: str | None = typer.Option(None, help="--mode ray: Ray address to join (`auto`: a running cluster); default: start a local one.")):
    """Encode every dataset row once (text embeddings, source and target latents) into the condition cache (sd3, zimage)."""
    from danceopd.backends import backend_class, backends_where
    from services.conditions import build_condition_cache

    cfg = load_valid(config, set_)
    if mode not in ("ray", "local"):
        fail(f"--mode: {mode!r} is not one of ray, local")
    if not backend_class(cfg.backend.name).condition_cache:
        fail(f"backend.name: {cfg.backend.name} has no condition cache ({', '.join(backends_where(lambda c: c.condition_cache))})")
    started = False
    if mode == "ray":
        from services.runtime.cluster import connect

        started = connect(cfg, address)
    from rich.markup import escape

    from services.runtime.failures import RoleFailure

    try:
        path, built = build_condition_cache(cfg, progress=True, force=force, mode=mode)
    except ConfigError as e:  # found once connected: what the cluster can never provide
        fail(escape(str(e)))
    except RoleFailure as e:  # the builder actor failed: one line naming it
        fail(escape(str(e)), 1)
    finally:
        if started:
            import ray

            ray.shutdown()
    typer.echo(f"{'built' if built else 'up to date'}: {path}")


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


# ---- a checkpoint's student: sample / eval (danceopd/evaluate.py) ---------------------------------------

CkptConfigOpt = typer.Option(None, "--config", help="The job's config (default: the checkpoint's own config.yaml).")


@contextlib.contextmanager
def local_checkpoint(arg: str):
    """A command's checkpoint argument as a folder: itself, or for the URI of one on object
    storage (s3://, gs://, file://) a verified download in a temporary folder, removed after."""
    from danceopd.storage import is_uri

    if not is_uri(arg):
        yield Path(arg)
        return
    import tempfile

    from danceopd.checkpoint import CheckpointError
    from danceopd.remote_checkpoint import fetch_uri

    with tempfile.TemporaryDirectory(prefix="danceopd-checkpoint-") as tmp:
        try:
            path = fetch_uri(arg, Path(tmp), what="checkpoint")
        except (FileNotFoundError, CheckpointError, OSError, ValueError) as e:
            text = str(e).splitlines()[0] if str(e) else type(e).__name__
            fail(text if text.startswith(f"checkpoint {arg}") else f"checkpoint {arg}: {text}")
        yield path


CkptArg = typer.Argument(..., metavar="CHECKPOINT", help="A checkpoint folder (job.output_dir/checkpoints/step-NNNNNNNN) or its s3:// / gs:// / "
                         "file:// URI, of either mode, full or LoRA.")


def checkpoint_config(checkpoint: Path, config: Path | None, overrides: list[str] | None) -> Config:
    """The config a checkpoint was trained with (its config.yaml), or `--config`; one line on error."""
    if not (checkpoint / "model.safetensors").is_file():
        fail(f"{checkpoint}: not a checkpoint folder (no model.safetensors)")
    source = config or checkpoint / "config.yaml"
    if not source.is_file():
        fail(f"{checkpoint}: holds no config.yaml (an older checkpoint): pass the job's config with --config")
    try:
        return load_config(source, overrides)
    except ConfigError as e:
        fail(str(e))


def one_line(what: str, e: Exception):
    from rich.markup import escape

    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e).strip()
    text = text.splitlines()[0] if text else ""
    fail(escape(f"{what}: {text}" if isinstance(e, ValueError) else f"{what}: {type(e).__name__}{': ' + text if text else ''}"))


@app.command("sample")
def sample_images(
    ctx: typer.Context,
    checkpoint_arg: str = CkptArg,
    route: str = typer.Option(..., "--route", help="Route whose task the prompt belongs to."),
    prompt: str = typer.Option(..., "--prompt", help="The prompt."),
    source: Path | None = typer.Option(None, "--source", help="Source image of an edit route."),
    n: int = typer.Option(8, "--n", help="Images to sample (seeds SEED .. SEED+n-1)."),
    out: Path = typer.Option(..., "--out", help="Folder for the PNGs and samples.json."),
    seed: int = typer.Option(0, "--seed", help="Seed of the first image's noise."),
    config: Path | None = CkptConfigOpt,
    set_: list[str] | None = SetOpt,
):
    """Sample images from a checkpoint's student with its full ODE (the rollouts' grid and guidance)."""
    from danceopd.backends.base import Row
    from danceopd.evaluate import load_student, sample
    from danceopd.flow import job_sigmas
    from danceopd.pictures import save_png, to_rgb
    from services.checkpoints import student_weights

    checkpoint = ctx.with_resource(local_checkpoint(checkpoint_arg))
    cfg = checkpoint_config(checkpoint, config, set_)
    try:
        r = cfg.route(route)
    except ConfigError as e:
        fail(f"--route: {e}")
    if not 1 <= n <= 4096:
        fail(f"--n: {n} is not in 1..4096")
    if not 0 <= seed <= 2**62:
        fail(f"--seed: {seed} is not in 0..2**62")
    if source is not None and not source.is_file():
        fail(f"--source: {source} does not exist")
    if source is None and r.requires_source_image:
        fail(f"--source: route {route!r} edits an image; give the source image")
    row = Row(uid="cli-sample", task=r.task, prompt=prompt, source_image=source and source.resolve())
    seeds = [seed + i for i in range(n)]
    try:
        backend, model = load_student(cfg, student_weights(cfg, checkpoint))
        images = sample(backend, model, [row] * n, seeds, job_sigmas(cfg, backend), cfg.method.rollout_cfg_scale)
        files = [save_png(to_rgb(x), out / f"{route}-{i:03d}.png").name for i, x in enumerate(images)]
    except Exception as e:  # noqa: BLE001 — bad prompt, source image, model folder ... one line
        one_line("sample", e)
    (out / "samples.json").write_text(json.dumps({"checkpoint": checkpoint_arg, "route": route, "prompt": prompt,
                                                  "source": source and str(source), "seeds": seeds, "files": files}, indent=1))
    typer.echo(f"wrote {n} images to {out} (route {route}, seeds {seeds[0]}..{seeds[-1]})")


@app.command("eval")
def evaluate_checkpoint(
    ctx: typer.Context,
    checkpoint_arg: str = CkptArg,
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON."),
    out: Path | None = typer.Option(None, "--out", help="Also write the PNG grid of each route here."),
    config: Path | None = CkptConfigOpt,
    set_: list[str] | None = SetOpt,
):
    """Evaluate a checkpoint's student the way training does (eval.* of its config): the per-route metrics table."""
    from danceopd.checkpoint import load_json, load_tensors
    from danceopd.evaluate import Evaluator
    from danceopd.pictures import save_png
    from services.checkpoints import student_weights

    checkpoint = ctx.with_resource(local_checkpoint(checkpoint_arg))
    cfg = checkpoint_config(checkpoint, config, set_)
    try:
        step = int(load_json(checkpoint / "state.json").get("step", -1)) if (checkpoint / "state.json").is_file() else -1
        weights = load_tensors(student_weights(cfg, checkpoint))  # before the evaluator builds anything
        result = Evaluator(cfg).evaluate(weights, step)
    except Exception as e:  # noqa: BLE001 — data, model folder, weights of another config ... one line
        one_line("eval", e)
    for route, grid in result["grids"].items() if out else ():
        save_png(grid, out / f"{route}.png")
    if as_json:
        typer.echo(json.dumps({"checkpoint": checkpoint_arg, "step": step, "seconds": result["seconds"],
                               "routes": result["routes"]}))
        return
    names = list(dict.fromkeys(k for m in result["routes"].values() for k in m))
    width = max(len(r) for r in result["routes"]) + 2
    typer.echo(f"{checkpoint_arg} (step {step}): {cfg.eval.prompts} prompts per route, {result['seconds']:.2f} s")
    typer.echo("route".ljust(width) + "".join(k.rjust(14) for k in names))
    for route, m in result["routes"].items():
        typer.echo(route.ljust(width) + "".join((f"{m[k]:.4f}" if k in m else "-").rjust(14) for k in names))


@app.command("export")
def export_checkpoint(
    ctx: typer.Context,
    checkpoint_arg: str = CkptArg,
    out: Path = typer.Option(..., "--out", help="Folder to write: a diffusers pipeline (sd3, zimage), a model folder (shapes)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it is not empty."),
    dtype: str = typer.Option("auto", "--dtype", help="The exported transformer's weights: auto (as the base's), float32, bfloat16, float16."),
    lora_only: bool = typer.Option(False, "--lora-only", help="A LoRA student on the base: write only OUT/lora, not the merged pipeline."),
    config: Path | None = CkptConfigOpt,
    set_: list[str] | None = SetOpt,
):
    """Write a checkpoint's student for diffusers: the job's base pipeline with the student's transformer merged in
    (+ lora/ for a LoRA student), or the student's model folder (shapes). danceopd/export.py."""
    from danceopd.export import check_checkpoint, export
    from services.checkpoints import student_weights

    checkpoint = ctx.with_resource(local_checkpoint(checkpoint_arg))
    try:
        check_checkpoint(checkpoint)
    except ValueError as e:
        one_line("export", e)
    cfg = checkpoint_config(checkpoint, config, set_)
    try:
        weights = student_weights(cfg, checkpoint)  # `--set eval.weights=ema`: the EMA
        typer.echo(export(cfg, checkpoint, out, overwrite=overwrite, dtype=dtype, lora_only=lora_only,
                          weights=weights).summary())
    except Exception as e:  # noqa: BLE001 — a missing base pipeline, a full disk ... one line
        one_line("export", e)


# ---- cluster jobs: submit / status / scale / stop (services/control/jobs.py) ----------------------------

# The cluster commands (submit, status, scale, stop, ctl) register on `app` from their module.
from services import cli_jobs  # noqa: E402,F401


def main():  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
