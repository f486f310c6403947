"""RolloutWorker: an inference copy of the student that turns work orders into RolloutBatches.

Plain class; the Ray runtime deploys it as an actor. Weights change only between batches
(`set_weights`), so no sample spans two policy versions. A rollout lives on the student's device
(a GPU's): the noise goes there once, every Euler step stays there, and the rows of the batch
come back to the host once, at the end.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import torch

from danceopd.backends import make_backend
from danceopd.batch import batch_schema, make_batch
from danceopd.device import model_device, peak_gpu_memory_bytes
from danceopd.flow import forward_noise, guided_velocity, integrate, job_sigmas
from danceopd.lora import load_trainable_state_dict
from danceopd.methods import make_method
from danceopd.profiling import CallProfiler
from danceopd.work import WorkOrder

if TYPE_CHECKING:  # annotations only: no import cycle, no cost
    from danceopd.config import Config


class RolloutWorker:
    def __init__(self, cfg: Config, worker_id: str = "rollout-0"):
        self.cfg = cfg
        self.worker_id = worker_id
        self.backend = make_backend(cfg)
        self.model = self.backend.build_student(cfg.student_source(), cfg.job.seed)
        self.model.eval()  # trainable flags stay: they define which weights a push carries
        self.device = model_device(self.model)
        self.version = 0
        self.method = make_method(cfg.method)
        self.schema = batch_schema(self.backend.state_shape, self.backend.cond_dim, sde=self.method.rollout == "sde")
        self.sigmas = job_sigmas(cfg, self.backend)
        # nfe_full: what the same samples would cost without stopping each at its last needed state
        self.stats = {"batches": 0, "samples": 0, "nfe": 0, "nfe_full": 0, "busy_s": 0.0}
        # `logging.profile_steps`: worker 0 traces a few batches (the meta carries them to the driver)
        self.profiler = CallProfiler(cfg.logging.profile_steps if worker_id == "rollout-0" else 0)

    # ---- weights ------------------------------------------------------------------------
    def set_weights(self, state_dict: dict, version: int) -> int:
        load_trainable_state_dict(self.model, state_dict)
        self.version = int(version)
        return self.version

    def get_version(self) -> int:
        return self.version

    def get_stats(self) -> dict:
        return {**self.stats, "peak_gpu_memory_bytes": peak_gpu_memory_bytes()}

    # ---- rollout ------------------------------------------------------------------------
    def _velocity(self, z, sigma, cond):
        return guided_velocity(lambda *a: self.backend.predict(self.model, *a), self.backend.null_cond, z, sigma, cond,
                               self.cfg.method.rollout_cfg_scale)

    def _drop_text(self, cond: torch.Tensor, seeds: list[int], p: float) -> torch.Tensor:
        """Condition dropout, seeded per sample: the text goes, an edit's source image stays."""
        drop = torch.tensor([np.random.default_rng([s, 0xD0]).random() < p for s in seeds])
        if drop.any():
            cond = cond.clone()
            cond[drop] = self.backend.null_cond(cond[drop])
        return cond

    def _trajectory(self, method, z, cond, seeds, idx):
        """Student rollout with the one integrator; each sample stops at its last needed state."""
        n = self.cfg.method.rollout_steps
        until = [method.steps_needed(i, n, self.cfg.rollout.early_stop) for i in idx]
        eta = noise = None
        if method.rollout == "sde":
            eta, noise = self.cfg.method.flowopd_eta, self._sde_noise(seeds, until, z.shape[1:])
        z, cond = z.to(self.device), self.backend.conditions_on(cond, self.device)
        traj = integrate(lambda za, sig, active: self._velocity(za, sig, cond[active]), z, self.sigmas, until, eta, noise)
        passes = 1 if self.cfg.method.rollout_cfg_scale == 1 else 2
        self.stats["nfe"] += traj.nfe * passes
        self.stats["nfe_full"] += len(seeds) * method.steps_needed(np.arange(n), n, early_stop=False) * passes
        return traj

    def _sde_noise(self, seeds: list[int], until: list[int], shape) -> Callable:
        """`noise(step, active)` of an SDE rollout: each sample's noise for all its steps, drawn up
        front from its own generator (the numbers a draw per step would give) and moved to the
        device once."""
        gens = [torch.Generator().manual_seed(s ^ 0x5DEECE66D) for s in seeds]
        drawn = torch.zeros(len(seeds), max(until, default=0), *shape)
        for b, g in enumerate(gens):
            for i in range(until[b]):
                drawn[b, i] = torch.randn(shape, generator=g)
        drawn = drawn.to(self.device)
        return lambda i, active: torch.stack([drawn[a, i] for a in active.tolist()])

    def rollout(self, order: WorkOrder) -> pa.RecordBatch:
        with self.profiler(f"{self.worker_id}-batch{self.stats['batches'] + 1:06d}"):
            return self._rollout(order)

    @torch.no_grad()
    def _rollout(self, order: WorkOrder) -> pa.RecordBatch:
        t0 = time.perf_counter()
        method, n, sig = self.method, self.cfg.method.rollout_steps, self.sigmas
        items = order.items
        rows = [it.row for it in items]
        seeds = [it.seed for it in items]
        cond = self.backend.encode(rows)
        if method.text_dropout() > 0:
            cond = self._drop_text(cond, seeds, method.text_dropout())
        z = self.backend.noise(seeds)
        idx = [method.queried(n, s) for s in seeds]
        if method.rollout == "data":  # no rollout: forward-noise the dataset targets
            x0 = self.backend.data_target(rows)
            target = method.data_target(x0, z)
        else:
            traj = self._trajectory(method, z, cond, seeds, idx)

        cols = {k: [] for k in ("sample_id", "sample_index", "route", "task", "seed", "query_index", "sigma",
                                "sigma_next", "weight", "group", "state", "next_state", "target", "rollout_velocity")}
        for j, it in enumerate(items):
            weights = method.row_weights(idx[j], sig)
            for i, w in zip(idx[j].tolist(), weights, strict=True):
                cols["sample_id"].append(it.row.uid)
                cols["sample_index"].append(it.sample_index)
                cols["route"].append(it.route)
                cols["task"].append(it.row.task)
                cols["seed"].append(it.seed)
                cols["query_index"].append(i)
                cols["sigma"].append(float(sig[i]))
                cols["sigma_next"].append(float(sig[i + 1]))
                cols["group"].append(it.group)
                cols["weight"].append(w)
                if method.rollout == "data":
                    cols["state"].append(forward_noise(x0[j], z[j], sig[i]))
                    cols["target"].append(target[j])
                else:  # the target is the teacher's to fill; next state and velocity only SDE rows carry
                    cols["state"].append(traj.states[i][j])
                    if method.rollout == "sde":
                        cols["next_state"].append(traj.states[i + 1][j])
                        cols["rollout_velocity"].append(traj.velocities[i][j])
        conds = cond[[j for j in range(len(items)) for _ in idx[j]]]
        n_rows = len(cols["sample_id"])
        for k in ("state", "next_state", "target", "rollout_velocity"):
            # to the host once per column; a column without rows is left to make_batch (zeros)
            cols[k] = torch.stack(cols[k]).cpu() if cols[k] else None
        cols["cond"] = conds
        cols["policy_version"] = [self.version] * n_rows
        cols["ticket"] = [order.ticket] * n_rows
        cols["worker_id"] = [self.worker_id] * n_rows
        cols["teacher_id"] = [""] * n_rows
        rb = make_batch(self.schema, cols)
        self.backend.simulated_compute("rollout")
        self.stats["batches"] += 1
        self.stats["samples"] += len(items)
        self.stats["busy_s"] += time.perf_counter() - t0
        return rb
