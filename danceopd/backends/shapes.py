"""`shapes`: a tiny pixel-space diffusers SD3 transformer on ShapesBench images.

State: pixels [3, S, S] in [-1, 1] (no VAE, decode is the identity).
Condition (one flat fp32 vector, so it fits one Arrow tensor column):
    one-hot tokens [max_tokens x |VOCAB|]  ++  source image [3*S*S] (zeros for t2i)  ++  has_source [1]
Pad positions are one-hot <pad>, so an all-zero token block means "no text" (CFG's null branch,
which keeps the source image). The transformer sees the noisy state concatenated with the
source image on channels (6 in), the token one-hots, each with a one-hot position, as its text
sequence, and the mean of the one-hots over non-pad tokens as the pooled embedding.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from danceopd import shapes_world as sw
from danceopd.backends.base import Backend, Row, TeacherField
from danceopd.config import Config, ShapesBackendConfig
from danceopd.fields import gaussian_velocity
from danceopd.lora import apply_lora, has_lora, merged_copy

if TYPE_CHECKING:
    from diffusers import SD3Transformer2DModel


def _transformer_cls() -> type[SD3Transformer2DModel]:
    """diffusers, imported on first use: config checks import this module for its capabilities."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel


class ShapesCondition:
    """Packs and unpacks the flat condition vector."""

    def __init__(self, image_size: int, max_tokens: int):
        self.size, self.max_tokens, self.vocab = image_size, max_tokens, len(sw.VOCAB)
        self.n_tok = max_tokens * self.vocab
        self.n_src = 3 * image_size * image_size
        self.dim = self.n_tok + self.n_src + 1

    def pack(self, token_ids: list[int], source: np.ndarray | None) -> torch.Tensor:
        out = torch.zeros(self.dim)
        out[: self.n_tok].view(self.max_tokens, self.vocab)[torch.arange(self.max_tokens), torch.tensor(token_ids)] = 1.0
        if source is not None:
            out[self.n_tok: self.n_tok + self.n_src] = torch.from_numpy(np.ascontiguousarray(source)).reshape(-1)
            out[-1] = 1.0
        return out

    def tokens(self, cond: torch.Tensor) -> torch.Tensor:
        return cond[:, : self.n_tok].reshape(-1, self.max_tokens, self.vocab)

    def source(self, cond: torch.Tensor) -> torch.Tensor:
        return cond[:, self.n_tok: self.n_tok + self.n_src].reshape(-1, 3, self.size, self.size)

    def has_source(self, cond: torch.Tensor) -> torch.Tensor:
        return cond[:, -1] > 0.5

    def prompts(self, cond: torch.Tensor) -> list[str]:
        """The prompt of each condition ('' for the null condition)."""
        tok = self.tokens(cond)
        present = tok.sum(-1) > 0.5
        ids = torch.where(present, tok.argmax(-1), torch.full_like(present, sw.PAD_ID, dtype=torch.long))
        return [sw.detokenize(row.tolist()) for row in ids.cpu()]


def _pooled(tokens: torch.Tensor) -> torch.Tensor:
    """Mean one-hot over non-pad tokens; zeros for the null condition."""
    words = tokens.clone()
    words[..., sw.PAD_ID] = 0.0
    count = words.sum(dim=(1, 2)).clamp(min=1.0)
    return words.sum(1) / count[:, None]


def load_image(path: Path | None, size: int, what: str, uid: str) -> np.ndarray:
    """A row's image, checked (missing, oversized, unreadable, not size x size) before it is decoded."""
    if path is None:
        raise ValueError(f"row {uid}: no {what} image")
    try:
        return sw.load_png(path, size)
    except sw.ImageError as e:
        hint = " (backend.image_size)" if "expected" in str(e) else ""
        raise ValueError(f"row {uid}: {what} {e}{hint}") from None


