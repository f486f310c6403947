"""The one typed configuration of a DanceOPD job.

Every knob is declared here once, with its default, bounds and one line of help (the
``description``); the configuration reference (docs/configuration.md) is generated from these models
(``danceopd config-doc``) and a test checks that it is current.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)


class ConfigError(ValueError):
    """A configuration problem, phrased as one line naming the key and the reason."""


SEED_MAX = 2**32 - 1  # numpy's seeding limit
MAX_WORKERS = 1024  # bound of every actor count (workers, replicas, ranks)
MAX_RESOURCE = 1024.0  # bound of CPUs / GPUs of one actor
MAX_TIMEOUT_S = 7 * 86400.0  # bound of every timeout (huge ones overflow timedelta / ray.get)
MAX_SCALE = 100.0  # bound of CFG scales


_PLAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def _plain_name(v: str) -> str:
    # Route and teacher names become file names (eval grids, `danceopd sample` PNGs) and metrics
    # labels: no path separator, no `..`, nothing a file system or a shell reads specially.
    if not _PLAIN.fullmatch(v):
        raise ValueError(f"{v!r} is not a plain name (letters, digits, `_`, `-`, `.`, starting with a letter or "
                         "digit, at most 128): it names output files")
    return v


PlainName = Annotated[str, AfterValidator(_plain_name)]


class _Strict(BaseModel):
    # nan / inf never pass a float field: every float knob must be a finite number.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class _Placed(_Strict):
    """Where a role's members may run, besides CPUs and GPUs: custom Ray resources (a KubeRay
    worker group declares e.g. `rollout: 1000` in its rayStartParams) and node labels."""

    resources: dict[str, Annotated[float, Field(ge=1e-4, le=1e9)]] = Field(default_factory=dict, description="Custom Ray resources each member reserves, e.g. {rollout: 1} to land on the node group that declares `rollout` (deploy/kuberay).")
    label_selector: dict[str, str] = Field(default_factory=dict, description="Ray node labels a member's node must carry, e.g. {ray.io/node-group: rollout}.")
    memory_gb: float = Field(0.0, ge=0, le=1e5, description="Memory (GiB) each member reserves in Ray's scheduler; 0 = none.")

    @field_validator("resources")
    @classmethod
    def _custom_only(cls, v: dict[str, float]) -> dict[str, float]:
        for k in v:
            if k in ("CPU", "GPU", "memory", "object_store_memory") or not k:
                raise ValueError(f"{k!r} is not a custom resource (use num_cpus / num_gpus / memory_gb)")
        return v


class JobConfig(_Strict):
    name: str = Field("danceopd", min_length=1, max_length=128, pattern=r"^\S+$", description="Job name; used for Ray job ids, metrics labels and logs.")
    seed: int = Field(0, ge=0, le=SEED_MAX, description="Seed of everything: routes, data sampling, noise, model init.")
    output_dir: str = Field("runs/danceopd", min_length=1, description="Checkpoints and logs go here (relative to the cwd), or to object storage: s3://bucket/path, gs://bucket/path or file:///path (README: checkpoints on S3/GCS).")
    local_dir: str = Field("", description="With an object-storage job.output_dir: the local folder the job stages in (checkpoints before upload and after download, metrics.jsonl, TensorBoard, sample grids); empty: danceopd-staging-<hash of the URI> in the system temp dir.")

    @field_validator("output_dir")
    @classmethod
    def _storage_uri(cls, v: str) -> str:
        if "://" in v:
            from danceopd.storage import check_uri

            check_uri(v)
        return v


# ---- backends: one section per model family (a union on `backend.name`) ---------------------
# Each section holds only its family's knobs, so `toy` has no `pretrained` and `sd3` no
# `num_classes`. What a family supports (teacher kinds, condition cache, ...) is declared on its
# backend class (danceopd.backends), imported from `impl` when a check needs it.


class ToyBackendConfig(_Strict):
    impl: ClassVar[str] = "danceopd.backends.toy:ToyBackend"
    name: Literal["toy"] = Field("toy", description="`toy`: analytic vectors with exact Gaussian teachers (tests, demos).")
    dim: int = Field(4, ge=1, le=4096, description="Dimension of the data vectors.")
    hidden: int = Field(128, ge=8, le=8192, description="Width of the student MLP.")
    num_classes: int = Field(4, ge=1, le=1024, description="Prompt classes (`class 0` .. `class N-1`).")


class SimBackendConfig(ToyBackendConfig):
    impl: ClassVar[str] = "danceopd.backends.sim:SimBackend"
    name: Literal["sim"] = Field("sim", description="`sim`: toy compute plus a configured latency per role (sizing a fleet before you rent it).")
    rollout_latency_s: float = Field(0.0, ge=0, le=3600, description="Seconds one rollout batch takes (stands in for GPU time).")
    teacher_latency_s: float = Field(0.0, ge=0, le=3600, description="Seconds one teacher query call takes.")
    learner_latency_s: float = Field(0.0, ge=0, le=3600, description="Seconds one learner micro-batch takes.")
    load_latency_s: float = Field(0.0, ge=0, le=3600, description="Seconds loading a model takes (each student or teacher a worker, replica or rank builds: start-up and restarts).")
    teacher_nan_from: int = Field(0, ge=0, le=10**9, description="Fault injection: every teacher answers NaN from its this-th query call on (counted per teacher replica; 0 = never).")
    teacher_nan_calls: int = Field(0, ge=0, le=10**9, description="Fault injection: how many calls from `teacher_nan_from` on answer NaN (0 = every one after it).")


class ShapesBackendConfig(_Strict):
    impl: ClassVar[str] = "danceopd.backends.shapes:ShapesBackend"
    name: Literal["shapes"] = Field("shapes", description="`shapes`: a tiny SD3 transformer on ShapesBench images.")
    image_size: int = Field(16, ge=8, le=256, description="Image side in pixels.")
    patch_size: int = Field(2, ge=1, le=256, description="Transformer patch size.")
    num_layers: int = Field(2, ge=1, le=64, description="Transformer blocks.")
    num_heads: int = Field(2, ge=1, le=256, description="Attention heads.")
    head_dim: int = Field(16, ge=4, le=1024, description="Attention head width.")
    max_tokens: int = Field(12, ge=2, le=1024, description="Prompt length in tokens (padded/truncated).")

    @model_validator(mode="after")
    def _shapes(self) -> ShapesBackendConfig:
        if self.image_size % self.patch_size:
            raise ValueError(f"backend.patch_size: {self.patch_size} does not divide image_size={self.image_size}")
        if self.num_heads * self.head_dim > 4096:
            raise ValueError(f"backend.head_dim: num_heads x head_dim = {self.num_heads * self.head_dim} exceeds 4096, "
                             "the widest transformer the shapes backend builds")
        return self


class LatentBackendConfig(_Strict):
    """What the diffusers latent-space families (sd3, zimage) share: a pipeline folder."""

    name: str = Field(..., description="The model family.")
    pretrained: str = Field(..., min_length=1, description="Local diffusers pipeline folder (model_index.json) holding the base transformer, VAE, text encoders, tokenizers and scheduler; loaded with from_pretrained, safetensors only.")
    resolution: int = Field(1024, ge=16, le=4096, description="Training bucket side in pixels (square); source images are resized to it preserving aspect ratio, then centre-cropped.")
    max_sequence_length: int | None = Field(None, ge=8, le=4096, description="Text tokens of the long text encoder (T5 / Qwen); None = the family default (sd3: 256, zimage: 512).")
    dtype: Literal["float32", "bfloat16"] = Field("bfloat16", description="Compute dtype of the transformer on a GPU (autocast; rollout states, velocities and log-probs stay fp32). On CPU everything runs in float32.")
    gradient_checkpointing: bool = Field(False, description="Recompute transformer activations in the learner's backward pass (less memory, about a third more compute).")
    cache_dir: str | None = Field(None, min_length=1, description="Folder of the condition cache (text embeddings, source and target latents per row, Arrow IPC); None = `.danceopd-cache/` next to the data file. On a cluster put it on shared storage.")


class SD3BackendConfig(LatentBackendConfig):
    impl: ClassVar[str] = "danceopd.backends.sd3:SD3Backend"
    name: Literal["sd3"] = Field("sd3", description="`sd3`: a diffusers SD3 / SD3.5 pipeline folder.")


class ZImageBackendConfig(LatentBackendConfig):
    impl: ClassVar[str] = "danceopd.backends.zimage:ZImageBackend"
    name: Literal["zimage"] = Field("zimage", description="`zimage`: a diffusers Z-Image pipeline folder (text-to-image, and editing through the Omni path).")


BACKEND_SECTIONS: tuple[type[_Strict], ...] = (ToyBackendConfig, ShapesBackendConfig, SimBackendConfig,
                                               SD3BackendConfig, ZImageBackendConfig)
BACKENDS: dict[str, type[_Strict]] = {c.model_fields["name"].default: c for c in BACKEND_SECTIONS}
BackendConfig = Annotated[Union[BACKEND_SECTIONS], Field(discriminator="name")]  # one list: the tuple above


# The flat backend section's defaults before each family got its own (schema of checkpoints <= v3).
FLAT_DEFAULTS = {"pretrained": None, "resolution": 1024, "max_sequence_length": None, "dtype": "bfloat16",
                 "gradient_checkpointing": False, "cache_dir": None, "dim": 4, "hidden": 128, "num_classes": 4,
                 "image_size": 16, "patch_size": 2, "num_layers": 2, "num_heads": 2, "head_dim": 16, "max_tokens": 12,
                 "rollout_latency_s": 0.0, "teacher_latency_s": 0.0, "learner_latency_s": 0.0}


def _backend_section(raw: Any) -> Any:
    """An old-style (flat) backend section, checked before the union sees it: `name` defaults to
    toy as it always did, and a key of another family fails in one line saying what to remove
    (the union alone would only say `unknown key`)."""
    if not isinstance(raw, dict):
        return raw
    raw = {"name": "toy", **raw}
    own = BACKENDS.get(raw["name"]) if isinstance(raw["name"], str) else None
    if own is None:
        return raw  # the union names the unknown backend
    # A config dumped by an older DanceOPD (a checkpoint's config.yaml) lists every flat field:
    # there, another family's field still at the old shared default was never set: it goes quietly.
    if FLAT_DEFAULTS.keys() <= raw.keys():
        raw = {k: v for k, v in raw.items() if k in own.model_fields or FLAT_DEFAULTS.get(k, object()) != v}
    foreign = {k: [n for n, c in BACKENDS.items() if k in c.model_fields] for k in raw if k not in own.model_fields}
    foreign = {k: owners for k, owners in foreign.items() if owners}  # a key of no family: the union says so
    if foreign:
        key, owners = next(iter(foreign.items()))
        more = f" (and {', '.join(list(foreign)[1:])})" if len(foreign) > 1 else ""
        raise ValueError(f"backend.{key}: unknown key for backend {raw['name']} (a setting of {'/'.join(owners)}); "
                         f"remove it{more}")
    return raw


class LoraConfig(_Strict):
    enabled: bool = Field(False, description="Train LoRA adapters instead of the full student.")
    rank: int = Field(4, ge=1, le=1024, description="LoRA rank.")
    alpha: float = Field(8.0, gt=0, le=1e4, description="LoRA alpha (scale = alpha / rank).")
    target_modules: list[str] = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"], min_length=1, description="Module names that get adapters (peft).")

    @field_validator("target_modules")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        if any(not t.strip() for t in v):
            raise ValueError("an empty module name matches the whole model")
        return v


class StudentConfig(_Strict):
    init: str = Field("random", min_length=1, description="`random` (seeded), `base` (sd3/zimage: the transformer of backend.pretrained) or a `save_pretrained` transformer folder (a full checkpoint) to start from.")
    init_lora: str | None = Field(None, min_length=1, description="sd3/zimage: a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) merged into the initial weights.")
    lora: LoraConfig = Field(default_factory=LoraConfig)


class TeacherConfig(_Placed):
    name: PlainName = Field(..., description="Teacher name referenced by routes (a plain name: letters, digits, `_`, `-`, `.`).")
    kind: Literal["gaussian", "oracle", "pretrained"] = Field("gaussian", description="`gaussian`: exact field of a per-prompt Gaussian (toy); `oracle`: exact field toward the ShapesBench ground truth (shapes); `pretrained`: a diffusers model folder at `path`.")
    path: str | None = Field(None, min_length=1, description="Model folder for `pretrained` teachers (loaded with from_pretrained); sd3/zimage: a transformer folder (a full checkpoint) or a pipeline folder, None = the transformer of backend.pretrained.")
    lora: str | None = Field(None, min_length=1, description="sd3/zimage: a PEFT LoRA folder merged into this teacher's weights (LoRA on the base, or on `path`).")
    adapters: dict[str, str] | None = Field(None, min_length=1, description="sd3/zimage: named PEFT LoRA folders kept as switchable adapters on ONE frozen backbone (memory of one model); each route picks one with `routing.routes[].adapter`.")
    std: float = Field(0.05, ge=1e-4, le=100, description="gaussian/oracle: std of the teacher's target distribution.")
    tasks: list[str] | None = Field(None, min_length=1, description="oracle: ShapesBench tasks this teacher is a specialist of (None = all); on a condition of any other task it ignores the text and answers as for the null condition (the source image of an edit, mid-grey for t2i).")
    seed: int = Field(0, ge=0, le=SEED_MAX, description="gaussian: seed of the per-prompt target means.")
    replicas: int = Field(1, ge=1, le=MAX_WORKERS, description="Teacher actors serving this teacher's routes.")
    max_replicas: int = Field(16, ge=1, le=MAX_WORKERS, description="Most replicas `scale --teachers` may ask for; above it a request is refused.")
    num_cpus: float = Field(0.1, ge=0, le=MAX_RESOURCE, description="CPUs per teacher actor.")
    num_gpus: float = Field(0.0, ge=0, le=MAX_RESOURCE, description="GPUs per teacher actor.")


class RouteConfig(_Strict):
    name: PlainName = Field(..., description="Route name (metrics label, and the file name of its eval grid and `danceopd sample` images): a plain name, letters, digits, `_`, `-`, `.`.")
    teacher: PlainName = Field(..., description="Name of the frozen teacher this route distils.")
    task: PlainName = Field(..., description="Dataset task bucket whose samples this route draws (a plain name; rows of other tasks are not drawn).")
    weight: float = Field(1.0, ge=0, le=1e6, description="Relative probability of this route.")
    requires_source_image: bool = Field(False, description="Edit route: every sample must have a source image.")
    cfg_scale: float | None = Field(None, ge=0, le=MAX_SCALE, description="Teacher CFG scale for this route (default: method.teacher_cfg_scale).")
    adapter: str | None = Field(None, min_length=1, description="Adapter of the teacher's `adapters` this route's field uses (teachers with shared-backbone LoRA adapters).")


class RoutingConfig(_Placed):
    routes: list[RouteConfig] = Field(..., min_length=1, description="Hard routes: route -> (teacher, task, weight).")
    granularity: Literal["update", "sample"] = Field("update", description="`update` (the reference's hard routing): every micro-batch of every learner rank of one optimizer update comes from one route, drawn by weight; `sample`: a route per sample, so micro-batches mix routes.")
    accumulation_groups: list[list[PlainName]] | None = Field(None, min_length=1, description="Route groups that share every optimizer update equally (granularity `update`; the reference's DiffusionOPD/FlowOPD G = M recipe: one group per route, e.g. [t2i, local_edit, global_edit]): each group gets (world_size x grad_accum) / groups of the update's micro-batches, from one route drawn by weight within the group, so the update's loss is the mean over groups of each group's mean loss. Every route in exactly one group (a bare name is a group of one). None: one route per update.")
    max_concurrent_batches: int = Field(16, ge=1, le=1024, description="Rollout batches the router scores at once (threads of the router actor); a batch's routes query their teacher pools concurrently.")
    num_cpus: float = Field(0.1, ge=0.0001, le=MAX_RESOURCE, description="CPUs of the router's scoring actor (Ray mode); never 0, so it does not land on a head started with num-cpus 0.")

    @field_validator("accumulation_groups", mode="before")
    @classmethod
    def _bare_names(cls, v: Any) -> Any:
        # The reference writes one route per group as a flat list: [t2i, edit].
        return [[g] if isinstance(g, str) else g for g in v] if isinstance(v, list) else v

    @model_validator(mode="after")
    def _groups_cover_the_routes(self) -> RoutingConfig:
        if self.accumulation_groups is None:
            return self
        key = "routing.accumulation_groups"
        if self.granularity != "update":
            raise ValueError(f"{key}: needs routing.granularity update (with `sample` every micro-batch mixes routes)")
        weight = {r.name: r.weight for r in self.routes}
        seen: dict[str, int] = {}
        for i, group in enumerate(self.accumulation_groups):
            if not group:
                raise ValueError(f"{key}.{i}: an empty group")
            for name in group:
                if name not in weight:
                    raise ValueError(f"{key}.{i}: unknown route {name!r} (known: {', '.join(weight)})")
                if name in seen:
                    raise ValueError(f"{key}.{i}: route {name!r} is already in group {seen[name]}")
                seen[name] = i
            if sum(weight[n] for n in group) <= 0:
                raise ValueError(f"{key}.{i}: the weights of its routes are all 0, so none can be drawn")
        missing = [n for n in weight if n not in seen]
        if missing:
            # A route in no group would never be trained while its teacher is loaded and served.
            raise ValueError(f"{key}: route {missing[0]!r} is in no group (every route must be in exactly one; "
                             "drop a route from routing.routes to leave it out)")
        return self


class DataConfig(_Strict):
    path: str = Field(..., description="CSV or Parquet with uid, task, prompt, source_image, target_image (paths relative to the file).")


QueryBias = Literal["low_t", "mid_t", "high_t", "uniform", "stratified"]
QueryLaw = list[float]  # P(index = i), one per grid index (each in [0, 1]: MethodConfig._query_bias)
MethodName = Literal["danceopd", "diffusionopd", "flowopd", "offpolicy", "sft", "softmix"]


class MethodConfig(_Strict):
    name: MethodName = Field("danceopd", description="danceopd | diffusionopd | flowopd | offpolicy | sft | softmix.")
    rollout_steps: int = Field(16, ge=1, le=1000, description="N: Euler steps of the student rollout.")
    shift: float = Field(3.0, gt=0, le=100, description="Sigma-schedule shift s.")
    sigma_grid: Literal["auto", "sd3", "zimage"] = Field("auto", description="Sigma grid of the rollout: `sd3` (diffusers' FlowMatchEulerDiscreteScheduler, bit for bit), `zimage` (the reference trainer's Z-Image grid, shift(linspace(1, 0, N+1))[:N] then 0), or `auto`: the backend's model family (toy, shapes and sim: sd3).")
    k: int = Field(1, ge=1, le=1000, description="K: query states per rollout (danceopd, softmix, flowopd).")
    query_bias: QueryBias | QueryLaw = Field("low_t", description="Which trajectory states to query: a named rule (DESIGN §1: index min(int(u N), N - 1), u ~ Beta(5, 2) for `low_t`, (5, 5) `mid_t`, (2, 5) `high_t`, U(0, 1) `uniform`; `stratified`: one uniform draw in each of K strata), or an explicit law, rollout_steps probabilities summing to 1, one per grid index (`danceopd.queries.sigma_matched_law` builds one that visits the noise levels a named rule visits on another grid).")
    teacher_cfg_scale: float = Field(1.0, ge=0, le=MAX_SCALE, description="CFG absorbed on the teacher side (1 = one pass).")
    rollout_cfg_scale: float = Field(1.0, ge=0, le=MAX_SCALE, description="CFG the student uses while rolling out (1 = none).")
    cond_dropout: float = Field(0.0, ge=0, le=1, description="sft: probability that a sample's text is dropped (the source image of an edit is kept), so a teacher trained with sft has a real unconditional branch for CFG.")
    learner_guidance: bool = Field(True, description="With rollout_cfg_scale != 1, the learner trains the guided field the student rolled out with (reference); false regresses the unguided output.")
    uniform_dt: bool = Field(True, description="diffusionopd: the reference's constant weights 0.5/N^2 (true) or dt^2/2 on the shifted grid (false).")
    flowopd_eta: float = Field(0.7, gt=0, le=10, description="flowopd: SDE noise level eta.")
    flowopd_clip: float = Field(1e-4, gt=0, le=1, description="flowopd: PPO ratio clip epsilon.")
    flowopd_groups: int = Field(1, ge=1, le=65536, description="flowopd: rollouts per prompt; >1 normalises advantages within (group, timestep): ours, off by default (the reference has no baseline).")
    flowopd_all_states: bool = Field(True, description="flowopd: train on all N transitions (else K).")
    flowopd_estimator: Literal["kl_gradient", "per_step_detached"] = Field("kl_gradient", description="flowopd: `kl_gradient` descends E[sum KL] (pathwise KL term + reward-to-go surrogate); `per_step_detached` is the reference's form (a row's own detached reward as its advantage), whose expected on-policy gradient is zero.")
    flowopd_reward_scale: Literal["variance", "step_variance"] = Field("variance", description="flowopd: divide the squared mean difference by 2 sigma_t^2, sigma_t the SDE's diffusion coefficient (`variance`, reference), or by 2 sigma_t^2 dt, the step's variance (`step_variance`: the exact Gaussian KL of a step).")
    flowopd_adv_clamp: float = Field(5.0, gt=0, description="flowopd: advantages are clamped to +-this (reference: 5).")

    @field_validator("query_bias", mode="before")
    @classmethod
    def _query_bias(cls, v: Any) -> Any:
        # One line per mistake (the union's own errors name both branches).
        names = get_args(QueryBias)
        if isinstance(v, str):
            if v not in names:
                raise ValueError(f"unknown query bias {v!r} (known: {', '.join(names)}, or a list of index probabilities)")
        elif not isinstance(v, list | tuple):
            raise ValueError(f"{v!r} is neither a query bias ({', '.join(names)}) nor a list of index probabilities")
        else:
            bad = [p for p in v if isinstance(p, bool) or not isinstance(p, int | float) or not 0 <= p <= 1]
            if bad:
                raise ValueError(f"index probability {bad[0]!r} is not a number in [0, 1]")
        return v

    @model_validator(mode="after")
    def _query_law(self) -> MethodConfig:
        law = self.query_bias
        if isinstance(law, str):
            return self
        if len(law) != self.rollout_steps:
            raise ValueError(f"method.query_bias: {len(law)} index probabilities for rollout_steps={self.rollout_steps}; "
                             "give one per grid index")
        if abs(sum(law) - 1) > 1e-6:
            raise ValueError(f"method.query_bias: the index probabilities sum to {sum(law):.6g}, not 1")
        support = sum(p > 0 for p in law)
        if self.k > support:
            raise ValueError(f"method.k: {self.k} query states, but method.query_bias gives a positive probability to "
                             f"only {support} of the {len(law)} grid indices")
        return self


class RolloutConfig(_Placed):
    workers: int = Field(1, ge=1, le=MAX_WORKERS, description="Rollout worker actors.")
    batch_size: int = Field(8, ge=1, le=65536, description="Samples per rollout batch (= per-rank learner micro-batch).")
    early_stop: bool = Field(True, description="Integrate only up to the last queried state.")
    orders_per_worker: int = Field(1, ge=1, le=64, description="Work orders one worker holds at once (running + queued). They travel in calls of up to half of it (at least one), so one call waits on the worker while the one before runs. 2 hides the controller round trip between very short batches; 4 or more also shares Ray's cost per call (about 1-2 ms of CPU on each side) among the orders of a call, for batches of milliseconds; 1 (default) lets new weights reach a worker after its current batch, not after the one queued behind it, which scales better when batches take seconds.")
    num_cpus: float = Field(1.0, ge=0, le=MAX_RESOURCE, description="CPUs per rollout worker.")
    num_gpus: float = Field(0.0, ge=0, le=MAX_RESOURCE, description="GPUs per rollout worker.")
    max_restarts: int = Field(3, ge=0, le=10000, description="Controller restarts of a dead rollout worker.")
    max_workers: int = Field(64, ge=1, le=100_000, description="Most rollout workers `scale` (manual or autoscale) may ask for; above it a request is refused.")


class LearnerConfig(_Placed):
    steps: int = Field(200, ge=1, le=10**9, description="Optimizer steps of the job.")
    lr: float = Field(1e-3, gt=0, le=1, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, le=1, description="AdamW weight decay.")
    grad_clip: float = Field(1.0, ge=0, le=1e6, description="Global grad-norm clip (0 = off).")
    grad_accum: int = Field(1, ge=1, le=1024, description="Micro-batches per optimizer step and rank.")
    max_nonfinite_steps: int = Field(3, ge=1, le=10**6, description="NaN/Inf in a row that fail the job, naming the role and route: learner steps skipped (prediction, loss or gradient norm), or one route's routed batches dropped (its teacher's answer). Each is replaced, so a teacher or student that stays non-finite ends the job instead of looping.")
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage (ray mode).")
    world_size: int = Field(1, ge=1, le=MAX_WORKERS, description="Learner ranks W.")
    num_cpus: float = Field(1.0, ge=0, le=MAX_RESOURCE, description="CPUs per learner rank.")
    num_gpus: float = Field(0.0, ge=0, le=MAX_RESOURCE, description="GPUs per learner rank.")
    dist_backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="torch.distributed backend (auto: nccl with GPUs, else gloo).")
    placement_strategy: Literal["PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD"] = Field("PACK", description="Ray placement strategy of the learner gang (one placement group of world_size bundles); STRICT_PACK keeps every rank on one node (in-node NCCL).")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="`bf16`: the learner's forward runs under bf16 autocast (the loss, rollout states, velocities and log-probs stay fp32); DeepSpeed ZeRO-1..3 also run DeepSpeed's bf16 mode (bf16 working weights and gradients, fp32 master weights and AdamW states), ZeRO-0 and the local learner keep fp32 weights. `fp32`: no autocast (sd3/zimage on a GPU still compute the transformer in backend.dtype).")
    lr_schedule: Literal["constant", "cosine", "linear"] = Field("constant", description="Learning rate over the steps after the warm-up: `constant` (lr), or a `cosine` / `linear` decay from lr to min_lr, reached at step learner.steps.")
    warmup_steps: int = Field(0, ge=0, le=10**9, description="Linear warm-up: step n (1-based) of the first warmup_steps uses lr * n / warmup_steps; 0 = none.")
    min_lr: float = Field(0.0, ge=0, le=1, description="Learning rate the cosine / linear schedule ends at (the last step's); unused by `constant`.")
    ema_decay: float | None = Field(None, gt=0, lt=1, description="Keep an exponential moving average of the trainable weights (fp32; after each applied step ema = decay * ema + (1 - decay) * weights, starting from the initial weights), saved as ema.safetensors in every checkpoint; None = off. eval.weights picks it for evaluation and `danceopd sample`.")

    @model_validator(mode="after")
    def _schedule(self) -> LearnerConfig:
        if self.warmup_steps > self.steps:
            raise ValueError(f"learner.warmup_steps: {self.warmup_steps} is above learner.steps={self.steps}")
        if self.min_lr > self.lr:
            raise ValueError(f"learner.min_lr: {self.min_lr:g} is above learner.lr={self.lr:g} (the schedule decays from lr to it)")
        return self


class SyncConfig(_Strict):
    max_policy_lag: int = Field(0, ge=0, le=10**6, description="Learner version minus sample version allowed (0 = exact on-policy).")
    sync_every: int = Field(1, ge=1, le=10**6, description="Push weights every this many learner steps.")
    transport: Literal["object_store", "collective"] = Field("object_store", description="How weights reach rollout workers.")
    on_stale: Literal["drop", "wait"] = Field("wait", description="`wait`: a rollout worker waits for fresh enough weights before it starts a batch (no waste); `drop`: rollouts never wait and the replay queue drops too-stale batches.")
    timeout_s: float = Field(120.0, gt=0, le=MAX_TIMEOUT_S, description="Timeout of one weight sync.")


class ReplayConfig(_Strict):
    capacity: int = Field(8, ge=1, le=10**6, description="Routed batches the replay queue holds before backpressure.")
    spill_dir: str | None = Field(None, min_length=1, description="Ray mode: the folder Ray spills object-store contents to (queued batches are object refs held by the driver) when danceopd starts the cluster; a joined cluster keeps its own `object_spilling_config`. None = Ray's default (its temp folder).")


class DeadlinesConfig(_Strict):
    """How long each remote wait on the data path may take before it counts as that actor's failure."""

    rollout_s: float = Field(600.0, gt=0, le=MAX_TIMEOUT_S, description="One rollout batch on a worker; past it the worker is restarted and its batches re-issued.")
    route_s: float = Field(900.0, gt=0, le=MAX_TIMEOUT_S, description="Routing one batch (router plus teacher answers); past it the job stops with an error naming the router. Must exceed teacher_s.")
    teacher_s: float = Field(300.0, gt=0, le=MAX_TIMEOUT_S, description="One teacher query call; past it the replica is restarted and the batch re-issued.")
    learner_step_s: float = Field(900.0, gt=0, le=MAX_TIMEOUT_S, description="One learner step over all ranks; past it the job stops with an error naming the learner.")
    placement_s: float = Field(120.0, gt=0, le=86_400, description="A new rollout worker the cluster has not placed within this long is given up (its placement group removed); the job goes on without it.")
    start_s: float = Field(900.0, gt=0, le=86_400, description="A member (rollout worker, teacher replica, router) whose constructor (model load, first weights) has not finished this long after it began failed to start: it is restarted within its role's budget. Counted from the constructor's first line, not from the request (placement, process boot); restarts get the same allowance as the job's start.")

    @model_validator(mode="after")
    def _ordered(self) -> DeadlinesConfig:
        # Routing a batch waits for its teachers' answers: a hung teacher must time out (its replica
        # restarted, the batch re-issued) before the router's deadline turns it into the router's failure.
        if self.teacher_s >= self.route_s:
            raise ValueError(f"deadlines.teacher_s: {self.teacher_s:g} s is not below deadlines.route_s = {self.route_s:g} s "
                             "(routing a batch waits for its teachers: a hung teacher must time out first)")
        return self


