"""Experiment trackers: the job's scalars and sample grids, besides metrics.jsonl and Prometheus.

    logging.tensorboard    TensorBoard event files in job.output_dir/tensorboard
                           (`tensorboard --logdir <output_dir>/tensorboard`)
    logging.mlflow_uri     an MLflow run in a file store or on a tracking server: run name = the
                           job's run_id (a resume continues the run), params = the flattened
                           config (once), sample grids as artifacts <tag>/step-NNNNNNNN.png
    logging.wandb          a W&B run, only where the wandb package and WANDB_API_KEY are there

Every tracker gets the same values under the same tags: Telemetry names them once
(`step_scalars`, `eval_scalars`), `Trackers` hands them to each. All of it runs in the driver,
in both modes. A tracker that fails mid-job is dropped with one line: tracking is not worth the job.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from danceopd.config import ConfigError
from danceopd.validate import MLFLOW_MISSING

if TYPE_CHECKING:  # annotations only: no import cycle, no cost
    from rich.console import Console

    from danceopd.config import Config

RUN_TAG = "danceopd.run_id"  # the MLflow tag that finds a run again on resume


class Tracker(Protocol):
    def scalars(self, step: int, values: dict[str, float]) -> None: ...

    def image(self, tag: str, step: int, image: np.ndarray) -> None:
        """`image`: uint8 [H, W, 3]."""

    def close(self, status: str = "FINISHED") -> None:
        """`status`: FINISHED, FAILED or KILLED (the run's end, where the tracker keeps one)."""


# ---- what is tracked: one set of tags for every tracker ---------------------------------------
def step_scalars(metrics: dict, samples_per_s: float, lag: int, learner_idle: float, syncs: list[dict]) -> dict[str, float]:
    out = {"loss/all": metrics["loss"], **{f"loss/{r}": v for r, v in metrics.get("route_loss", {}).items()},
           "learner/grad_norm": metrics["grad_norm"], "learner/lr": metrics["lr"],
           "throughput/samples_per_s": samples_per_s, "lag/last": lag, "idle/learner": learner_idle}
    if syncs:  # the weight pushes finished since the last step
        out["sync/seconds"] = sum(s["seconds"] for s in syncs) / len(syncs)
    return out


def eval_scalars(result: dict) -> dict[str, float]:
    out = {f"eval/{route}/{name}": v for route, metrics in result["routes"].items() for name, v in metrics.items()}
    out["eval/seconds"] = result["seconds"]
    return out


def flat_params(cfg: Config) -> dict[str, str]:
    """The resolved config as {dotted key: value text} (lists by index: teachers.0.name)."""
    out: dict[str, str] = {}

    def walk(key: str, v) -> None:
        if isinstance(v, dict) and v:
            for k, x in v.items():
                walk(f"{key}.{k}" if key else str(k), x)
        elif isinstance(v, list) and v:
            for i, x in enumerate(v):
                walk(f"{key}.{i}", x)
        else:
            out[key] = v if isinstance(v, str) else json.dumps(v)

    walk("", cfg.model_dump(mode="json"))
    return out


# ---- the trackers -----------------------------------------------------------------------------
class TensorBoardTracker:
    def __init__(self, folder: Path, purge_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.folder = Path(folder)
        # A resumed run replaces what an earlier run logged after its checkpoint.
        self.writer = SummaryWriter(str(self.folder), purge_step=purge_step or None)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def image(self, tag: str, step: int, image: np.ndarray) -> None:
        self.writer.add_image(tag, image, step, dataformats="HWC")

    def close(self, status: str = "FINISHED") -> None:
        self.writer.close()


def mlflow_uri(uri: str) -> str:
    """A folder (relative: from the current one, like job.output_dir) as a file:// URI; a URI as is."""
    return uri if "://" in uri else Path(uri).expanduser().absolute().as_uri()


class MlflowTracker:
    """One MLflow run through `MlflowClient` (no global active run in the driver)."""

    def __init__(self, uri: str, experiment: str, run_id: str, params: dict[str, str]):
        self.uri = mlflow_uri(uri)
        # MLflow 3 reports usage to its makers unless told not to: a job's driver does not.
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        if self.uri.startswith("file:"):
            # MLflow 3 keeps its file store in maintenance mode behind this switch; a folder is
            # what a run without a server has (`mlflow ui` needs the same variable to read it).
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        try:
            from mlflow.entities import Metric, Param
            from mlflow.tracking import MlflowClient
            from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH
        except ImportError:
            raise ConfigError(MLFLOW_MISSING) from None
        self._metric = Metric
        self.client = client = MlflowClient(tracking_uri=self.uri)
        try:
            exp = client.get_experiment_by_name(experiment)
            self.experiment_id = exp.experiment_id if exp else client.create_experiment(experiment)
            found = client.search_runs([self.experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{run_id}'", max_results=1)
            if found:  # a resume: the same run goes on (its params are logged already, and fixed)
                self.run_id = found[0].info.run_id
                client.update_run(self.run_id, status="RUNNING")
            else:
                self.run_id = client.create_run(self.experiment_id, run_name=run_id, tags={RUN_TAG: run_id}).info.run_id
                items = [Param(k, v[:MAX_PARAM_VAL_LENGTH]) for k, v in params.items()]
                for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
                    client.log_batch(self.run_id, params=items[i:i + MAX_PARAMS_TAGS_PER_BATCH])
        except Exception as e:  # noqa: BLE001 — a store or server that does not answer: one line
            text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"logging.mlflow_uri: cannot open an MLflow run at {self.uri}: {text}") from None

    def scalars(self, step: int, values: dict[str, float]) -> None:
        ms = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self._metric(k, float(v), ms, step) for k, v in values.items()])

    def image(self, tag: str, step: int, image: np.ndarray) -> None:
        self.client.log_image(self.run_id, image, artifact_file=f"{tag}/step-{step:08d}.png")

    def close(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)


class WandbTracker:
    def __init__(self, wandb, project: str, run_id: str, params: dict[str, str], folder: Path):
        self.wandb = wandb
        folder.mkdir(parents=True, exist_ok=True)
        # id = the job's run_id: a resume continues the same W&B run.
        self.run = wandb.init(project=project, id=run_id, name=run_id, resume="allow", config=params, dir=str(folder))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def image(self, tag: str, step: int, image: np.ndarray) -> None:
        self.run.log({tag: self.wandb.Image(image)}, step=step)

    def close(self, status: str = "FINISHED") -> None:
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)


