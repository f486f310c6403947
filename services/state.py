"""`LoopState`: what the training loop is, as one snapshot that telemetry and checkpoints read
(they never reach into the loop, its pipeline or its fleet)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class FleetView:
    counts: dict[str, int]  # rollout, learner, teacher
    teacher_counts: dict[str, int]  # route -> replicas
    restarts: dict[str, int]
    failures: dict[str, int]
    pending: dict[str, int]


@dataclass(frozen=True)
class LoopState:
    step: int  # learner steps done = the weight version
    state: str  # starting | running | stopping | done | failed
    mode: str
    run_id: str | None
    learner_kind: str
    per_step: int  # batches per learner step
    lag_last: int
    lag_max: int
    learner_busy_s: float
    last_checkpoint: str | None
    stopped_by: str | None
    accounting: dict  # the pipeline's sample accounting
    replay: dict  # the replay queue: depth, capacity, dropped, lag_counts, max_lag_seen
    batches: dict  # issued, in_flight, queued
    last_lags: tuple[int, ...]  # lag of each batch of the last step
    fleet: FleetView
    syncs: list[dict]  # every weight push recorded so far (the sync's own list: read, never change)
    learner_failed: str | None = None
    nonfinite: dict = field(default_factory=dict)  # role -> route -> NaN/Inf batches dropped (teacher) / steps skipped (learner)
    evaluation: dict | None = field(default=None)  # where, skipped, failed (None: evaluation off)
