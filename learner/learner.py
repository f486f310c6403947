"""Learner (plain torch): AdamW on the student, grad clip, gradient accumulation, the lr
schedule (learner/schedule.py), bf16 autocast (`learner.precision`) and the weights' EMA
(learner/ema.py).

The reference learner of `--mode local`; the DeepSpeed learner (learner/deepspeed_learner.py)
has the same interface and shares `batch_loss` and `lr_at`. A step with a non-finite prediction,
loss or gradient norm is skipped (not a step: weights, optimizer state, EMA and version stay as
they were).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import pyarrow as pa
import torch

from danceopd.backends import make_backend
from danceopd.batch import nonfinite
from danceopd.device import model_device, peak_gpu_memory_bytes
from danceopd.lora import load_trainable_state_dict, trainable_state_dict
from danceopd.methods import make_method
from danceopd.profiling import CallProfiler
from learner.ema import Ema
from learner.schedule import lr_at, set_lr
from learner.step import batch_loss, merge_route_losses

if TYPE_CHECKING:  # annotations only: no import cycle, no cost
    from danceopd.config import Config


def build_student(cfg: Config, backend):
    return backend.build_student(cfg.student_source(), cfg.job.seed)


class Learner:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.backend = make_backend(cfg)
        self.model = build_student(cfg, self.backend)
        self.model.train()
        self.device = model_device(self.model)  # each micro-batch moves there once
        self.method = make_method(cfg.method)
        lc = cfg.learner
        self.named_params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        self.params = list(self.named_params.values())
        self.optimizer = torch.optim.AdamW(self.params, lr=lc.lr, weight_decay=lc.weight_decay)
        self.ema = Ema(lc.ema_decay, self.named_params) if lc.ema_decay is not None else None
        self.version = 0
        self.busy_s = 0.0
        self.profiler = CallProfiler(cfg.logging.profile_steps)

    def train_step(self, micro_batches: list[pa.RecordBatch]) -> dict:
        """One optimizer step over `grad_accum` micro-batches (the mean of their losses). A step
        whose prediction, loss or gradient norm holds NaN/Inf is skipped: no optimizer step, the
        weights, optimizer state and version untouched; `skipped` names what was non-finite.
        `traces`: the step's profiler trace, when it was one of `logging.profile_steps`."""
        return self.profiler.step(f"learner-rank0-step{self.version + 1:06d}", self._train_step, micro_batches)

    def _train_step(self, micro_batches: list[pa.RecordBatch]) -> dict:
        t0 = time.perf_counter()
        lc = self.cfg.learner
        lr = lr_at(lc, self.version + 1)
        set_lr(self.optimizer, lr)
        self.optimizer.zero_grad(set_to_none=True)
        losses, routes, bad = [], [], None
        for rb in micro_batches:
            loss, per_route, what = batch_loss(self.backend, self.model, self.method, rb, self.device, lc.precision)
            (loss / len(micro_batches)).backward()
            losses.append(loss.item())
            routes.append(per_route)
            bad = bad or what
        clip = lc.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip if clip > 0 else float("inf"))
        bad = bad or nonfinite(grad_norm=grad_norm)
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.step()
            self.version += 1
            if self.ema is not None:
                self.ema.update(self.named_params)
        self.busy_s += time.perf_counter() - t0
        return {"loss": sum(losses) / len(losses), "route_loss": merge_route_losses(routes),
                "grad_norm": float(grad_norm), "lr": lr, "version": self.version, "skipped": bad,
                "peak_gpu_memory_bytes": peak_gpu_memory_bytes()}

    def export_weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in trainable_state_dict(self.model).items()}

    def export_ema(self) -> dict[str, torch.Tensor] | None:
        """The EMA of the trainable weights as CPU tensors (None without learner.ema_decay)."""
        return self.ema.export() if self.ema is not None else None

    def load_ema(self, state: dict[str, torch.Tensor]) -> None:
        if self.ema is not None:
            self.ema.load(state)

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        load_trainable_state_dict(self.model, state)

    def optimizer_state(self) -> dict:
        return self.optimizer.state_dict()

    def load_optimizer_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)