class CheckpointConfig(_Strict):
    every: int = Field(50, ge=0, le=10**9, description="Checkpoint every this many steps (0 = only at the end).")
    keep: int = Field(2, ge=1, le=10**6, description="Checkpoints kept; older ones are deleted.")
    stop_grace_s: float = Field(20.0, ge=0, le=3600, description="After SIGTERM/SIGINT or /stop: once the final checkpoint is written, seconds to wait for in-flight batches (and evaluations) to land before exiting anyway; batches still in flight then are dropped as `stopped`. The job exits within the rest of the running learner step, the checkpoint write and this: size RAY_JOB_STOP_WAIT_TIME_S and the pods' terminationGracePeriodSeconds above their sum (docs/operations.md, Stopping).")


class ControlConfig(_Strict):
    host: str = Field("127.0.0.1", description="Bind address of the control API (/health /status /scale /stop); keep loopback: `danceopd status`, `scale` and `stop` call it on the head. An IPv4 or IPv6 address (`::1`, brackets optional) or a host name; `danceopd train` and `validate` refuse one that does not resolve to an address of this machine (`validate --remote` and `submit` check its form only).")
    port: int = Field(0, ge=0, le=65535, description="Control API port; 0 = a free port.")
    metrics_host: str = Field("127.0.0.1", description="Bind address of the controller's Prometheus /metrics, apart from the control API (0.0.0.0 on a cluster head, so Prometheus can scrape it); checked like `host`.")
    metrics_port: int | None = Field(None, ge=0, le=65535, description="Controller Prometheus port; None = $DANCEOPD_METRICS_PORT or 9095, 0 = a free port.")
    stall_after_s: float = Field(600.0, gt=0, le=7 * 86_400, description="Seconds without a learner step (counted from the job's start before the first) after which /health answers 503; exported as danceopd_stall_after_seconds for the stall alert.")
    token_env: str = Field("DANCEOPD_CONTROL_TOKEN", description="Env var holding the token that /scale, /stop and the full /status require (generated when unset).")

    @field_validator("host", "metrics_host")
    @classmethod
    def _unbracketed(cls, v: str) -> str:
        # `[::1]` is how a URL writes an IPv6 address; a bind address is the address itself.
        return v[1:-1] if v.startswith("[") and v.endswith("]") else v


