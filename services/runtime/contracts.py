"""The contracts between the training loop and a runtime (`local`, `ray`).

The loop (services/loop.py) talks to three parts and nothing else: a `Fleet` that turns work
orders into routed batches, a `LearnerGroup` that trains on them, and a `WeightSync` that moves
the learner's weights to the fleet. Both runtimes implement each one in full; a runtime that can
change its fleet while a job runs also implements `Elastic`. The pipeline's state (tickets,
routes, versions, replay contents, latest weights) is not part of any of them: it is the
driver's `RolloutPipeline`, which the parts are handed, never copy.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from danceopd.work import WorkOrder


class Fleet(Protocol):
    """Rollout workers, teacher pools and the scorer: orders in, routed batches (events) out."""

    mode: str  # "local" | "ray"

    def workers(self) -> list[str]:
        """Workers that may take an order now (placed, started, not draining)."""

    def worker_versions(self) -> dict[str, int]:
        """The weight version each started worker holds."""

    def submit(self, worker: str, orders: list[WorkOrder]) -> None:
        """Roll out `orders` on `worker` (one call for them all where calls cost), then score
        them; their events come from `poll`, one per order."""

    def poll(self, timeout: float, wake: list = ()) -> list:
        """Events since the last poll (runtime/events.py), waiting up to `timeout` for one (or for
        a ref in `wake`, e.g. a learner step that finished)."""

    def counts(self) -> dict[str, int]:
        """Members by role: rollout, learner, teacher."""

    def teacher_counts(self) -> dict[str, int]:
        """Teacher replicas serving each route."""

    def restarts(self) -> dict[str, int]:
        """Restarts by role (every role the runtime can restart; none in one process)."""

    def failures(self) -> dict[str, int]:
        """Member failures by role (deaths and missed deadlines)."""

    def pending_counts(self) -> dict[str, int]:
        """Members asked for and not yet placed, by role."""

    def busy_stats(self) -> dict[str, list[dict]]:
        """Per role, each member's statistics (`busy_s`, rollout `nfe`...), for idle ratios."""

    def shutdown(self) -> None: ...


@runtime_checkable
class Elastic(Protocol):
    """A fleet that grows and shrinks while the job runs (Ray mode)."""

    def scale(self, rollout_workers: int | None, teachers: dict[str, int]) -> list:
        """Ask for a fleet size; returns Joined events of members that started at once."""

    def can_grow(self) -> bool: ...

    def max_members(self, role: str) -> tuple[int, str] | None:
        """How many members of `role` the cluster can ever hold, and where that bound comes from
        (None: no bound known beyond the config's)."""

    def retire_drained(self, busy: set[str]) -> None:
        """Remove draining workers that hold no order any more."""


class LearnerGroup(Protocol):
    """The learner: one plain torch learner (local) or W DeepSpeed ranks (Ray). Algorithm-blind."""

    kind: str  # the optimizer-state layout of its checkpoints ("torch-adamw", "deepspeed")

    @property
    def busy(self) -> bool:
        """A step was started and has not been collected."""

    def pending(self) -> list:
        """What `Fleet.poll` may wake on while a step runs (refs; nothing in one process)."""

    def start_step(self, handles: list) -> None:
        """Train one step on these routed batches (handles in ticket order)."""

    def poll_step(self, deadline_s: float) -> dict | None:
        """The step's metrics once done, else None; a step past `deadline_s` is a RoleFailure."""

    def export(self) -> dict:
        """The trainable weights (ZeRO-3: gathered), as tensors in this process."""

    def export_ema(self) -> dict | None:
        """The EMA of the trainable weights (learner.ema_decay), as tensors in this process; None
        when off."""

    def load_ema(self, state: dict) -> None:
        """Replace the EMA (a checkpoint's, or the weights it restarts from); nothing when off."""

    def save(self, folder) -> list[str]:
        """Write this learner kind's own state into `folder`; return the names of the files a
        complete save holds there (every rank's), which the checkpoint checks before COMPLETE."""

    def load(self, folder, weights: dict) -> None:
        """Weights plus this learner kind's own state (optimizer, RNG)."""

    def load_weights(self, weights: dict) -> None: ...

    def set_version(self, version: int) -> None: ...

    def shutdown(self) -> None: ...


class WeightSync(Protocol):
    """Moves the learner's weights to the rollout workers and records each push."""

    records: list[dict]  # {version, seconds, transfer_s, wait_s, bytes} per completed push

    def push(self, version: int) -> None:
        """Publish `version`: the pipeline's latest weights, and every live worker told."""

    def poll(self, block: bool = False) -> None:
        """Check on pushes in progress; `block`: the job ends, settle them."""

    def applied(self, ev) -> None:
        """A worker reported it applied a version (events.Applied, from `Fleet.poll`)."""

    def fleet_changed(self) -> None:
        """Workers joined or left: bring joiners to the latest version."""

    def close(self) -> None: ...


class Evaluation(Protocol):
    """Evaluates the student's weights of a step (danceopd/evaluate.py), on or off the loop's path."""

    where: str
    skipped: int
    failed: str | None

    def submit(self, step: int, learner: LearnerGroup) -> None: ...

    def poll(self, wait_s: float = 0.0) -> list[dict]: ...

    def shutdown(self) -> None: ...
