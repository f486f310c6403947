"""What the diffusers latent-space backends (`sd3`, `zimage`) share.

A pipeline folder (`backend.pretrained`, the layout `save_pretrained` writes: model_index.json,
transformer/, vae/, scheduler/, text encoders and tokenizers) is read with `from_pretrained`
(safetensors only). The state is the VAE latent [C, R/f, R/f] of the training bucket R.

Conditions are cache handles (`danceopd.cond_cache`): text embeddings and source/target latents
are encoded once per row by `build_cache`, and `predict` gathers them from the memory-mapped
cache on the device that runs the transformer. Encoders are loaded only to build the cache (and
the VAE's decoder only to decode), never in a rollout worker's or teacher's steady state.

Student: `random` (seeded, the base transformer's config), `base`, or a transformer folder (a
full checkpoint), optionally with a PEFT LoRA folder merged in (`student.init_lora`); trained
full or as LoRA (`student.lora`). Teachers: the base, a full checkpoint (`path`), a LoRA merged
into either (`lora`), or several LoRA `adapters` switchable on one frozen backbone.

On a GPU the transformer computes under bf16 autocast (`backend.dtype`); states, velocities
and everything the integrator and losses see stay fp32.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from danceopd import cond_cache as cc
from danceopd.backends.base import Backend, Row, TeacherField
from danceopd.config import LatentBackendConfig
from danceopd.lora import apply_lora, has_lora, load_lora_folder, merged_copy, set_active_adapter

if TYPE_CHECKING:  # annotations only: no import cycle, no cost
    from danceopd.config import Config


def quiet_libraries() -> None:
    """diffusers' and transformers' own progress bars and info lines ("Loading pipeline
    components...", "Loading weights") would interleave with ours in every actor: off."""
    import diffusers
    import transformers

    for lib in (diffusers, transformers):
        lib.utils.logging.disable_progress_bar()
        lib.utils.logging.set_verbosity_error()


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"{path.parent}: no {path.name} ({what})") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not readable JSON ({e})") from None


def transformer_folder(path: Path) -> Path:
    """A transformer folder, given it or the pipeline folder that holds it."""
    path = Path(path)
    if (path / "model_index.json").is_file():
        return path / "transformer"
    return path


class LatentTeacher(TeacherField):
    """A frozen transformer; with `adapters`, several LoRA fields on one backbone, one active."""

    def __init__(self, backend: LatentBackend, model: nn.Module, adapters: tuple[str, ...] = ()):
        self.backend, self.model = backend, model.eval().requires_grad_(False)
        self.adapters = adapters
        self.active = adapters[0] if adapters else None

    def use(self, adapter: str | None) -> None:
        if not self.adapters:
            if adapter:
                raise ValueError(f"this teacher has no adapters (asked for {adapter!r})")
            return
        if adapter not in self.adapters:
            raise ValueError(f"adapter {adapter!r} is not one of {', '.join(self.adapters)}")
        if adapter != self.active:
            set_active_adapter(self.model, adapter)
            self.model.requires_grad_(False)
            self.active = adapter

    @torch.no_grad()
    def velocity(self, z, sigma, cond):
        return self.backend.predict(self.model, z, sigma, cond)


