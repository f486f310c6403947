"""TensorBoard (`logging.tensorboard: true`): the job's scalars and sample grids as event files in
job.output_dir/tensorboard, through torch.utils.tensorboard. View with
`tensorboard --logdir <output_dir>/tensorboard`."""

from __future__ import annotations

from pathlib import Path


class Board:
    def __init__(self, folder: Path, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.folder = Path(folder)
        # A resumed run replaces what an earlier run logged after its checkpoint.
        self.writer = SummaryWriter(str(self.folder), purge_step=purge_step or None)

    def step(self, step: int, metrics: dict, samples_per_s: float, lag: int, learner_idle: float,
             syncs: list[dict]) -> None:
        add = self.writer.add_scalar
        add("loss/all", metrics["loss"], step)
        for route, loss in metrics.get("route_loss", {}).items():
            add(f"loss/{route}", loss, step)
        add("learner/grad_norm", metrics["grad_norm"], step)
        add("learner/lr", metrics["lr"], step)
        add("throughput/samples_per_s", samples_per_s, step)
        add("lag/last", lag, step)
        add("idle/learner", learner_idle, step)
        for s in syncs:
            add("sync/seconds", s["seconds"], step)

    def evaluated(self, result: dict) -> None:
        step = result["step"]
        for route, metrics in result["routes"].items():
            for name, value in metrics.items():
                self.writer.add_scalar(f"eval/{route}/{name}", value, step)
        self.writer.add_scalar("eval/seconds", result["seconds"], step)
        for route, grid in result["grids"].items():
            self.writer.add_image(f"samples/{route}", grid, step, dataformats="HWC")

    def idle(self, step: int, idle: dict[str, float]) -> None:
        """Idle ratio of every role over the whole job (at its end)."""
        for role, value in idle.items():
            self.writer.add_scalar(f"idle/{role}_job", value, step)

    def close(self) -> None:
        self.writer.close()