class AutoscaleConfig(_Strict):
    enabled: bool = Field(False, description="Grow/shrink the rollout fleet from learner idle ratio and replay fullness.")
    cluster_autoscaler: Literal["auto", "on", "off"] = Field("auto", description="Whether the Ray cluster adds nodes for pending members (KubeRay enableInTreeAutoscaling): `on` — the nodes alive now bound nothing (members wait up to deadlines.placement_s); `off` — a fixed cluster: a job its nodes can never hold is refused at start; `auto` — read the autoscaler's status from the GCS (best effort; a cluster whose autoscaler has not reported counts as fixed).")
    min_rollout_workers: int = Field(1, ge=1, le=MAX_WORKERS, description="Never fewer rollout workers.")
    max_rollout_workers: int = Field(8, ge=1, le=MAX_WORKERS, description="Never more rollout workers.")
    learner_idle_above: float = Field(0.3, ge=0, le=1, description="Add a worker while the learner idle ratio stays above this.")
    window_steps: int = Field(10, ge=1, le=10**6, description="Learner steps a condition must hold before acting.")
    cooldown_steps: int = Field(10, ge=0, le=10**6, description="Learner steps to wait after a scaling action.")


class EvalConfig(_Placed):
    """Evaluation during training: the student's full ODE on fixed, seeded prompts per route."""

    enabled: bool = Field(True, description="Evaluate the student at the start, every `every` steps and at the end (Ray mode: in an evaluator actor of its own, off the learner's path; local mode: in process).")
    every: int = Field(0, ge=0, le=10**9, description="Evaluate every this many learner steps, besides the start and the end (0 = start and end only).")
    prompts: int = Field(4, ge=1, le=64, description="Prompts per route (with their source images on edit routes), drawn once from the route's bucket with `seed`; one grid row each.")
    seed: int = Field(1234, ge=0, le=SEED_MAX, description="Seed of the evaluation prompts and of their noise (the same every evaluation).")
    teacher: bool = Field(True, description="Also sample each route's teacher from the same noise (a grid column and the teacher_rmse metric); computed once per job in the evaluator, which builds its own teacher fields.")
    num_cpus: float = Field(0.0, ge=0, le=MAX_RESOURCE, description="CPUs of the evaluator actor (Ray mode).")
    num_gpus: float = Field(0.0, ge=0, le=MAX_RESOURCE, description="GPUs of the evaluator actor (Ray mode).")
    timeout_s: float = Field(600.0, gt=0, le=MAX_TIMEOUT_S, description="The end of the job waits this long for the final evaluation, then finishes without it.")
    weights: Literal["online", "ema"] = Field("online", description="Which student weights evaluation and `danceopd sample` / `danceopd eval` use: `online` (the trained weights, which the rollouts use too) or `ema` (the moving average kept with learner.ema_decay; a checkpoint's ema.safetensors).")


