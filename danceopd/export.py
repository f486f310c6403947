"""`danceopd export CHECKPOINT --out DIR`: a checkpoint's student as a folder diffusers loads.

- `sd3`, `zimage` (`Backend.exports == "pipeline"`): DIR is a diffusers pipeline folder: the job's
  base pipeline (`backend.pretrained`: model_index.json, the VAE, text encoders, tokenizers,
  scheduler and its top-level files, a licence included, copied byte for byte) whose
  `transformer/` is the student, its LoRA merged: `StableDiffusion3Pipeline.from_pretrained(DIR)`,
  `ZImagePipeline.from_pretrained(DIR)`. A LoRA student trained on the base's own transformer
  (`student.init: base`, no `init_lora`) also gets `DIR/lora/pytorch_lora_weights.safetensors`,
  written by the pipeline class's `save_lora_weights` with its rank and alpha: the base pipeline
  takes it with `load_lora_weights(DIR/lora)`. `lora_only`: that folder alone (no base copy).
- `shapes` (`"model"`): DIR is the student's `SD3Transformer2DModel` folder, LoRA merged.
- `toy`, `sim`: no diffusers model: refused.

Each export also holds `danceopd_export.json` (which checkpoint, step, run and base it came from).
It is written into a temporary sibling of DIR and renamed into place once whole, so a failed or
interrupted export leaves no half folder (nor harms the DIR it was to replace).
"""

from __future__ import annotations

import json
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from danceopd.checkpoint import damage, fsync, load_json

if TYPE_CHECKING:  # annotations only: no import cycle, no cost
    from danceopd.config import Config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
RECORD = "danceopd_export.json"
LORA = "lora"


@dataclass(frozen=True)
class Exported:
    out: Path
    kind: str  # pipeline | model
    pipeline_class: str | None
    dtype: str
    lora: bool  # OUT/lora written
    merged: bool  # the merged pipeline / model written
    note: str | None  # why a LoRA student got no lora/ folder

    def summary(self) -> str:
        parts = []
        if self.merged:
            what = f"a {self.pipeline_class} folder" if self.kind == "pipeline" else "the student's model folder"
            parts.append(f"{what} ({self.dtype} transformer, the student merged)")
        if self.lora:
            parts.append(f"LoRA weights in {LORA}/ (load_lora_weights on the base pipeline)")
        text = f"wrote {self.out}: " + " + ".join(parts)
        return text + (f"; {self.note}" if self.note else "")


