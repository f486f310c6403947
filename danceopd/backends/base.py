"""The Backend contract: everything model-family specific, behind one small interface.

A backend turns dataset rows into fixed-shape fp32 *conditions* (so they fit one Arrow
tensor column), builds the student and the frozen teacher fields, predicts velocities, draws
seeded noise and decodes states for evaluation. Rollout workers, the router, teachers and
the learner only ever talk to this interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


@dataclass(frozen=True)
class Row:
    """One dataset sample (paths already absolute)."""

    uid: str
    task: str
    prompt: str
    source_image: Path | None = None
    target_image: Path | None = None
    raw_task: str | None = None
    caption_dict: str | None = None


class TeacherField(ABC):
    """A frozen velocity field v_m(z, sigma, cond). No gradients, ever."""

    @abstractmethod
    def velocity(self, z: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """z: [B, *state_shape], sigma: [B] in [0, 1], cond: [B, cond_dim] -> [B, *state_shape]."""


class Backend(ABC):
    """Class attributes declare what the family supports; config checks, `validate`, the CLI and
    evaluation read them (never the family's name)."""

    name: str
    teacher_kinds: tuple[str, ...] = ()  # TeacherConfig.kind values build_teacher answers
    pipeline: bool = False  # reads a diffusers pipeline folder (backend.pretrained): student.init=base,
    # student.init_lora, LoRA teachers, pretrained teachers without a path (the pipeline's transformer)
    condition_cache: bool = False  # conditions are encoded once into a cache file (`build_cache`, `danceopd cache`)
    sigma_grid: str = "sd3"  # the model family's sigma grid (danceopd.flow.SIGMA_GRIDS), method.sigma_grid=auto
    supports_source_image: bool = True  # rows may carry a source image (edit routes)
    write_tiny: Callable[..., Path] | None = None  # writes a tiny random pipeline folder (`danceopd make-tiny`)
    exports: str | None = None  # what `danceopd export` writes: "pipeline" (the base pipeline with the student's
    # transformer), "model" (the student's diffusers model folder), None (the student is no diffusers model)
    device = torch.device("cpu")  # where the models it builds live (latent backends: the GPU, when there is one)

    @property
    @abstractmethod
    def state_shape(self) -> tuple[int, ...]:
        """Shape of one state z (without batch)."""

    @property
    @abstractmethod
    def cond_dim(self) -> int:
        """Length of one flat fp32 condition vector."""

    @abstractmethod
    def encode(self, rows: list[Row]) -> torch.Tensor:
        """Rows -> conditions [B, cond_dim] fp32 (prompt embedding, source image, ...)."""

    @abstractmethod
    def null_cond(self, cond: torch.Tensor) -> torch.Tensor:
        """Drop the text of each condition and keep the source image (CFG's unconditional branch)."""

    def conditions_on(self, cond: torch.Tensor, device) -> torch.Tensor:
        """Conditions as a model on `device` reads them: a rollout moves them there once, before
        its first step, not at every step."""
        return cond.to(device)

    @abstractmethod
    def build_student(self, init: str, seed: int) -> nn.Module:
        """The trainable student: `random` (seeded) or a save_pretrained folder."""

    @abstractmethod
    def predict(self, model: nn.Module, z: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Student velocity v_theta(z, sigma, cond); sigma in [0, 1] (models see 1000*sigma)."""

    @abstractmethod
    def build_teacher(self, teacher_cfg, base_dir: Path) -> TeacherField:
        """A frozen teacher field from its config (TeacherConfig)."""

    @abstractmethod
    def data_target(self, rows: list[Row]) -> torch.Tensor:
        """Clean data x0 of each row [B, *state_shape] (for sft / offpolicy / evaluation)."""

    def noise(self, seeds: list[int]) -> torch.Tensor:
        """Initial Gaussian noise, one independent generator per sample seed, so a sample's
        noise does not depend on which worker or batch made it."""
        out = torch.empty((len(seeds), *self.state_shape))
        for i, s in enumerate(seeds):
            g = torch.Generator().manual_seed(int(s) & 0x7FFF_FFFF_FFFF_FFFF)
            out[i] = torch.randn(self.state_shape, generator=g)
        return out

    def check_row(self, row: Row, needs_target: bool = False, teachers: tuple[TeacherField, ...] = ()) -> None:
        """Raise a one-line ValueError if this row cannot be used: its condition (prompt, images)
        does not encode, its data target does not load (`needs_target`: methods that train on the
        data), or one of `teachers` (the built fields that will see it) cannot answer it."""
        cond = self.encode([row])
        if needs_target:
            self.data_target([row])
        for teacher in teachers:
            teacher.velocity(self.noise([0]), torch.full((1,), 0.5), cond)

    def check_student(self, init: str) -> None:
        """Raise a one-line ValueError if `build_student(init)` would fail (LoRA targets that match
        no module, a model folder of other shapes). Built on the meta device: no memory, no init."""
        with torch.device("meta"):
            self.build_student(init, 0)

    def simulated_compute(self, role: str) -> None:
        """Stand-in for GPU time of one unit of `role`'s work (`rollout` batch, `teacher` call,
        `learner` micro-batch). Real backends spend it in their models; `sim` sleeps."""
        return None

    def sample_metrics(self, task: str, images: torch.Tensor, rows: list[Row]) -> dict[str, float]:
        """Family-specific scores of decoded evaluation samples of one route (none by default)."""
        return {}

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Map a clean state to data space for evaluation (identity in pixel/vector space)."""
        return z

    def save_student(self, model: nn.Module, path: Path) -> None:
        """Write the student so `build_student(str(path))` reads it back."""
        raise NotImplementedError(f"backend {self.name} cannot save a pretrained folder")