class OracleTeacher(TeacherField):
    """Exact field of N(ground_truth(c), std^2 I): the ShapesBench answer, computed from the
    condition alone. The null condition's target is the source image (edits) or mid-grey.

    With `tasks` the oracle is a single-task specialist: it knows the answer only for prompts of
    those tasks, and on a condition of any other task it does not understand the text, so it
    answers as for the null condition (keeps the source image of an edit, mid-grey for t2i).
    Teachers of different tasks are then different fields, and a soft mixture of them is not the
    routed teacher's answer."""

    def __init__(self, packer: ShapesCondition, std: float, tasks: list[str] | None = None):
        unknown = sorted(set(tasks or ()) - set(sw.TASKS))
        if unknown:
            raise ValueError(f"unknown ShapesBench task {unknown[0]!r} in tasks (known: {', '.join(sw.TASKS)})")
        self.packer, self.std = packer, std
        self.tasks = None if tasks is None else frozenset(tasks)
        self._target = lru_cache(maxsize=4096)(self._target_uncached)

    def knows(self, prompt: str) -> bool:
        """Whether this oracle knows the task of a (non-empty) prompt."""
        return self.tasks is None or sw.parse_prompt(prompt).task in self.tasks

    def _target_uncached(self, prompt: str, source: bytes | None) -> torch.Tensor:
        s = self.packer.size
        src = None if source is None else np.frombuffer(source, np.float32).reshape(3, s, s)
        if not prompt or not self.knows(prompt):
            return torch.zeros(3, s, s) if src is None else torch.from_numpy(src.copy())
        return torch.from_numpy(sw.ground_truth(prompt, src, s))

    def targets(self, cond: torch.Tensor) -> torch.Tensor:
        cond = cond.detach().float().cpu()
        srcs, has = self.packer.source(cond).numpy(), self.packer.has_source(cond)
        return torch.stack([
            self._target(p, srcs[i].tobytes() if has[i] else None) for i, p in enumerate(self.packer.prompts(cond))
        ])

    @torch.no_grad()
    def velocity(self, z, sigma, cond):
        mu = self.targets(cond).to(device=z.device, dtype=z.dtype)
        return gaussian_velocity(z, sigma.to(z.device), mu, self.std)


class PretrainedTeacher(TeacherField):
    """A frozen save_pretrained folder of the shapes transformer."""

    def __init__(self, backend: ShapesBackend, model: nn.Module):
        self.backend, self.model = backend, model.eval().requires_grad_(False)

    def to(self, device) -> PretrainedTeacher:
        self.model.to(device)
        return self

    @torch.no_grad()
    def velocity(self, z, sigma, cond):
        dev = next(self.model.parameters()).device
        return self.backend.predict(self.model, z.to(dev), sigma.to(dev), cond.to(dev)).to(z.device)