def check_checkpoint(path: Path) -> None:
    """A complete, undamaged checkpoint folder, or a one-line ValueError."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path}: no such checkpoint folder")
    if not (path / "COMPLETE").is_file():
        raise ValueError(f"{path}: not a complete checkpoint folder (no COMPLETE)")
    why = damage(path)
    if why:
        raise ValueError(f"{path}: the checkpoint is damaged: {why}")


def check_out(out: Path, overwrite: bool, keep: dict[str, Path]) -> None:
    """`out` is new, empty, or (with `overwrite`) a folder to replace; never one of `keep` (what
    the export reads), a folder holding one, or a folder inside one."""
    out = Path(out).resolve()
    for what, p in keep.items():
        p = Path(p).resolve()
        if out == p or out in p.parents or p in out.parents:
            raise ValueError(f"--out: {out} overlaps the {what} {p}; pick a folder outside it")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out: {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"--out: {out} is not empty; pass --overwrite to replace it")


def base_dtype(transformer: Path) -> str:
    """The dtype the base transformer's weights are stored in (float32 if not one of ours)."""
    from safetensors import safe_open

    for f in sorted(Path(transformer).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                return SAFETENSORS_DTYPES.get(st.get_slice(k).get_dtype(), "float32")
    return "float32"


def export(cfg: Config, checkpoint: Path, out: Path, overwrite: bool = False, dtype: str = "auto",
           lora_only: bool = False, weights: Path | None = None) -> Exported:
    """Write `checkpoint`'s student (trained with `cfg`) to `out`. Checks first, then loads.
    `weights`: the checkpoint's weights file to export (default model.safetensors; the CLI passes
    the one `eval.weights` picks, ema.safetensors for `ema`)."""
    from danceopd.backends import backend_class, backends_where
    from danceopd.backends.latent import read_json

    checkpoint, out = Path(checkpoint), Path(out)
    check_checkpoint(checkpoint)
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"--dtype: {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    kind = backend_class(cfg.backend.name).exports
    if kind is None:
        raise ValueError(f"backend.name: the {cfg.backend.name} student is no diffusers model, nothing to export "
                         f"(export: {', '.join(backends_where(lambda c: c.exports is not None))})")
    keep = {"checkpoint": checkpoint}
    index, root, pipeline_cls = None, None, None
    if kind == "pipeline":
        root = cfg.resolve(cfg.backend.pretrained)
        index = read_json(root / "model_index.json", "backend.pretrained, the job's base pipeline: --set "
                          "backend.pretrained=PATH names a copy on this machine")
        pipeline_cls = index.get("_class_name")
        keep["base pipeline"] = root
    lora = cfg.student.lora.enabled
    lora_on_base = lora and kind == "pipeline" and cfg.student.init == "base" and not cfg.student.init_lora
    note = None
    if lora and not lora_on_base:
        note = ("no lora/: a shapes student has no pipeline to load it" if kind == "model" else
                "no lora/: the student's LoRA sits on student.init / student.init_lora, not on the base "
                "pipeline's transformer (the merged pipeline holds it)")
    if lora_only and not lora_on_base:
        raise ValueError("--lora-only: " + ("the student is not a LoRA (student.lora.enabled is false)" if not lora
                                            else note.removeprefix("no lora/: ")))
    check_out(out, overwrite, keep)
    if dtype == "auto":
        dtype = base_dtype(root / "transformer") if root is not None else "float32"

    from danceopd.evaluate import load_student
    from danceopd.lora import has_lora, merge_in_place

    _, model = load_student(cfg, weights or checkpoint / "model.safetensors")
    state = load_json(checkpoint / "state.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.export-{secrets.token_hex(3)}"
    tmp.mkdir()
    try:
        if lora_on_base:
            write_lora(model, pipeline_cls, tmp / LORA)
        if not lora_only:
            model = merge_in_place(model) if has_lora(model) else model
            model = model.to(DTYPES[dtype])
            if kind == "pipeline":
                copy_base(root, index, tmp)
                model.save_pretrained(str(tmp / "transformer"), safe_serialization=True)
            else:
                model.save_pretrained(str(tmp), safe_serialization=True)
        record = {"checkpoint": str(checkpoint.resolve()), "step": state.get("step"), "run_id": state.get("run_id"),
                  "backend": cfg.backend.name, "base": str(root.resolve()) if root else None,
                  "pipeline_class": pipeline_cls, "transformer_dtype": None if lora_only else dtype,
                  "lora": f"{LORA}/" if lora_on_base else None}
        (tmp / RECORD).write_text(json.dumps(record, indent=1) + "\n")
        for p in sorted(tmp.rglob("*")):  # on disk before the rename makes it the export
            fsync(p)
        replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Exported(out, kind, pipeline_cls, dtype, lora_on_base, not lora_only, note)


def write_lora(model, pipeline_cls: str, folder: Path) -> None:
    """The student's adapter as the pipeline class writes LoRA weights (diffusers' key layout,
    peft's rank and alpha in the safetensors metadata, so `load_lora_weights` scales it right)."""
    import diffusers
    from peft import get_peft_model_state_dict

    cls = getattr(diffusers, pipeline_cls, None)
    if cls is None or not hasattr(cls, "save_lora_weights"):
        raise ValueError(f"backend.pretrained: pipeline class {pipeline_cls} has no save_lora_weights in diffusers "
                         f"{diffusers.__version__}; pass --lora-only only for a pipeline that loads LoRA")
    layers = {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    cls.save_lora_weights(str(folder), transformer_lora_layers=layers,
                          transformer_lora_adapter_metadata=model.peft_config["default"].to_dict())


def copy_base(root: Path, index: dict, dst: Path) -> None:
    """The base pipeline folder less its transformer: its top-level files and every component
    folder model_index.json names (links followed: a hub cache snapshot holds links to blobs)."""
    for f in root.iterdir():
        if f.is_file():
            shutil.copy2(f, dst / f.name)
    for name, entry in index.items():
        if name.startswith("_") or name == "transformer" or not isinstance(entry, list) or entry[0] is None:
            continue
        if not (root / name).is_dir():
            raise ValueError(f"backend.pretrained: {root} has no {name}/ (model_index.json names it)")
        shutil.copytree(root / name, dst / name)


def replace(tmp: Path, out: Path) -> None:
    """Rename the finished `tmp` to `out`; an existing `out` is moved aside first and removed only
    once the new one is in place."""
    old = None
    if out.is_dir():
        old = out.parent / f".{out.name}.old-{secrets.token_hex(3)}"
        out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        if old is not None:
            old.rename(out)
        raise
    fsync(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
