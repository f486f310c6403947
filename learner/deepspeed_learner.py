"""DeepSpeedLearner: one learner rank of a ZeRO data-parallel group (plain class; the Ray runtime
wraps it with `ray.remote`, one actor per rank).

Same interface, the same loss (`learner.step.batch_loss`) and lr schedule (`learner.schedule`)
as the plain `Learner`; at world size 1 in fp32 it reproduces the plain learner's losses and
weights (ZeRO-0 bit for bit, ZeRO-1..3 to float rounding of the grad clip). Every method except
`get_version`/`set_version` and the EMA's (`export_ema`/`load_ema`: rank 0's alone) is
collective: all ranks call it (train_step: each with its own micro-batches).

`learner.precision: bf16`: the forward runs under bf16 autocast on every stage; ZeRO-1..3 also run
DeepSpeed's bf16 mode (bf16 working weights and gradients, fp32 master weights and AdamW states
in the ZeRO optimizer; on CPU too: DeepSpeed's CPU accelerator supports it). ZeRO-0 keeps fp32
weights and autocasts only, as the plain learner does: DeepSpeed's ZeRO-0 bf16 wraps the optimizer
in its fp16-style optimizer, whose clipping and skips would bypass this learner's own (below).
Exported weights are fp32 either way.

EMA (`learner.ema_decay`): rank 0 alone keeps it, in fp32 on the weights' device, of the full
trainable weights after each applied step (ZeRO-3 gathers them for it, as an export does; under
bf16 it averages the bf16 working weights). Simplest correct: no per-rank partitions to
reassemble for evaluation or checkpoints; the cost is one fp32 copy of the trainable weights on
rank 0 (small for a LoRA student).
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import torch
import torch.distributed as dist

from danceopd.backends import make_backend
from danceopd.batch import nonfinite
from danceopd.checkpoint import (
    load_json,
    load_tensors,
    load_torch,
    save_json,
    save_tensors,
    save_torch,
    verify_no_pickle,
)
from danceopd.device import peak_gpu_memory_bytes
from danceopd.methods import make_method
from danceopd.profiling import CallProfiler
from danceopd.storage import reading, writing
from learner.ema import Ema
from learner.learner import build_student
from learner.schedule import lr_at, set_lr
from learner.step import batch_loss, merge_route_losses

if TYPE_CHECKING:  # annotations only: no import cycle, no cost
    from danceopd.config import Config

ENGINE_COUNTERS = ("global_steps", "global_samples", "skipped_steps")  # what DeepSpeed restores


def _plain_state(sd: dict) -> dict:
    """A ZeRO optimizer state_dict with its DeepSpeed objects made plain, so that it loads with
    `weights_only=True`: the loss scaler as its attributes, the stage enum as an int, and without
    the slice mappings (fragment_address tuples, used only by universal checkpoints)."""
    sd = dict(sd)
    sd.pop("param_slice_mappings", None)
    if "loss_scaler" in sd:
        sd["loss_scaler"] = dict(vars(sd["loss_scaler"]))
    if "zero_stage" in sd:
        sd["zero_stage"] = int(sd["zero_stage"])
    return sd


def ds_bf16(lc) -> bool:
    """DeepSpeed's own bf16 mode: `learner.precision: bf16` at ZeRO-1..3 (ZeRO-0 autocasts on
    fp32 weights; module docstring)."""
    return lc.precision == "bf16" and lc.zero_stage > 0


def _ds_config(cfg: Config) -> dict:
    lc = cfg.learner
    return {
        "train_micro_batch_size_per_gpu": cfg.rollout.batch_size,
        "gradient_accumulation_steps": lc.grad_accum,
        # ZeRO-0 reports no grad norm for fp32 (the client optimizer has none), so there the
        # learner clips itself with torch's clip_grad_norm_, exactly as the plain Learner does.
        "gradient_clipping": lc.grad_clip if lc.zero_stage > 0 else 0.0,
        # fp16 never (it needs loss scaling); bf16 from learner.precision (ds_bf16).
        "fp16": {"enabled": False},
        "bf16": {"enabled": ds_bf16(lc)},
        "zero_optimization": {"stage": lc.zero_stage},
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


def optimizer_file(rank: int) -> str:
    return f"optimizer-rank{rank:03d}.pt"


def checkpoint_files(world_size: int) -> list[str]:
    """What `save_checkpoint` writes, all ranks together: a checkpoint lacking one is not complete."""
    return [*(optimizer_file(r) for r in range(world_size)), "weights.safetensors", "engine.json"]



def import_deepspeed():
    """`import deepspeed` without its autotuner's `import mlflow`: DeepSpeed imports mlflow at
    import time only to log autotuning runs, which this learner never starts; with mlflow
    installed (`danceopd[tracking]`) that is seconds per learner rank and a `uname` subprocess.
    The driver's tracker (services/telemetry) imports mlflow itself, in its own process."""
    import sys

    blocked = "mlflow" not in sys.modules
    if blocked:
        sys.modules["mlflow"] = None  # `import mlflow` raises ImportError: DeepSpeed's has_mlflow = False
    try:
        import deepspeed
    finally:
        if blocked and sys.modules.get("mlflow", 0) is None:
            del sys.modules["mlflow"]
    return deepspeed

