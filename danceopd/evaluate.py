"""Evaluation: the student's full ODE on a fixed, seeded set of prompts per route, scored per
route against the route's teacher and the ground truth, with a picture grid per route.

Every evaluation of a job samples the same prompts (and source images, on edit routes) from the
same noise, so two evaluations differ only by the student's weights. Metrics per route; the first
is the headline (lower is better; `summary.json`'s `eval_start`/`eval_end`):

- toy / sim: `target_error` (|E[student sample] - the teacher's target mean|, mean over the prompt
  classes), `teacher_rmse` (student vs teacher sample from the same noise);
- shapes: `gt_rmse` (pixel RMSE to the ground-truth image), `teacher_rmse`, `attr_acc`
  (ShapesBench: shape, colour, cell and background all right), `preservation` (local edits:
  pixels outside the edited object kept);
- other image backends: `gt_rmse` (rows with a target image) and `teacher_rmse`.

`Evaluator` is a plain class: the training loop runs it in process (`--mode local`) or as an
actor of its own (`--mode ray`), and `danceopd eval` / `danceopd sample` use it on checkpoints.
"""

from __future__ import annotations

import os
import time
import zlib
from typing import TYPE_CHECKING

import numpy as np
import torch

from danceopd import pictures
from danceopd.backends import make_backend
from danceopd.backends.base import Row
from danceopd.device import model_device
from danceopd.flow import guided_velocity, integrate, job_sigmas
from danceopd.lora import load_trainable_state_dict
from danceopd.packed import unpack_state

if TYPE_CHECKING:  # annotations only: no import cycle, no cost
    from danceopd.config import Config

HEADLINES = ("target_error", "gt_rmse", "teacher_rmse")
HIGHER_IS_BETTER = ("attr_acc", "preservation")
TOY_SAMPLES = 128  # samples per prompt class behind target_error
TOY_SEED = 12345


@torch.no_grad()
def sample(backend, model, rows: list[Row], seeds: list[int], sigmas: torch.Tensor, cfg_scale: float = 1.0) -> torch.Tensor:
    """Deterministic Euler ODE (the rollouts' integrator and grid, with the student's rollout
    guidance) from seeded noise to the clean endpoint, decoded."""
    return ode_sample(lambda *a: backend.predict(model, *a), backend, rows, seeds, sigmas, cfg_scale, model_device(model))


