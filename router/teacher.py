"""A frozen teacher: one velocity field, queried on stop-gradient states, with CFG absorbed.

Plain class; the Ray runtime deploys replicas of it as actors (one pool per teacher).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from danceopd.backends import make_backend
from danceopd.device import peak_gpu_memory_bytes
from danceopd.flow import cfg_combine

if TYPE_CHECKING:  # annotations only: no import cycle, no cost
    from danceopd.config import Config


class Teacher:
    def __init__(self, cfg: Config, teacher_name: str, replica: int = 0):
        self.cfg = cfg
        self.name = teacher_name
        self.teacher_id = f"{teacher_name}/{replica}"
        self.backend = make_backend(cfg)
        self.field = self.backend.build_teacher(cfg.teacher(teacher_name), cfg.resolve("."))
        # Shared-backbone LoRA teachers: each route's field is one adapter of this backbone.
        self.adapter_of = {r.name: r.adapter for r in cfg.routing.routes if r.teacher == teacher_name and r.adapter}
        self.stats = {"queries": 0, "rows": 0, "busy_s": 0.0}

    @torch.no_grad()
    def query(self, state, sigma, cond, cfg_scale: float, route: str = "") -> np.ndarray:
        """target = v(z,t,null) + a (v(z,t,c) - v(z,t,null)); one pass when a == 1. For edit
        routes the backend's null condition keeps the source image and drops only the text."""
        t0 = time.perf_counter()
        z, s, c = (torch.from_numpy(np.array(x, dtype=np.float32)) for x in (state, sigma, cond))
        if self.adapter_of:
            self.field.use(self.adapter_of[route])
        if cfg_scale == 1.0:
            v = self.field.velocity(z, s, c)
        else:
            both = self.field.velocity(torch.cat([z, z]), torch.cat([s, s]), torch.cat([self.backend.null_cond(c), c]))
            v_u, v_c = both.chunk(2)
            v = cfg_combine(v_u, v_c, cfg_scale)
        self.backend.simulated_compute("teacher")
        self.stats["queries"] += 1
        self.stats["rows"] += z.shape[0]
        self.stats["busy_s"] += time.perf_counter() - t0
        return v.float().numpy()

    def get_stats(self) -> dict:
        return {**self.stats, "peak_gpu_memory_bytes": peak_gpu_memory_bytes()}