class DeepSpeedLearner:
    def __init__(self, cfg: Config, rank: int, world_size: int, master_addr: str, master_port: int):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        lc = cfg.learner
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                          WORLD_SIZE=str(world_size),
                          # Ray gives each rank actor its own GPU (CUDA_VISIBLE_DEVICES), so the
                          # device index inside the actor is always 0.
                          LOCAL_RANK="0")
        on_gpu = torch.cuda.is_available() and lc.num_gpus > 0
        if not on_gpu:
            # Pin the CPU accelerator before deepspeed is imported: its auto-detection runs at
            # import time and would probe for CUDA/XPU/NPU stacks.
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        deepspeed = import_deepspeed()  # lazily: the driver that wraps this class never loads DeepSpeed

        self._ds = deepspeed
        deepspeed.utils.logger.setLevel(logging.WARNING)
        # On CPU, init_distributed JIT-compiles a shared-memory all-reduce op (~30 s on 2 cores,
        # once per machine) that only `inference_all_reduce` uses; training never does.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        # ZeRO calls collectives that torch 2.13 deprecates; the warning would repeat every step.
        warnings.filterwarnings("ignore", r"`torch\.distributed\.\w+` is deprecated", FutureWarning)
        backend = lc.dist_backend if lc.dist_backend != "auto" else ("nccl" if on_gpu else "gloo")
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)

        self.backend = make_backend(cfg)
        self.method = make_method(cfg.method)
        model = build_student(cfg, self.backend)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lc.lr, weight_decay=lc.weight_decay)
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=_ds_config(cfg))
        self.version = 0
        self.busy_s = 0.0
        # `logging.profile_steps`: rank 0 traces a few steps (its result carries them to the driver)
        self.profiler = CallProfiler(cfg.logging.profile_steps if rank == 0 else 0)
        self.ema = None  # rank 0's, with learner.ema_decay (module docstring)
        if lc.ema_decay is not None:
            start = self.export_weights()  # collective under ZeRO-3
            self.ema = Ema(lc.ema_decay, start) if self.rank == 0 else None

    def _trainable(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.engine.module.named_parameters() if p.requires_grad}

    def train_step(self, micro_batches: list[pa.RecordBatch]) -> dict:
        """`_train_step`, traced on rank 0 when it is one of `logging.profile_steps` (`traces`)."""
        return self.profiler.step(f"learner-rank{self.rank}-step{self.version + 1:06d}", self._train_step, micro_batches)

    def _train_step(self, micro_batches: list[pa.RecordBatch]) -> dict:
        """One optimizer step over this rank's micro-batches (`learner.grad_accum` of them, the
        same count on every rank); loss and route losses are averaged over all ranks.

        A step with a non-finite prediction, loss or gradient norm on any rank is skipped on every
        rank (each rank's loss and verdict are summed before the optimizer step, the gradients
        all-reduced): weights, optimizer state and version stay, `skipped` names what was non-finite and `engine.skipped_steps`
        counts it. ZeRO-0 decides before `engine.step()` and clears the gradients, so the client
        AdamW (which skips parameters without one) moves nothing; ZeRO-1..3 leave it to
        DeepSpeed's own check (a non-finite global norm is an overflow: no update), read back with
        `engine.was_step_applied()`."""
        n, gas = len(micro_batches), self.cfg.learner.grad_accum
        if n != gas:
            raise ValueError(f"train_step: {n} micro-batches, but learner.grad_accum={gas} (DeepSpeed scales by and steps at grad_accum)")
        t0 = time.perf_counter()
        lc = self.cfg.learner
        eng, dev, stage = self.engine, self.engine.device, lc.zero_stage
        lr = lr_at(lc, self.version + 1)  # every rank has the same version
        set_lr(eng.optimizer, lr)
        losses, routes, bad = [], [], None
        for i, rb in enumerate(micro_batches):
            # Set the boundary explicitly so an earlier failed step can never leave DeepSpeed's
            # micro-step counter out of phase with our micro-batches.
            eng.set_gradient_accumulation_boundary(i == n - 1)
            loss, per_route, what = batch_loss(self.backend, eng, self.method, rb, dev, lc.precision)
            eng.backward(loss)  # DeepSpeed divides by grad_accum, like the plain Learner's 1/n
            losses.append(loss.item())
            routes.append(per_route)
            bad = bad or what
            if i < n - 1:
                eng.step()
        # Every rank's loss and verdict, summed before the optimizer step: all ranks decide alike.
        totals = torch.tensor([sum(losses) / n, bad == "prediction", bad == "loss"], dtype=torch.float64, device=dev)
        if self.world_size > 1:
            dist.all_reduce(totals)
        loss_mean = totals[0].item() / self.world_size
        bad = "prediction" if totals[1] else "loss" if totals[2] or nonfinite(loss=loss_mean) else None
        if stage == 0:
            clip = lc.grad_clip  # grads are all-reduced by now (boundary)
            grad_norm = torch.nn.utils.clip_grad_norm_(list(self._trainable().values()), clip if clip > 0 else float("inf"))
            bad = bad or nonfinite(grad_norm=grad_norm)
            if bad:
                eng.optimizer.zero_grad(set_to_none=True)
                eng.skipped_steps += 1  # as DeepSpeed counts its own overflow skips
        eng.step()
        if stage > 0:
            grad_norm = eng.get_global_grad_norm()
            bad = None if eng.was_step_applied() else bad or "grad_norm"
        gathered: list = [None] * self.world_size
        if self.world_size > 1:
            dist.all_gather_object(gathered, merge_route_losses(routes))
        else:
            gathered = [merge_route_losses(routes)]
        if not bad:
            self.version += 1
            if lc.ema_decay is not None:
                self._update_ema()
        self.busy_s += time.perf_counter() - t0
        return {"loss": loss_mean, "route_loss": merge_route_losses(gathered),
                "grad_norm": float(grad_norm), "lr": lr, "version": self.version, "skipped": bad,
                "peak_gpu_memory_bytes": peak_gpu_memory_bytes()}

    def _update_ema(self) -> None:
        """Rank 0's EMA of the full trainable weights; collective under ZeRO-3 (the gather)."""
        params = self._trainable()
        with self._ds.zero.GatheredParameters(list(params.values()), modifier_rank=None,
                                              enabled=self.cfg.learner.zero_stage == 3):
            if self.rank == 0:
                self.ema.update(params)

    def export_ema(self) -> dict[str, torch.Tensor] | None:
        """Rank 0's EMA as CPU tensors; None on other ranks and without learner.ema_decay."""
        return self.ema.export() if self.ema is not None else None

    def load_ema(self, state: dict[str, torch.Tensor]) -> None:
        """Replace rank 0's EMA (a checkpoint's, or the weights it restarts from)."""
        if self.ema is not None:
            self.ema.load(state)

    def export_weights(self) -> dict[str, torch.Tensor] | None:
        """The trainable state (LoRA adapters only for a LoRA student) as fp32 CPU tensors on rank
        0 (under bf16: the working weights, exactly representable), None elsewhere. Collective:
        under ZeRO-3 every rank takes part in the gather."""
        params = self._trainable()
        with self._ds.zero.GatheredParameters(list(params.values()), modifier_rank=None,
                                              enabled=self.cfg.learner.zero_stage == 3):
            if self.rank != 0:
                return None
            return {k: p.detach().to("cpu", torch.float32, copy=True) for k, p in params.items()}

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Set the trainable weights (a checkpoint of another learner kind: no optimizer state).
        Collective under ZeRO-3: every rank takes part in the gather and the scatter back."""
        params = self._trainable()
        missing = set(params) - set(state)
        if missing:
            raise KeyError(f"load_weights: the checkpoint lacks {sorted(missing)[:3]}")
        with self._ds.zero.GatheredParameters(list(params.values()), modifier_rank=0,
                                              enabled=self.cfg.learner.zero_stage == 3):
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(state[k].to(p.device, p.dtype))
        if self.cfg.learner.zero_stage > 0:
            self.engine.optimizer.refresh_fp32_params()  # ZeRO keeps master copies of the weights

    def save_checkpoint(self, folder: str) -> None:
        """The learner state a resume needs, in non-pickle files (not DeepSpeed's checkpoint, whose
        loader unpickles): rank 0 writes the trainable weights (safetensors) and engine.json; every
        rank writes its optimizer partition as tensors and plain values (optimizer-rankNNN.pt).
        Collective (the weights are gathered under ZeRO-3). `folder` may be an object-storage
        URI: each rank uploads its own files there, from whichever node it runs on."""
        weights = self.export_weights()
        with writing(folder) as local:
            local.mkdir(parents=True, exist_ok=True)
            save_torch(local / optimizer_file(self.rank), _plain_state(self.engine.optimizer.state_dict()))
            if self.rank == 0:
                eng = self.engine
                save_tensors(local / "weights.safetensors", weights)
                save_json(local / "engine.json", {"version": self.version, "world_size": self.world_size,
                                                  "zero_stage": self.cfg.learner.zero_stage,
                                                  "precision": self.cfg.learner.precision,
                                                  **{k: int(getattr(eng, k)) for k in ENGINE_COUNTERS}})

    def load_checkpoint(self, folder: str) -> int:
        """Restore what save_checkpoint wrote (exactly: weights, optimizer partitions, counters).
        Every file is read weights-only; a file holding pickled objects is refused on every rank
        before any collective call, so no rank is left waiting. Collective. `folder` may be an
        object-storage URI: each rank downloads only the files it reads (the driver checked every
        rank's for pickle in its own copy before the run started)."""
        with reading(folder, ["engine.json", "weights.safetensors", optimizer_file(self.rank)]) as local:
            return self._load_checkpoint(local, folder)

    def _load_checkpoint(self, local: Path, folder: str) -> int:
        if not (local / "engine.json").is_file():
            raise FileNotFoundError(f"no DeepSpeed learner state under {folder} (engine.json)")
        meta = {"precision": "fp32", **load_json(local / "engine.json")}  # older ones: fp32, unrecorded
        want = {"world_size": self.world_size, "zero_stage": self.cfg.learner.zero_stage,
                "precision": self.cfg.learner.precision}
        got = {k: meta.get(k) for k in want}
        if got != want:
            raise ValueError(f"{folder}: the learner state was written with {got}, this run has {want}; resume "
                             "with the same learner.world_size, learner.zero_stage and learner.precision")
        verify_no_pickle(local)  # all ranks' files (a URI's: this rank's), so all ranks refuse together
        state = load_torch(local / optimizer_file(self.rank))
        self.load_weights(load_tensors(local / "weights.safetensors"))
        opt = self.engine.optimizer
        if self.cfg.learner.zero_stage == 0:
            opt.load_state_dict(state)  # the client torch optimizer itself
        else:
            from deepspeed.runtime.zero.config import ZeroStageEnum

            opt.loss_scaler.__dict__.update(state["loss_scaler"])
            state.update(loss_scaler=opt.loss_scaler, zero_stage=ZeroStageEnum(state["zero_stage"]))
            per_rank = [None] * self.world_size  # ZeRO reads the entry of its own data-parallel rank
            per_rank[self.rank] = state
            opt.load_state_dict(per_rank, load_from_fp32_weights=True)
        for k in ENGINE_COUNTERS:
            setattr(self.engine, k, int(meta[k]))
        self.version = int(meta["version"])
        return self.version

    def get_version(self) -> int:
        return self.version

    def set_version(self, version: int) -> int:
        self.version = int(version)
        return self.version

    def shutdown(self) -> None:
        # No barrier first: shutdown also runs when a peer rank has died, and a barrier would
        # then hang; the callers only shut down between collective calls.
        if dist.is_initialized():
            dist.destroy_process_group()