@torch.no_grad()
def ode_sample(field, backend, rows: list[Row], seeds: list[int], sigmas: torch.Tensor, cfg_scale: float = 1.0,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """Any velocity field `field(z, sigma, cond)` (a student's or a teacher's) integrated on
    `device` (its model's) from the rows' seeded noise, decoded, on the host."""
    cond = backend.conditions_on(backend.encode(rows), device)
    traj = integrate(lambda z, sig, active: guided_velocity(field, backend.null_cond, z, sig, cond[active], cfg_scale),
                     backend.noise(seeds).to(device), sigmas)
    return backend.decode(traj.states[-1]).cpu()


def toy_route_errors(cfg: Config, backend, model, n: int = TOY_SAMPLES, seed: int = TOY_SEED) -> dict[str, float]:
    """Per route: mean over prompt classes of |E[student sample] - teacher target mean|."""
    sigmas = job_sigmas(cfg, backend)
    out = {}
    for route in cfg.routing.routes:
        errs = []
        for c in range(backend.num_classes):
            rows = [Row(uid=f"eval-{c}", task=route.task, prompt=f"class {c}")] * n
            x = sample(backend, model, rows, [seed + i for i in range(n)], sigmas, cfg.method.rollout_cfg_scale)
            errs.append(float((x.mean(0) - backend.target_mean(route.task, f"class {c}")).norm()))
        out[route.name] = sum(errs) / len(errs)
    return out


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over samples of each sample's root mean squared difference."""
    d = (a.float() - b.float()).reshape(len(a), -1)
    return float(d.pow(2).mean(1).sqrt().mean())


def headline(metrics: dict[str, float]) -> tuple[str, float] | None:
    """(name, value) of a route's headline metric (lower is better), or None."""
    return next(((k, metrics[k]) for k in HEADLINES if k in metrics), None)


def eval_rows(bucket: list[Row], n: int, seed: int) -> list[Row]:
    """`n` rows of a bucket, drawn once with `seed` (distinct prompt and source where the bucket
    allows): every evaluation of a job uses these."""
    order = np.random.default_rng(seed).permutation(len(bucket))
    picked, seen = [], set()
    for i in order:
        r = bucket[int(i)]
        if (r.prompt, r.source_image) not in seen:
            seen.add((r.prompt, r.source_image))
            picked.append(r)
        if len(picked) == n:
            break
    return picked


def shapes_metrics(task: str, images: np.ndarray, rows: list[Row]) -> dict[str, float]:
    """ShapesBench attribute accuracy (all tasks) and preservation (local edits) of decoded images."""
    from danceopd import shapes_world as sw

    if task not in sw.TASKS:
        return {}
    size = images.shape[-1]
    sources = [None if r.source_image is None else sw.load_png(r.source_image, size) for r in rows]
    scenes = {}
    for i, (r, s) in enumerate(zip(rows, sources)):
        try:
            scenes[i] = sw.target_scene(r.prompt, s)
        except ValueError:  # a prompt that leaves attributes free has no single target scene
            pass
    out = {}
    if scenes:
        out["attr_acc"] = sw.attribute_accuracy(images[list(scenes)], list(scenes.values()))["all"]
    if task == "local_edit":
        out["preservation"] = sw.preservation(images, sources, [r.prompt for r in rows])
    return out


class Evaluator:
    """Holds an inference copy of the student, the evaluation rows and seeds per route, and (once
    computed) the teachers' samples; `evaluate(weights, step)` scores one set of student weights."""

    def __init__(self, cfg: Config, dataset=None):
        from danceopd.dataset import Dataset

        self.cfg = cfg
        self.backend = make_backend(cfg)
        self.model = self.backend.build_student(cfg.student_source(), cfg.job.seed)
        self.model.eval()
        self.sigmas = job_sigmas(cfg, self.backend)
        dataset = dataset or Dataset.load(cfg.resolve(cfg.data.path))
        e = cfg.eval
        self.rows = {r.name: eval_rows(dataset.buckets.get(r.task, []), e.prompts, e.seed ^ zlib.crc32(r.name.encode()))
                     for r in cfg.routing.routes}
        self.seeds = {name: [e.seed + i for i in range(len(rows))] for name, rows in self.rows.items()}
        self._teacher: dict[str, torch.Tensor] | None = None
        self._truth: dict[str, tuple[list[int], torch.Tensor]] | None = None

    def teacher_samples(self) -> dict[str, torch.Tensor]:
        """Each route's teacher sampled from the evaluation noise (with the route's CFG and
        adapter): computed once, the teachers are frozen."""
        if self._teacher is None:
            fields, self._teacher = {}, {}
            for route in self.cfg.routing.routes:
                if route.teacher not in fields:
                    fields[route.teacher] = self.backend.build_teacher(self.cfg.teacher(route.teacher), self.cfg.resolve("."))
                field = fields[route.teacher]
                if route.adapter:
                    field.use(route.adapter)
                scale = route.cfg_scale if route.cfg_scale is not None else self.cfg.method.teacher_cfg_scale
                self._teacher[route.name] = ode_sample(field.velocity, self.backend, self.rows[route.name],
                                                       self.seeds[route.name], self.sigmas, scale, self.backend.device)
        return self._teacher

    def ground_truth(self) -> dict[str, tuple[list[int], torch.Tensor]]:
        """Per route: (indices of the rows with a target image, their decoded targets)."""
        if self._truth is None:
            self._truth = {}
            for name, rows in self.rows.items():
                idx = [i for i, r in enumerate(rows) if r.target_image is not None]
                if idx:
                    self._truth[name] = (idx, self.backend.decode(self.backend.data_target([rows[i] for i in idx])))
        return self._truth

    def student_samples(self) -> dict[str, torch.Tensor]:
        """Every route's rows in one batched ODE."""
        names = list(self.rows)
        rows = [r for n in names for r in self.rows[n]]
        seeds = [s for n in names for s in self.seeds[n]]
        x = sample(self.backend, self.model, rows, seeds, self.sigmas, self.cfg.method.rollout_cfg_scale)
        out, at = {}, 0
        for n in names:
            out[n], at = x[at:at + len(self.rows[n])], at + len(self.rows[n])
        return out

    def evaluate(self, weights: dict[str, torch.Tensor] | None, step: int) -> dict:
        """{step, seconds, pid, routes: {route: {metric: value}}, grids: {route: uint8 [H, W, 3]},
        columns: {route: the grid's column names}}."""
        t0 = time.perf_counter()
        if weights is not None:  # Ray mode: packed (danceopd/packed.py)
            load_trainable_state_dict(self.model, unpack_state(weights))
        student = self.student_samples()
        teacher = self.teacher_samples() if self.cfg.eval.teacher else {}
        truth = self.ground_truth()
        toy = toy_route_errors(self.cfg, self.backend, self.model) if hasattr(self.backend, "target_mean") else {}
        routes, grids, columns = {}, {}, {}
        for route in self.cfg.routing.routes:
            name, rows, x = route.name, self.rows[route.name], student[route.name]
            m = {}
            if name in toy:
                m["target_error"] = toy[name]
            if name in truth:
                idx, gt = truth[name]
                m["gt_rmse"] = rmse(x[idx], gt)
            if name in teacher:
                m["teacher_rmse"] = rmse(x, teacher[name])
            m.update(self.backend.sample_metrics(route.task, x, rows))
            routes[name] = {k: round(float(v), 5) for k, v in m.items()}
            grids[name], columns[name] = self.grid(rows, x, teacher.get(name))
        return {"step": int(step), "seconds": round(time.perf_counter() - t0, 4), "pid": os.getpid(),
                "routes": routes, "grids": grids, "columns": columns}

    def grid(self, rows: list[Row], student: torch.Tensor, teacher: torch.Tensor | None) -> tuple[np.ndarray, list[str]]:
        """(picture, column names). Rows: the prompts; columns: source image (edits), student,
        teacher, ground truth."""
        columns = {}
        if any(r.source_image is not None for r in rows):
            columns["source"] = [None if r.source_image is None else pictures.load_rgb(r.source_image) for r in rows]
        columns["student"] = [pictures.to_rgb(x) for x in student]
        if teacher is not None:
            columns["teacher"] = [pictures.to_rgb(x) for x in teacher]
        if any(r.target_image is not None for r in rows):
            columns["ground truth"] = [None if r.target_image is None else pictures.load_rgb(r.target_image) for r in rows]
        cells = [[columns[c][i] for c in columns] for i in range(len(rows))]
        labels = [r.prompt if len(r.prompt) <= 40 else r.prompt[:37] + "..." for r in rows]
        return pictures.grid(cells, list(columns), labels), list(columns)


def load_student(cfg: Config, weights_path):
    """(backend, student) of a job's config holding a checkpoint's `model.safetensors` (the
    trainable weights: the LoRA adapters only, for a LoRA student)."""
    from danceopd.checkpoint import load_tensors

    backend = make_backend(cfg)
    model = backend.build_student(cfg.student_source(), cfg.job.seed)
    load_trainable_state_dict(model, load_tensors(weights_path))
    return backend, model.eval()
