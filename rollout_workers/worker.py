"""RolloutWorker: an inference copy of the student that turns work orders into RolloutBatches.

Plain class; the Ray runtime deploys it as an actor. Weights change only between batches
(`set_weights`), so no sample spans two policy versions.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import torch

from danceopd.backends import make_backend
from danceopd.batch import batch_schema, make_batch
from danceopd.flow import cfg_combine, euler_step, forward_noise, sde_step, sigma_grid
from danceopd.lora import load_trainable_state_dict
from danceopd.queries import diffusionopd_weights, select_queries
from danceopd.work import WorkOrder


class RolloutWorker:
    def __init__(self, cfg, worker_id: str = "rollout-0"):
        self.cfg = cfg
        self.worker_id = worker_id
        self.backend = make_backend(cfg)
        self.model = self.backend.build_student(str(cfg.resolve(cfg.student.init)) if cfg.student.init != "random" else "random", cfg.job.seed)
        self.model.eval()  # trainable flags stay: they define which weights a push carries
        self.version = 0
        self.schema = batch_schema(self.backend.state_shape, self.backend.cond_dim)
        grid = self.backend.sigma_grid if cfg.method.sigma_grid == "auto" else cfg.method.sigma_grid
        self.sigmas = sigma_grid(grid, cfg.method.rollout_steps, cfg.method.shift)
        self.stats = {"batches": 0, "samples": 0, "nfe": 0, "busy_s": 0.0}

    # ---- weights ------------------------------------------------------------------------
    def set_weights(self, state_dict: dict, version: int) -> int:
        load_trainable_state_dict(self.model, state_dict)
        self.version = int(version)
        return self.version

    def get_version(self) -> int:
        return self.version

    def get_stats(self) -> dict:
        return dict(self.stats)

    # ---- rollout ------------------------------------------------------------------------
    def _velocity(self, z, sigma, cond):
        m = self.cfg.method
        self.stats["nfe"] += z.shape[0] * (1 if m.rollout_cfg_scale == 1 else 2)
        if m.rollout_cfg_scale == 1:
            return self.backend.predict(self.model, z, sigma, cond)
        both = self.backend.predict(self.model, torch.cat([z, z]), torch.cat([sigma, sigma]), torch.cat([self.backend.null_cond(cond), cond]))
        v_u, v_c = both.chunk(2)
        return cfg_combine(v_u, v_c, m.rollout_cfg_scale)

    def _drop_text(self, cond: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        """Condition dropout, seeded per sample: the text goes, an edit's source image stays."""
        drop = torch.tensor([np.random.default_rng([s, 0xD0]).random() < self.cfg.method.cond_dropout for s in seeds])
        if drop.any():
            cond = cond.clone()
            cond[drop] = self.backend.null_cond(cond[drop])
        return cond

    def _indices(self, seed: int, all_states: bool) -> np.ndarray:
        n = self.cfg.method.rollout_steps
        if all_states:
            return np.arange(n)
        rng = np.random.default_rng(seed)
        return select_queries(self.cfg.method.query_bias, n, self.cfg.method.k, rng)

    @torch.no_grad()
    def rollout(self, order: WorkOrder) -> pa.RecordBatch:
        t0 = time.perf_counter()
        m = self.cfg.method
        items = order.items
        rows = [it.row for it in items]
        seeds = [it.seed for it in items]
        cond = self.backend.encode(rows)
        if m.name == "sft" and m.cond_dropout > 0:
            cond = self._drop_text(cond, seeds)
        z = self.backend.noise(seeds)
        b = len(items)
        all_states = m.name == "diffusionopd" or (m.name == "flowopd" and m.flowopd_all_states)
        idx = [self._indices(s, all_states) for s in seeds]
        sig = self.sigmas

        states, nexts, vels = {}, {}, {}
        if m.name in ("offpolicy", "sft"):
            # No rollout: forward-noise the dataset targets at the queried noise levels.
            x0 = self.backend.data_target(rows)
            eps = z
        else:
            last = max(int(i.max()) for i in idx)
            stop = last if (self.cfg.rollout.early_stop and m.name != "flowopd") else m.rollout_steps - 1
            gens = [torch.Generator().manual_seed(s ^ 0x5DEECE66D) for s in seeds] if m.name == "flowopd" else None
            for i in range(stop + 1):
                states[i] = z
                sigma = sig[i].expand(b)
                if m.name == "flowopd":
                    v = self._velocity(z, sigma, cond)
                    noise = torch.stack([torch.randn(z.shape[1:], generator=g) for g in gens])
                    z_next, _, _ = sde_step(z, v, sigma, sig[i + 1].expand(b), m.flowopd_eta, noise)
                    vels[i], nexts[i] = v, z_next
                    z = z_next
                elif i < stop:
                    z = euler_step(z, self._velocity(z, sigma, cond), sigma, sig[i + 1].expand(b))

        cols = {k: [] for k in ("sample_id", "sample_index", "route", "task", "seed", "query_index", "sigma",
                                "sigma_next", "weight", "group", "state", "next_state", "target", "rollout_velocity")}
        w_dopd = diffusionopd_weights(sig, m.uniform_dt) if m.name == "diffusionopd" else None
        for j, it in enumerate(items):
            for i in idx[j]:
                i = int(i)
                cols["sample_id"].append(it.row.uid)
                cols["sample_index"].append(it.sample_index)
                cols["route"].append(it.route)
                cols["task"].append(it.row.task)
                cols["seed"].append(it.seed)
                cols["query_index"].append(i)
                cols["sigma"].append(float(sig[i]))
                cols["sigma_next"].append(float(sig[i + 1]))
                cols["group"].append(it.group)
                cols["weight"].append(float(w_dopd[i]) if w_dopd is not None else 1.0 / len(idx[j]))
                if m.name in ("offpolicy", "sft"):
                    s = forward_noise(x0[j], eps[j], sig[i])
                    cols["state"].append(s)
                    cols["target"].append(eps[j] - x0[j] if m.name == "sft" else torch.zeros_like(s))
                    cols["next_state"].append(torch.zeros_like(s))
                    cols["rollout_velocity"].append(torch.zeros_like(s))
                else:
                    cols["state"].append(states[i][j])
                    cols["target"].append(torch.zeros_like(states[i][j]))
                    cols["next_state"].append(nexts[i][j] if nexts else torch.zeros_like(states[i][j]))
                    cols["rollout_velocity"].append(vels[i][j] if vels else torch.zeros_like(states[i][j]))
        conds = cond[[j for j in range(b) for _ in idx[j]]]
        n_rows = len(cols["sample_id"])
        for k in ("state", "next_state", "target", "rollout_velocity"):
            cols[k] = torch.stack(cols[k])
        cols["cond"] = conds
        cols["policy_version"] = [self.version] * n_rows
        cols["ticket"] = [order.ticket] * n_rows
        cols["worker_id"] = [self.worker_id] * n_rows
        cols["teacher_id"] = [""] * n_rows
        rb = make_batch(self.schema, cols)
        self.backend.simulated_compute("rollout")
        self.stats["batches"] += 1
        self.stats["samples"] += b
        self.stats["busy_s"] += time.perf_counter() - t0
        return rb