class LatentBackend(Backend):
    """Subclasses give the family: `transformer_class`, `default_seq_len`, `encoder_components`,
    `text_fields`, `_load_encoders`/`_free_encoders`, `encode_rows`, `forward`, `load_vae`,
    `vae_decode`."""

    teacher_kinds = ("pretrained",)
    pipeline = True
    condition_cache = True
    exports = "pipeline"
    transformer_class: str  # the diffusers class of the family's transformer
    default_seq_len: int = 256
    encoder_components: tuple[str, ...] = ()  # pipeline sub-folders whose weights decide the cache

    def __init__(self, cfg: Config):
        quiet_libraries()
        self.cfg = cfg
        self.section: LatentBackendConfig = cfg.backend
        b = self.section
        self.root = cfg.resolve(b.pretrained)
        self.seq_len = b.max_sequence_length or self.default_seq_len
        self.resolution = b.resolution
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        self.compute_dtype = torch.bfloat16 if (b.dtype == "bfloat16" and self.device.type == "cuda") else torch.float32
        self._cache: cc.ConditionCache | None = None
        self._extra: list[dict[str, torch.Tensor]] = []  # rows encoded on demand (not dataset rows)
        self._extra_index: dict[str, int] = {}
        self._vae = None
        self._on_device: tuple[tuple, dict[str, torch.Tensor]] | None = None  # the last gather, see predict
        self._read_configs()

    # ---- configs (no weights) ------------------------------------------------------------------
    def _read_configs(self) -> None:
        if not (self.root / "model_index.json").is_file():
            raise ValueError(f"backend.pretrained: {self.root} is not a diffusers pipeline folder (no model_index.json)")
        self.model_index = read_json(self.root / "model_index.json", "pipeline index")
        self.transformer_config = read_json(self.root / "transformer" / "config.json", "transformer config")
        self.vae_config = read_json(self.root / "vae" / "config.json", "VAE config")
        self.scheduler_config = read_json(self.root / "scheduler" / "scheduler_config.json", "scheduler config")
        self.vae_scale = 2 ** (len(self.vae_config["block_out_channels"]) - 1)
        self.latent_channels = int(self.vae_config["latent_channels"])
        if self.resolution % (self.vae_scale * self.patch_size):
            raise ValueError(f"backend.resolution: {self.resolution} is not a multiple of the VAE factor x patch size "
                             f"({self.vae_scale} x {self.patch_size})")
        self.latent_size = self.resolution // self.vae_scale

    @property
    def transformer_cls(self) -> type:
        import diffusers

        return getattr(diffusers, self.transformer_class)

    @property
    def patch_size(self) -> int:
        c = self.transformer_config
        return int(c["patch_size"] if "patch_size" in c else c["all_patch_size"][0])

    @property
    def state_shape(self):
        return (self.latent_channels, self.latent_size, self.latent_size)

    @property
    def cond_dim(self):
        return cc.HANDLE_DIM

    def compat_signature(self, transformer_cfg: dict | None = None, pipeline: Path | None = None) -> dict:
        """What student and teachers must agree on to share states and conditions: scheduler
        family and shift, latent channels, resolution bucket, patch size, text-encoder identity.
        `pipeline`: a teacher's own pipeline folder (its scheduler and text encoders)."""
        c = transformer_cfg or self.transformer_config
        root = Path(pipeline) if pipeline else self.root
        sched = self.scheduler_config if pipeline is None else read_json(root / "scheduler" / "scheduler_config.json", "scheduler config")
        in_ch = c.get("in_channels")
        return {
            "scheduler": f"{sched.get('_class_name')} shift={sched.get('shift', 1.0)}",
            "latent channels": in_ch,
            "out channels": c.get("out_channels", in_ch),
            "patch size": c.get("patch_size", (c.get("all_patch_size") or [None])[0]),
            "resolution": self.resolution,
            "text encoders": self.text_encoder_fingerprint(root),
            **self._text_signature(c),
        }

    def text_encoder_fingerprint(self, root: Path) -> str:
        """Digest of the text encoders' and tokenizers' configs of a pipeline folder: a teacher
        trained against other text encoders reads our cached embeddings wrongly."""
        parts = {}
        for comp in self.encoder_components:
            folder = Path(root) / comp
            if folder.is_dir():
                parts[comp] = {p.name: p.read_text() for p in sorted(folder.glob("*.json"))}
        return cc.fingerprint(parts)[:12]

    def _text_signature(self, c: dict) -> dict:
        """Transformer config entries that fix which text encoder it was trained against."""
        return {}

    # ---- the condition cache --------------------------------------------------------------------
    def encoder_fingerprint(self) -> dict:
        parts = {"family": self.name, "resolution": self.resolution, "seq_len": self.seq_len,
                 "schema": cc.SCHEMA_VERSION, "vae_scale": self.vae_scale}
        for comp in ("vae", *self.encoder_components):
            folder = self.root / comp
            parts[comp] = cc.folder_identity(folder) if folder.is_dir() else None
        return parts

    def cache_fingerprint(self, rows: list[Row]) -> str:
        root = self.cfg.resolve(self.cfg.data.path).parent  # images are named relative to the data file

        def ident(p):
            return cc.file_identity(p, root) if p is not None and Path(p).is_file() else None

        row_parts = [[r.uid, r.task, r.prompt, ident(r.source_image), ident(r.target_image)] for r in rows]
        return cc.fingerprint({"encoders": self.encoder_fingerprint(), "rows": row_parts})

    def cache_folder(self) -> Path:
        b = self.section
        return self.cfg.resolve(b.cache_dir) if b.cache_dir else self.cfg.resolve(self.cfg.data.path).parent / ".danceopd-cache"

    def cache_path(self, rows: list[Row]) -> Path:
        return self._cache_file(self.cache_fingerprint(rows))

    def _cache_file(self, fp: str) -> Path:
        return self.cache_folder() / f"{self.name}-{fp[:20]}.arrow"

    def _dataset_rows(self) -> list[Row]:
        from danceopd.dataset import Dataset

        routed = {r.task for r in self.cfg.routing.routes}
        return [r for r in Dataset.load(self.cfg.resolve(self.cfg.data.path)).rows if r.task in routed]

    @property
    def cache(self) -> cc.ConditionCache:
        if self._cache is None:
            rows = self._dataset_rows()
            fp = self.cache_fingerprint(rows)  # reads every row's image heads: once per process
            self._cache = cc.ConditionCache(self._cache_file(fp), fp)
        return self._cache

    def cache_status(self, rows: list[Row] | None = None) -> tuple[Path, bool]:
        """(path, current) of the cache, from the file's metadata only: no encoder is loaded and
        no cached row read (what the Ray driver checks before asking a worker to build it)."""
        rows = self._dataset_rows() if rows is None else rows
        fp = self.cache_fingerprint(rows)
        path = self._cache_file(fp)
        return path, cc.stored_fingerprint(path) == fp

    def build_cache(self, rows: list[Row] | None = None, progress=None, force: bool = False) -> tuple[Path, bool]:
        """Encode every row (plus the empty prompt as row 0) once; returns (path, built). A cache
        whose fingerprint matches is reused; any other is never read."""
        rows = self._dataset_rows() if rows is None else rows
        fp = self.cache_fingerprint(rows)
        path = self._cache_file(fp)
        if path.is_file() and not force:
            try:
                cc.ConditionCache(path, fp)
                return path, False
            except (cc.StaleCacheError, OSError, ValueError):
                pass  # same name, other contents (a crash, a copy): rebuild
        uids = [cc.NULL_UID, *[r.uid for r in rows]]
        self._load_encoders()
        try:
            def encode(pos: list[int]) -> dict[str, torch.Tensor]:
                batch = [None if p == 0 else rows[p - 1] for p in pos]
                return self.encode_rows(batch)

            cc.build(path, fp, uids, encode, batch_size=8, progress=progress)
        finally:
            self._free_encoders()
        self._cache, self._extra, self._extra_index, self._on_device = None, [], {}, None
        return path, True

    # ---- Backend contract -----------------------------------------------------------------------
    def encode(self, rows: list[Row]) -> torch.Tensor:
        """Cache handles of `rows`. A row the cache does not hold (a prompt typed into `danceopd
        sample`, not a dataset row) is encoded here once, in memory: that loads the encoders."""
        missing = list({r.uid: r for r in rows if r.uid not in self.cache.index and r.uid not in self._extra_index}.values())
        if missing:
            self._load_encoders()
            try:
                fields = self.encode_rows(missing)
            finally:
                self._free_encoders()
            for k, r in enumerate(missing):
                self._extra_index[r.uid] = len(self.cache) + len(self._extra)
                self._extra.append({f: t[k] for f, t in fields.items()})
        return cc.handles([self.cache.index.get(r.uid, self._extra_index.get(r.uid)) for r in rows])

    def _fetch(self, indices: list[int], field: str) -> torch.Tensor:
        """Rows of one cached field; indices past the file are the in-memory extra rows."""
        n = len(self.cache)
        if all(i < n for i in indices):
            return self.cache.get(indices, field)
        return torch.stack([self.cache.get([i], field)[0] if i < n else self._extra[i - n][field] for i in indices])

    def null_cond(self, cond):
        return cc.null_handles(cond)

    def conditions_on(self, cond, device):
        return cond  # handles stay on the host: predict reads the cache with them (`device_fields`)

    def check_row(self, row: Row, needs_target: bool = False, teachers: tuple[TeacherField, ...] = ()) -> None:
        # Rows are checked by reading their images here; encoders run only when the cache is built.
        from danceopd.backends.images import check_image

        if row.source_image is not None:
            check_image(row.source_image, "source", row.uid)
        if needs_target or row.target_image is not None:
            check_image(row.target_image, "target", row.uid)

    def data_target(self, rows: list[Row]) -> torch.Tensor:
        """Cached target latents (families cache `target_latents` and a `has_target` flag)."""
        idx = self.cache.indices([r.uid for r in rows])
        missing = [r.uid for r, h in zip(rows, self._fetch(idx, "has_target")[:, 0].tolist()) if h < 0.5]
        if missing:
            raise ValueError(f"row {missing[0]}: no target image (needed by this method)")
        return self._fetch(idx, "target_latents")

    def gather(self, cond: torch.Tensor, device) -> dict[str, torch.Tensor]:
        """Cached fields of each handle on `device`: text fields from the row (text on) or from
        the empty prompt (row 0), image fields always from the row."""
        idx = cc.handle_indices(cond)
        text_on = cc.handle_text_on(cond)
        rows = idx.tolist()
        text_rows = torch.where(text_on, idx, torch.zeros_like(idx)).tolist()
        out = {}
        for f in self.cache.fields:
            out[f] = self._fetch(text_rows if f in self.text_fields else rows, f).to(device)
        return out

    text_fields: tuple[str, ...] = ()

    def device_fields(self, cond: torch.Tensor, device) -> dict[str, torch.Tensor]:
        """`gather`, with its last answer kept on the device: a rollout asks for the same rows at
        every Euler step, and megabytes of text embeddings read and copied to the GPU per step
        would be a host round trip per step. Keyed by the handles' values (3 floats a row)."""
        key = (str(device), tuple(cond.reshape(-1).tolist()))
        if self._on_device is None or self._on_device[0] != key:
            self._on_device = (key, self.gather(cond, device))
        return dict(self._on_device[1])

    def predict(self, model, z, sigma, cond):
        dev = next(model.parameters()).device
        fields = self.device_fields(cond, dev)
        timestep = (1000.0 * sigma.reshape(-1).float()).to(dev).expand(z.shape[0])
        # bf16 autocast where configured (GPU); whatever the transformer computes in, the velocity
        # the integrator, the router and the losses see is fp32.
        amp = torch.autocast(dev.type, dtype=self.compute_dtype) if self.compute_dtype != torch.float32 else nullcontext()
        with amp:
            v = self.forward(model, z.to(dev, torch.float32), timestep, fields)
        return v.float().to(z.device)

    # ---- models -----------------------------------------------------------------------------------
    def _check_transformer_folder(self, folder: Path, key: str) -> dict:
        pipeline = Path(folder) if (Path(folder) / "model_index.json").is_file() else None
        folder = transformer_folder(folder)
        c = read_json(folder / "config.json", "transformer config")
        if not any(folder.glob("*.safetensors")):
            raise ValueError(f"{folder}: no .safetensors weights (pickle checkpoints are refused)")
        mine, theirs = self.compat_signature(), self.compat_signature(c, pipeline)
        for k in mine:
            if mine[k] != theirs[k]:
                raise ValueError(f"{folder}: {k} {theirs[k]} does not match the student's {mine[k]} (backend.pretrained)")
        return c

    def check_model_folder(self, folder) -> dict:
        return self._check_transformer_folder(Path(folder), "model folder")

    def load_transformer(self, folder: Path) -> nn.Module:
        self._check_transformer_folder(folder, "model folder")
        return self.transformer_cls.from_pretrained(transformer_folder(folder), use_safetensors=True, dtype=torch.float32)

    def _student_source(self, init: str) -> Path | None:
        if init == "random":
            return None
        return self.root if init == "base" else Path(init)

    def check_student(self, init: str) -> None:
        src = self._student_source(init)
        config = self.transformer_config if src is None else self.check_model_folder(src)
        if self.cfg.student.init_lora:
            from danceopd.lora import check_lora_folder

            check_lora_folder(self.cfg.resolve(self.cfg.student.init_lora))
        with torch.device("meta"):
            model = self.transformer_cls.from_config(config)
        apply_lora(model, self.cfg.student.lora)

    def build_student(self, init: str, seed: int) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            src = self._student_source(init)
            if src is None:
                model = self.transformer_cls.from_config(self.transformer_config)
            else:
                model = self.load_transformer(src)
            if self.cfg.student.init_lora:
                model = load_lora_folder(model, self.cfg.resolve(self.cfg.student.init_lora), "init", merge=True)
            if self.section.gradient_checkpointing:
                model.enable_gradient_checkpointing()
            model = apply_lora(model, self.cfg.student.lora)
        return model.to(self.device)

    def save_student(self, model: nn.Module, path: Path) -> None:
        plain = merged_copy(model) if has_lora(model) else model
        plain.save_pretrained(str(path), safe_serialization=True)

    def build_teacher(self, teacher_cfg, base_dir: Path) -> TeacherField:
        folder = self.cfg.resolve(teacher_cfg.path) if teacher_cfg.path else self.root
        model = self.load_transformer(folder)
        if teacher_cfg.lora:
            model = load_lora_folder(model, self.cfg.resolve(teacher_cfg.lora), "merged", merge=True)
        names: tuple[str, ...] = ()
        if teacher_cfg.adapters:
            for name, lora in teacher_cfg.adapters.items():
                model = load_lora_folder(model, self.cfg.resolve(lora), name)
            names = tuple(teacher_cfg.adapters)
            set_active_adapter(model, names[0])
        model = model.to(self.device)
        if self.compute_dtype == torch.bfloat16:
            model = model.to(torch.bfloat16)  # frozen: half the memory, same autocast compute
        return LatentTeacher(self, model, names)

    # ---- evaluation ---------------------------------------------------------------------------------
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1] through the VAE decoder (loaded on first use)."""
        if self._vae is None:
            self._vae = self.load_vae().to(self.device).eval().requires_grad_(False)
        with torch.no_grad():
            return self.vae_decode(self._vae, z.to(self.device, torch.float32)).float().cpu()

    # ---- family hooks -------------------------------------------------------------------------------
    def _load_encoders(self) -> None:
        raise NotImplementedError

    def _free_encoders(self) -> None:
        raise NotImplementedError

    def encode_rows(self, rows: list[Row | None]) -> dict[str, torch.Tensor]:
        """Cached fields of each row (None: the empty prompt, image fields zero)."""
        raise NotImplementedError

    def forward(self, model, z, timestep, fields: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def load_vae(self):
        raise NotImplementedError

    def vae_decode(self, vae, z):
        raise NotImplementedError


def write_tiny_loras(pipeline: Path, names: list[str], seed: int = 0) -> list[Path]:
    """Random PEFT LoRA folders for a tiny pipeline's transformer, at `pipeline/loras/NAME`:
    stand-ins for trained LoRA teachers (realism, style...) that share one backbone."""
    from types import SimpleNamespace

    import diffusers

    from danceopd.lora import write_random_lora

    _, cls_name = read_json(Path(pipeline) / "model_index.json", "pipeline index")["transformer"]
    model = getattr(diffusers, cls_name).from_pretrained(Path(pipeline) / "transformer", use_safetensors=True)
    spec = SimpleNamespace(enabled=True, rank=4, alpha=4.0, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    out = []
    for i, name in enumerate(names):
        folder = Path(pipeline) / "loras" / name
        write_random_lora(model, folder, spec, seed=seed * 1000 + i + 1)
        out.append(folder)
    return out