class ShapesBackend(Backend):
    name = "shapes"
    teacher_kinds = ("oracle", "pretrained")
    exports = "model"

    def __init__(self, cfg: Config):
        self.cfg = cfg
        b: ShapesBackendConfig = cfg.backend
        try:
            sw.check_size(b.image_size)
        except ValueError as e:
            raise ValueError(f"backend.image_size: {e}") from None
        self.size, self.patch_size = b.image_size, b.patch_size
        self.num_layers, self.num_heads, self.head_dim = b.num_layers, b.num_heads, b.head_dim
        self.packer = ShapesCondition(b.image_size, b.max_tokens)

    @property
    def state_shape(self):
        return (3, self.size, self.size)

    @property
    def cond_dim(self):
        return self.packer.dim

    # ---- conditions ------------------------------------------------------------------------
    def encode(self, rows: list[Row]) -> torch.Tensor:
        out = torch.empty(len(rows), self.cond_dim)
        for i, r in enumerate(rows):
            words = r.prompt.split()
            unknown = [w for w in words if w not in sw.VOCAB or w in (sw.PAD, sw.UNK)]
            if unknown:
                raise ValueError(f"row {r.uid}: prompt word {unknown[0]!r} is not in the ShapesBench vocabulary")
            if len(words) > self.packer.max_tokens:
                raise ValueError(f"row {r.uid}: prompt has {len(words)} words, more than backend.max_tokens={self.packer.max_tokens}")
            src = None if r.source_image is None else load_image(r.source_image, self.size, "source", r.uid)
            out[i] = self.packer.pack(sw.tokenize(r.prompt, self.packer.max_tokens), src)
        return out

    def null_cond(self, cond):
        out = cond.clone()
        out[:, : self.packer.n_tok] = 0.0
        return out

    # ---- student ---------------------------------------------------------------------------
    def _new_model(self) -> SD3Transformer2DModel:
        v = len(sw.VOCAB)
        return _transformer_cls()(
            sample_size=self.size, patch_size=self.patch_size, in_channels=6, out_channels=3,
            num_layers=self.num_layers, attention_head_dim=self.head_dim, num_attention_heads=self.num_heads,
            joint_attention_dim=v + self.packer.max_tokens, caption_projection_dim=self.num_heads * self.head_dim,
            pooled_projection_dim=v, pos_embed_max_size=self.size // self.patch_size,
        )

    def load_model(self, folder: str | Path) -> SD3Transformer2DModel:
        """A save_pretrained folder, checked against this backend's shapes."""
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise ValueError(f"{folder}: not a save_pretrained model folder (no config.json)")
        model = _transformer_cls().from_pretrained(folder, use_safetensors=True)
        c = model.config
        for k, v in self._model_shapes().items():
            if c[k] != v:
                raise ValueError(f"{folder}: model {k}={c[k]} does not match the shapes backend ({v})")
        return model

    def _model_shapes(self) -> dict:
        """The config.json entries a model folder must have to fit this backend."""
        return {"sample_size": self.size, "patch_size": self.patch_size, "in_channels": 6, "out_channels": 3,
                "joint_attention_dim": len(sw.VOCAB) + self.packer.max_tokens, "pooled_projection_dim": len(sw.VOCAB)}

    def check_model_folder(self, folder: str | Path) -> dict:
        """A save_pretrained folder's config.json, checked against this backend's shapes the way
        `load_model` checks the loaded model, but without reading a weight."""
        folder = Path(folder)
        try:
            c = _transformer_cls().load_config(folder)
        except Exception as e:  # diffusers raises OSError / ValueError on a missing or bad file
            detail = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f"{folder}: not a readable model config ({detail})") from None
        for k, v in self._model_shapes().items():
            if c.get(k) != v:
                raise ValueError(f"{folder}: model {k}={c.get(k)} does not match the shapes backend ({v})")
        return c

    def check_student(self, init: str) -> None:
        config = None if init == "random" else self.check_model_folder(self.cfg.resolve(init))
        if not self.cfg.student.lora.enabled:
            return
        with torch.device("meta"):  # module names only: no memory, no weights
            model = self._new_model() if config is None else _transformer_cls().from_config(config)
        apply_lora(model, self.cfg.student.lora)

    def check_row(self, row: Row, needs_target: bool = False, teachers: tuple[TeacherField, ...] = ()) -> None:
        # A row's target image is checked whenever it has one (evaluation and sft read it).
        super().check_row(row, needs_target or row.target_image is not None, teachers)

    def build_student(self, init: str, seed: int) -> nn.Module:
        # Fork the RNG so seeding the init (and the LoRA adapters) leaves global state alone.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self._new_model() if init == "random" else self.load_model(self.cfg.resolve(init))
            return apply_lora(model, self.cfg.student.lora)

    def save_student(self, model: nn.Module, path: Path) -> None:
        # A LoRA student is saved merged: a plain folder that loads as a student or a teacher.
        plain = merged_copy(model) if has_lora(model) else model
        plain.save_pretrained(str(path), safe_serialization=True)

    def predict(self, model, z, sigma, cond):
        cond = cond.to(device=z.device, dtype=z.dtype)
        tokens = self.packer.tokens(cond)
        hidden = torch.cat([z, self.packer.source(cond)], dim=1)
        timestep = (1000.0 * sigma.reshape(-1)).to(device=z.device, dtype=z.dtype).expand(z.shape[0])
        # SD3's joint attention is permutation-equivariant over text tokens and the one-hots carry
        # no position: a one-hot position per token keeps "a red circle on a blue background"
        # apart from "a blue circle on a red background" (real text encoders bring their own).
        pos = torch.eye(self.packer.max_tokens, device=z.device, dtype=z.dtype).expand(z.shape[0], -1, -1)
        text = torch.cat([tokens, pos], dim=-1)
        return model(hidden_states=hidden, encoder_hidden_states=text, pooled_projections=_pooled(tokens),
                     timestep=timestep, return_dict=True).sample

    # ---- teachers and data -----------------------------------------------------------------
    def build_teacher(self, teacher_cfg, base_dir: Path) -> TeacherField:
        if teacher_cfg.kind == "oracle":
            try:
                return OracleTeacher(self.packer, teacher_cfg.std, teacher_cfg.tasks)
            except ValueError as err:
                raise ValueError(f"teacher {teacher_cfg.name}: {err}") from None
        if teacher_cfg.kind == "pretrained":
            p = Path(teacher_cfg.path).expanduser()
            folder = p if p.is_absolute() else Path(base_dir) / p
            return PretrainedTeacher(self, self.load_model(folder))
        raise ValueError(f"teacher {teacher_cfg.name}: kind {teacher_cfg.kind!r} is not available on the shapes backend (oracle, pretrained)")

    def data_target(self, rows: list[Row]) -> torch.Tensor:
        return torch.stack([torch.from_numpy(load_image(r.target_image, self.size, "target", r.uid)) for r in rows])

    def sample_metrics(self, task: str, images: torch.Tensor, rows: list[Row]) -> dict[str, float]:
        from danceopd.evaluate import shapes_metrics  # evaluation imports the backends

        return shapes_metrics(task, images.numpy(), rows)
