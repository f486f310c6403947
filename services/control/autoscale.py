"""When to grow or shrink the rollout fleet: a plain, deterministic policy (no Ray, no clock).

The controller calls `observe(...)` once per learner step and applies the answer:

    +1  the learner idle ratio stayed above `learner_idle_above` for `window_steps` consecutive
        observations (the learner waits for data: rollouts are the bottleneck), the replay queue
        is not full, the cluster has room (`resources_free`) and the fleet is below the maximum
    -1  the replay queue stayed full (depth >= capacity) for `window_steps` consecutive
        observations (rollouts outpace the learner: a worker is wasted) and the fleet is above
        the minimum
     0  otherwise, and always for `cooldown_steps` learner steps after an action

After an action both windows start afresh, so the next decision sees the new fleet size only.
A fleet outside [min, max] (a worker that could not be restarted, a manual /scale) is moved
one step back toward the bounds, subject to the cooldown and, when growing, to free resources.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: no import cycle, no cost
    from danceopd.config import AutoscaleConfig


class AutoscalePolicy:
    def __init__(self, cfg: AutoscaleConfig):
        """`cfg`: an AutoscaleConfig (enabled, min/max_rollout_workers, learner_idle_above,
        window_steps, cooldown_steps)."""
        self.cfg = cfg
        self.idle_streak = 0
        self.full_streak = 0
        self.last_step: int | None = None
        self.last_action_step: int | None = None
        self.decisions: list[tuple[int, int, str]] = []  # (step, change, reason), for logs and tests

    def in_cooldown(self, step: int) -> bool:
        return self.last_action_step is not None and step - self.last_action_step < self.cfg.cooldown_steps

    def observe(self, step: int, learner_idle_ratio: float, replay_depth: int, replay_capacity: int,
                rollout_workers: int, resources_free: bool) -> int:
        """Desired change of the rollout fleet after learner step `step`: +1, -1 or 0."""
        cfg = self.cfg
        if not cfg.enabled:
            return 0
        if self.last_step is not None and step <= self.last_step:
            return 0  # one observation per learner step
        self.last_step = step
        full = replay_capacity > 0 and replay_depth >= replay_capacity
        idle = learner_idle_ratio > cfg.learner_idle_above and not full
        self.idle_streak = self.idle_streak + 1 if idle else 0
        self.full_streak = self.full_streak + 1 if full else 0
        if self.in_cooldown(step):
            return 0
        if rollout_workers < cfg.min_rollout_workers:
            return self._act(step, +1, "below min_rollout_workers") if resources_free else 0
        if rollout_workers > cfg.max_rollout_workers:
            return self._act(step, -1, "above max_rollout_workers")
        if self.full_streak >= cfg.window_steps and rollout_workers > cfg.min_rollout_workers:
            return self._act(step, -1, f"replay queue full for {self.full_streak} steps")
        if (self.idle_streak >= cfg.window_steps and resources_free
                and rollout_workers < cfg.max_rollout_workers):
            return self._act(step, +1, f"learner idle > {cfg.learner_idle_above:g} for {self.idle_streak} steps")
        return 0

    def _act(self, step: int, change: int, reason: str) -> int:
        self.last_action_step = step
        self.idle_streak = self.full_streak = 0
        self.decisions.append((step, change, reason))
        return change

    @property
    def last_reason(self) -> str | None:
        return self.decisions[-1][2] if self.decisions else None