_TRACKING_SCHEMES = ("file", "http", "https", "sqlite", "postgresql", "mysql", "databricks")


class LoggingConfig(_Strict):
    tensorboard: bool = Field(False, description="Also write TensorBoard event files to job.output_dir/tensorboard: losses, eval metrics, throughput, lag, idle ratios, and the sample grids as images.")
    mlflow_uri: str | None = Field(None, description="Also log to an MLflow run (the same scalars as TensorBoard, the sample grids as artifacts, the flattened config as params): a file store folder or `file://` URI (a relative folder is taken from the current one, like job.output_dir), or an `http(s)://` tracking server (credentials from MLFLOW_TRACKING_TOKEN / _USERNAME / _PASSWORD). Needs `pip install 'danceopd[tracking]'`. None = off.")
    mlflow_experiment: str | None = Field(None, min_length=1, max_length=256, description="MLflow experiment of the run (created if missing); None = job.name. The run is named by the job's run_id, and a resumed run continues it.")
    wandb: bool | str = Field(False, description="Also log to Weights & Biases: true (project = job.name) or a project name. Used only where the `wandb` package is installed (never by setup) and WANDB_API_KEY is set; otherwise one warning line and the job goes on without it.")
    profile_steps: int = Field(0, ge=0, le=100, description="Record torch.profiler Chrome traces of this many learner steps (rank 0) and rollout batches (worker rollout-0), each after one warm-up call, into job.output_dir/profile/ (`danceopd train --profile N` sets it); 0 = off.")

    @field_validator("mlflow_uri")
    @classmethod
    def _tracking_uri(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", v)
        if scheme and scheme.group(1).split("+")[0].lower() not in _TRACKING_SCHEMES:
            raise ValueError(f"{v!r}: not a tracking URI MLflow serves ({', '.join(s + '://' for s in _TRACKING_SCHEMES)}) "
                             "nor a folder")
        return v

    @field_validator("wandb")
    @classmethod
    def _wandb_project(cls, v: bool | str) -> bool | str:
        if isinstance(v, str) and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", v):
            raise ValueError(f"{v!r} is not a W&B project name (letters, digits, `_`, `-`, `.`)")
        return v


class Config(_Strict):
    job: JobConfig = Field(default_factory=JobConfig)
    backend: BackendConfig = Field(default_factory=ToyBackendConfig, description="The model family's section, chosen by `backend.name`.")
    student: StudentConfig = Field(default_factory=StudentConfig)
    teachers: list[TeacherConfig] = Field(..., min_length=1)
    routing: RoutingConfig
    data: DataConfig
    method: MethodConfig = Field(default_factory=MethodConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    sync: SyncConfig = Field(default_factory=SyncConfig)
    replay: ReplayConfig = Field(default_factory=ReplayConfig)
    deadlines: DeadlinesConfig = Field(default_factory=DeadlinesConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    control: ControlConfig = Field(default_factory=ControlConfig)
    autoscale: AutoscaleConfig = Field(default_factory=AutoscaleConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    # Where the YAML came from, so relative data/model paths resolve against it.
    base_dir: str = Field(".", description="Folder relative paths resolve against (the config file's folder).")

    @field_validator("backend", mode="before")
    @classmethod
    def _backend_keys(cls, v: Any) -> Any:
        return _backend_section(v)

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        names = [t.name for t in self.teachers]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"teachers: duplicate teacher name {sorted(dup)[0]!r}")
        route_names = [r.name for r in self.routing.routes]
        dup = {n for n in route_names if route_names.count(n) > 1}
        if dup:
            raise ValueError(f"routing.routes: duplicate route name {sorted(dup)[0]!r}")
        for i, r in enumerate(self.routing.routes):
            if r.teacher not in names:
                raise ValueError(f"routing.routes.{i}.teacher: unknown teacher {r.teacher!r} (known: {', '.join(names)})")
            adapters = self.teacher(r.teacher).adapters
            if adapters and r.adapter not in adapters:
                raise ValueError(f"routing.routes.{i}.adapter: {r.adapter!r} is not an adapter of teacher {r.teacher!r} "
                                 f"(known: {', '.join(adapters)})")
            if r.adapter and not adapters:
                raise ValueError(f"routing.routes.{i}.adapter: teacher {r.teacher!r} has no adapters")
        if sum(r.weight for r in self.routing.routes) <= 0:
            raise ValueError("routing.routes: all route weights are 0; at least one must be positive")
        if self.method.k > self.method.rollout_steps:
            raise ValueError(f"method.k: {self.method.k} query states exceed rollout_steps={self.method.rollout_steps}")
        from danceopd.backends import backend_class, backends_where  # backends import torch: import here

        b = self.backend
        family = backend_class(b.name)
        if not family.pipeline:
            pipelines = " or ".join(backends_where(lambda c: c.pipeline))
            if self.student.init_lora:
                raise ValueError(f"student.init_lora: the {b.name} backend has no pipeline to merge it into (backend.name={pipelines})")
            if self.student.init == "base":
                raise ValueError(f"student.init: `base` needs a pipeline folder (backend.name={pipelines}, backend.pretrained)")
        for i, t in enumerate(self.teachers):
            if t.kind not in family.teacher_kinds:
                owners = " or ".join(backends_where(lambda c, k=t.kind: k in c.teacher_kinds))
                raise ValueError(f"teachers.{i}.kind: the {b.name} backend takes {' / '.join(family.teacher_kinds)} teachers; "
                                 f"{t.kind!r} teachers need backend.name={owners}")
            if t.kind == "pretrained" and not t.path and not family.pipeline:
                raise ValueError(f"teachers.{i}.path: a pretrained teacher needs a model folder")
            if (t.lora or t.adapters) and not family.pipeline:
                pipelines = " or ".join(backends_where(lambda c: c.pipeline))
                raise ValueError(f"teachers.{i}.{'lora' if t.lora else 'adapters'}: LoRA teachers need backend.name={pipelines}")
            if t.tasks is not None and t.kind != "oracle":
                raise ValueError(f"teachers.{i}.tasks: only oracle teachers take a task list (this one is {t.kind!r})")
        for i, t in enumerate(self.teachers):
            if t.replicas > t.max_replicas:
                raise ValueError(f"teachers.{i}.replicas: {t.replicas} is above max_replicas={t.max_replicas}")
        if self.rollout.workers > self.rollout.max_workers:
            raise ValueError(f"rollout.workers: {self.rollout.workers} is above rollout.max_workers={self.rollout.max_workers}")
        if self.autoscale.min_rollout_workers > self.autoscale.max_rollout_workers:
            raise ValueError("autoscale.min_rollout_workers: larger than max_rollout_workers")
        a = self.autoscale
        if a.enabled and not a.min_rollout_workers <= self.rollout.workers <= a.max_rollout_workers:
            raise ValueError(f"rollout.workers: {self.rollout.workers} is outside the autoscale bounds "
                             f"[{a.min_rollout_workers}, {a.max_rollout_workers}]")
        per_step = self.learner.world_size * self.learner.grad_accum
        if self.replay.capacity < per_step:
            # Spilling does not help: the learner takes a whole step from the queue at once.
            raise ValueError(f"replay.capacity: {self.replay.capacity} is below the batches one learner step needs "
                             f"(learner.world_size x grad_accum = {per_step})")
        groups = self.routing.accumulation_groups
        if groups and per_step % len(groups):
            raise ValueError(f"routing.accumulation_groups: {len(groups)} groups cannot share the {per_step} micro-batches "
                             f"of an update equally (learner.world_size x grad_accum = {per_step}; make it a multiple of {len(groups)})")
        if self.eval.weights == "ema" and self.learner.ema_decay is None:
            raise ValueError("eval.weights: `ema` needs learner.ema_decay (no moving average is kept without it)")
        if self.learner.dist_backend == "nccl" and self.learner.num_gpus < 1:
            raise ValueError("learner.dist_backend: nccl needs a whole GPU per rank (learner.num_gpus >= 1)")
        resources = [("rollout", self.rollout), ("learner", self.learner), ("eval", self.eval)]
        resources += [(f"teachers.{i}", t) for i, t in enumerate(self.teachers)]
        for key, section in resources:
            for res in ("num_cpus", "num_gpus"):
                q = getattr(section, res)
                if 0 < q < 1e-4:  # Ray refuses finer fractions
                    raise ValueError(f"{key}.{res}: {q:g} is finer than Ray's resource precision (0.0001)")
        from danceopd.methods import make_method  # methods import config types: import here

        make_method(self.method).check(self)
        return self

    # ---- paths -----------------------------------------------------------------------------
    def resolve(self, path: str) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() else (Path(self.base_dir) / p)

    def student_source(self) -> str:
        """`student.init` as backends take it: `random`, `base`, or the resolved folder."""
        init = self.student.init
        return init if init in ("random", "base") else str(self.resolve(init))

    @property
    def output_path(self) -> Path:
        if "://" in self.job.output_dir:  # object storage: the job works in a local staging folder
            from danceopd.storage import staging_dir

            return staging_dir(self.job.output_dir, self.job.local_dir)
        p = Path(self.job.output_dir).expanduser()
        return p if p.is_absolute() else Path.cwd() / p

    @property
    def output_location(self) -> str:
        """Where the job's outputs live, as a user names them: the URI on object storage (not its
        local staging folder), else the output folder."""
        return self.job.output_dir if "://" in self.job.output_dir else str(self.output_path)

    def route(self, name: str) -> RouteConfig:
        for r in self.routing.routes:
            if r.name == name:
                return r
        raise ConfigError(f"unknown route {name!r} (known: {', '.join(r.name for r in self.routing.routes)})")

    def teacher(self, name: str) -> TeacherConfig:
        for t in self.teachers:
            if t.name == name:
                return t
        raise ConfigError(f"unknown teacher {name!r}")


# ---- loading --------------------------------------------------------------------------------

def _parse_scalar(text: str) -> Any:
    """`--set` values are YAML scalars, so `3`, `1e-3`, `true`, `null`, `[a, b]` get their types;
    text that is no YAML (`[::1]`, an IPv6 address in brackets) stays text, for its key to judge."""
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, for example learner.lr=3e-4")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node: Any = raw
        for depth, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"--set {key}: {'.'.join(parts[:depth + 1])} is not a valid list index")
                node = node[int(part)]
            else:
                node = node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"--set {key}: {'.'.join(parts[:depth + 1])} is not a section")
        last = parts[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise ConfigError(f"--set {key}: {last} is not a valid list index")
            node[int(last)] = _parse_scalar(value)
        else:
            node[last] = _parse_scalar(value)
    return raw


def _first_error(err: ValidationError) -> str:
    e = err.errors()[0]
    loc = [str(x) for x in e["loc"]]
    # A backend section's errors carry the union's tag (`backend.sd3.dim`): name the key, not the tag.
    tag = loc.pop(1) if loc[:1] == ["backend"] and len(loc) > 1 and loc[1] in BACKENDS else None
    key = ".".join(loc)
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        msg = f"unknown key for backend {tag}" if tag else "unknown key"
    elif e["type"] == "missing" and tag:
        msg = f"required by the {tag} backend"
    elif e["type"] == "union_tag_invalid":
        key, msg = "backend.name", f"unknown backend {e['input'].get('name')!r} (known: {', '.join(BACKENDS)})"
    if msg.startswith(f"{key}.") or not key:  # the message already names its key
        return msg
    return f"{key}: {msg}"


# Keys a config may still hold from an older DanceOPD: each gets one line saying what to do.
RETIRED = {
    ("deadlines", "replay_s"): "the replay queue is the driver's own now (no remote call to time out); remove it",
}


def _check_retired(raw: dict) -> None:
    for (section, key), what in RETIRED.items():
        if isinstance(raw.get(section), dict) and key in raw[section]:
            raise ConfigError(f"{section}.{key}: no longer a setting: {what}")


def config_from_dict(raw: dict, base_dir: str | Path = ".") -> Config:
    raw = dict(raw)
    _check_retired(raw)
    raw.setdefault("base_dir", str(Path(base_dir).resolve()))
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_first_error(err)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    raw = apply_overrides(raw, overrides or [])
    return config_from_dict(raw, base_dir=path.parent)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