def open_wandb(cfg: Config, run_id: str, console: Console) -> WandbTracker | None:
    """The W&B tracker, or None after one warning line: W&B is never required."""
    try:
        import wandb
    except ImportError:
        console.print("[yellow]logging.wandb: the wandb package is not installed; logging to W&B is skipped[/]")
        return None
    if not os.environ.get("WANDB_API_KEY"):
        console.print("[yellow]logging.wandb: WANDB_API_KEY is not set; logging to W&B is skipped[/]")
        return None
    project = cfg.job.name if cfg.logging.wandb is True else str(cfg.logging.wandb)
    return WandbTracker(wandb, project, run_id, flat_params(cfg), cfg.output_path)


# ---- all of them ------------------------------------------------------------------------------
class Trackers:
    """The job's trackers by name; each call goes to every one, and one that raises is dropped."""

    def __init__(self, trackers: dict[str, Tracker], console: Console):
        self.trackers, self.console = dict(trackers), console

    @classmethod
    def open(cls, cfg: Config, start_step: int, run_id: str, console: Console) -> Trackers:
        lc, out = cfg.logging, {}
        try:
            if lc.tensorboard:
                out["tensorboard"] = TensorBoardTracker(cfg.output_path / "tensorboard", start_step)
            if lc.mlflow_uri:
                out["mlflow"] = MlflowTracker(lc.mlflow_uri, lc.mlflow_experiment or cfg.job.name, run_id, flat_params(cfg))
            if lc.wandb is not False and (w := open_wandb(cfg, run_id, console)) is not None:
                out["wandb"] = w
        except BaseException:
            cls(out, console).close("FAILED")
            raise
        return cls(out, console)

    def get(self, name: str) -> Tracker | None:
        return self.trackers.get(name)

    def _each(self, call) -> None:
        for name, tracker in list(self.trackers.items()):
            try:
                call(tracker)
            except Exception as e:  # noqa: BLE001 — tracking is not worth the job
                del self.trackers[name]
                text = str(e).strip().splitlines()[0] if str(e).strip() else ""
                self.console.print(f"[yellow]tracking: {name} failed ({type(e).__name__}: {text}); "
                                   "it stops, the job goes on[/]", highlight=False, soft_wrap=True)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self._each(lambda t: t.scalars(step, values))

    def image(self, tag: str, step: int, image: np.ndarray) -> None:
        self._each(lambda t: t.image(tag, step, image))

    def close(self, status: str = "FINISHED") -> None:
        self._each(lambda t: t.close(status))
        self.trackers = {}
