"""`sim`: the toy backend's analytic fields plus a configured latency per role.

Capacity planning and scale tests run the real actors, router, replay queue, learner ranks and
weight pushes with small real tensors; the GPU time each role would spend is stood in for by a
sleep (`backend.rollout_latency_s` per rollout batch, `teacher_latency_s` per teacher query call,
`learner_latency_s` per learner micro-batch, `load_latency_s` per model built). A sleep holds no CPU, so one small machine can
simulate a fleet of dozens of GPU workers and show where the pipeline itself stops scaling.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from danceopd.backends.toy import ToyBackend
from danceopd.config import SimBackendConfig

if TYPE_CHECKING:  # annotations only: no import cycle, no cost
    from danceopd.config import Config


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
        return super().build_teacher(teacher_cfg, base_dir)

    def simulated_compute(self, role: str) -> None:
        seconds = self.latency[role]
        if seconds > 0:
            time.sleep(seconds)
