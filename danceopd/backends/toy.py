"""`toy`: analytic teacher fields on vectors, so correctness is checkable exactly.

Prompts are `class <i>`. Each teacher's target for (prompt i) is the Gaussian
N(mu_{teacher,i}, std^2 I); the teacher's field is the exact flow-matching velocity of that
Gaussian (danceopd.fields). The condition is one-hot(task) ++ one-hot(prompt class), so the
student can tell routes apart; the unconditional branch drops the prompt part.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from danceopd.backends.base import Backend, Row, TeacherField
from danceopd.config import ToyBackendConfig
from danceopd.fields import gaussian_velocity

if TYPE_CHECKING:  # annotations only: no import cycle, no cost
    from danceopd.config import Config


def parse_class(prompt: str, num_classes: int) -> int:
    parts = prompt.strip().split()
    if len(parts) != 2 or parts[0] != "class" or not parts[1].isdigit() or int(parts[1]) >= num_classes:
        raise ValueError(f"toy prompt {prompt!r}: expected 'class <0..{num_classes - 1}>'")
    return int(parts[1])


def sigma_features(sigma: torch.Tensor) -> torch.Tensor:
    """A few Fourier features of the timestep, so a small MLP resolves sigma well."""
    t = sigma.reshape(-1, 1)
    freqs = torch.tensor([1.0, 2.0, 4.0, 8.0], device=t.device) * torch.pi
    return torch.cat([t, torch.sin(freqs * t), torch.cos(freqs * t)], dim=-1)


class ToyMLP(nn.Module):
    def __init__(self, dim: int, cond_dim: int, hidden: int):
        super().__init__()
        self.dim, self.cond_dim, self.hidden = dim, cond_dim, hidden
        self.net = nn.Sequential(
            nn.Linear(dim + 9 + cond_dim, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, dim),
        )

    def forward(self, z, sigma, cond):
        return self.net(torch.cat([z, sigma_features(sigma).to(z.dtype), cond.to(z.dtype)], dim=-1))


def teacher_means(name: str, seed: int, num_classes: int, dim: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()) ^ (seed * 7919))
    return 1.5 * torch.randn(num_classes, dim, generator=g)


class GaussianTeacher(TeacherField):
    def __init__(self, means: torch.Tensor, std: float, num_tasks: int):
        self.means, self.std, self.num_tasks = means, std, num_tasks
        self.null_mean = means.mean(0)

    def velocity(self, z, sigma, cond):
        onehot = cond[:, self.num_tasks:]
        has_prompt = onehot.sum(-1, keepdim=True) > 0.5
        mu = torch.where(has_prompt, onehot @ self.means, self.null_mean.expand_as(z))
        return gaussian_velocity(z, sigma, mu, self.std)


class ToyBackend(Backend):
    name = "toy"
    teacher_kinds = ("gaussian",)

    def __init__(self, cfg: Config):
        self.cfg = cfg
        b: ToyBackendConfig = cfg.backend  # sim's section is a ToyBackendConfig too
        self.dim, self.hidden, self.num_classes = b.dim, b.hidden, b.num_classes
        self.tasks = sorted({r.task for r in cfg.routing.routes})
        # The data distribution of a task is its (first) route's teacher target: sft and
        # offpolicy draw x0 from it, evaluation compares against it.
        self._task_teacher = {}
        for r in cfg.routing.routes:
            self._task_teacher.setdefault(r.task, cfg.teacher(r.teacher))

    @property
    def state_shape(self):
        return (self.dim,)

    @property
    def cond_dim(self):
        return len(self.tasks) + self.num_classes

    def encode(self, rows: list[Row]) -> torch.Tensor:
        out = torch.zeros(len(rows), self.cond_dim)
        for i, r in enumerate(rows):
            if r.task not in self.tasks:
                raise ValueError(f"row {r.uid}: task {r.task!r} has no route (routed tasks: {', '.join(self.tasks)})")
            out[i, self.tasks.index(r.task)] = 1.0
            out[i, len(self.tasks) + parse_class(r.prompt, self.num_classes)] = 1.0
        return out

    def null_cond(self, cond):
        out = cond.clone()
        out[:, len(self.tasks):] = 0.0
        return out

    def build_student(self, init: str, seed: int) -> nn.Module:
        if init != "random":
            folder = Path(init)
            meta = json.loads((folder / "config.json").read_text())
            model = ToyMLP(meta["dim"], meta["cond_dim"], meta["hidden"])
            model.load_state_dict(load_file(str(folder / "model.safetensors")))
            return model
        torch.manual_seed(seed)  # nn.Linear init draws from the global generator
        return ToyMLP(self.dim, self.cond_dim, self.hidden)

    def check_student(self, init: str) -> None:
        if init == "random":
            return  # a ToyMLP of the backend's own sizes always builds
        path = Path(init) / "config.json"
        try:
            meta = json.loads(path.read_text())
            got = {k: int(meta[k]) for k in ("dim", "cond_dim", "hidden")}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a toy model config ({type(e).__name__}: {e})") from None
        want = {"dim": self.dim, "cond_dim": self.cond_dim}
        for k, v in want.items():
            if got[k] != v:
                raise ValueError(f"{init}: toy model {k}={got[k]} does not match the toy backend ({v})")

    def save_student(self, model: nn.Module, path: Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps({"dim": model.dim, "cond_dim": model.cond_dim, "hidden": model.hidden}))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))

    def predict(self, model, z, sigma, cond):
        return model(z, sigma, cond)

    def build_teacher(self, teacher_cfg, base_dir: Path) -> TeacherField:
        if teacher_cfg.kind != "gaussian":
            raise ValueError(f"teacher {teacher_cfg.name}: the {self.name} backend only has gaussian teachers")
        means = teacher_means(teacher_cfg.name, teacher_cfg.seed, self.num_classes, self.dim)
        return GaussianTeacher(means, teacher_cfg.std, len(self.tasks))

    def target_mean(self, task: str, prompt: str) -> torch.Tensor:
        t = self._task_teacher[task]
        return teacher_means(t.name, t.seed, self.num_classes, self.dim)[parse_class(prompt, self.num_classes)]

    def data_target(self, rows: list[Row]) -> torch.Tensor:
        out = torch.empty(len(rows), self.dim)
        for i, r in enumerate(rows):
            g = torch.Generator().manual_seed(zlib.crc32(r.uid.encode()))
            std = self._task_teacher[r.task].std
            out[i] = self.target_mean(r.task, r.prompt) + std * torch.randn(self.dim, generator=g)
        return out
