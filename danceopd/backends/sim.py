"""`sim`: the toy backend's analytic fields plus a configured latency per role.

Capacity planning and scale tests run the real actors, router, replay queue, learner ranks and
weight pushes with small real tensors; the GPU time each role would spend is stood in for by a
sleep (`backend.rollout_latency_s` per rollout batch, `teacher_latency_s` per teacher query call,
`learner_latency_s` per learner micro-batch, `load_latency_s` per model built). A sleep holds
no CPU, so one small machine can simulate a fleet of dozens of GPU workers and show where the pipeline itself stops scaling.
`teacher_nan_from` makes the teachers answer NaN (the non-finite guard's fault injection).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from danceopd.backends.base import TeacherField
from danceopd.backends.toy import ToyBackend
from danceopd.config import SimBackendConfig

if TYPE_CHECKING:  # annotations only: no import cycle, no cost
    from danceopd.config import Config


class NanFault(TeacherField):
    """A teacher field that answers NaN on its calls `start` .. `start + calls - 1` (1-based;
    `calls` 0: every call from `start` on): the non-finite guard's fault injection."""

    def __init__(self, field, start: int, calls: int):
        self.field, self.start, self.calls, self.n = field, start, calls, 0

    def velocity(self, z, sigma, cond):
        self.n += 1
        v = self.field.velocity(z, sigma, cond)
        faulty = self.n >= self.start and (not self.calls or self.n < self.start + self.calls)
        return torch.full_like(v, float("nan")) if faulty else v


class SimBackend(ToyBackend):
    name = "sim"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        b: SimBackendConfig = cfg.backend
        self.latency = {"rollout": b.rollout_latency_s, "teacher": b.teacher_latency_s, "learner": b.learner_latency_s}
        self.load_s = b.load_latency_s

    def build_student(self, init: str, seed: int):
        time.sleep(self.load_s)
        return super().build_student(init, seed)

    def build_teacher(self, teacher_cfg, base_dir):
        time.sleep(self.load_s)
        field = super().build_teacher(teacher_cfg, base_dir)
        b: SimBackendConfig = self.cfg.backend
        return NanFault(field, b.teacher_nan_from, b.teacher_nan_calls) if b.teacher_nan_from else field

    def simulated_compute(self, role: str) -> None:
        seconds = self.latency[role]
        if seconds > 0:
            time.sleep(seconds)
