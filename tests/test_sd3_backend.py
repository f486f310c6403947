"""The `sd3` backend on a tiny random pipeline of the real diffusers classes: loading through
`from_pretrained`, the condition cache, LoRA students and teachers, shared-backbone adapters, the
start-up compatibility check and `validate`'s model paths."""

import json
import shutil

import pytest
import torch
import yaml

from danceopd import cond_cache as cc
from danceopd.config import ConfigError, config_from_dict
from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # the tiny diffusers pipelines: seconds per test


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory):
    """A tiny SD3 pipeline with two random LoRA folders, made by the CLI's own functions."""

    from danceopd.backends.latent import write_tiny_loras
    from danceopd.backends.sd3 import write_tiny_sd3

    root = tmp_path_factory.mktemp("sd3") / "pipe"
    write_tiny_sd3(root, seed=0)
    write_tiny_loras(root, ["realism", "style"], seed=0)
    return root


@pytest.fixture
def sd3_raw(tmp_path, tiny_sd3):
    raw = yaml.safe_load((ROOT / "configs" / "sd3_tiny.yaml").read_text())
    shutil.copytree(ROOT / "configs" / "data" / "shapes", tmp_path / "data" / "shapes",
                    ignore=shutil.ignore_patterns(".danceopd-cache"))
    raw["backend"]["pretrained"] = str(tiny_sd3)
    for t in raw["teachers"]:
        if t.get("adapters"):
            t["adapters"] = {k: str(tiny_sd3 / "loras" / k) for k in t["adapters"]}
    raw["job"]["output_dir"] = str(tmp_path / "run")
    return raw


def make(raw, tmp_path):
    from danceopd.backends import make_backend

    cfg = config_from_dict(raw, base_dir=tmp_path)
    return cfg, make_backend(cfg)


def test_tiny_pipeline_loads_through_the_real_pipeline_class(tiny_sd3):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3, use_safetensors=True)
    assert pipe.text_encoder_3 is not None and pipe.transformer.config.in_channels == 4
    img = pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="pt").images
    assert img.shape == (1, 3, 32, 32)


def test_cache_holds_the_pipelines_own_embeddings_and_batches_carry_handles(sd3_raw, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    cfg, backend = make(sd3_raw, tmp_path)
    path, built = backend.build_cache()
    assert built and path.is_file()
    rows = backend._dataset_rows()[:3]
    cond = backend.encode(rows)
    assert cond.shape == (3, cc.HANDLE_DIM)  # 3 floats per row on the wire, not the embeddings
    pipe = StableDiffusion3Pipeline.from_pretrained(cfg.resolve(cfg.backend.pretrained), transformer=None)
    want, _, pooled, _ = pipe.encode_prompt([r.prompt for r in rows], None, None, do_classifier_free_guidance=False,
                                            max_sequence_length=cfg.backend.max_sequence_length)
    got = backend.gather(cond, "cpu")
    torch.testing.assert_close(got["prompt_embeds"], want)
    torch.testing.assert_close(got["pooled"], pooled)
    # CFG's null branch: the empty prompt's embeddings, as the pipeline's negative prompt ""
    neg, _, neg_pooled, _ = pipe.encode_prompt([""], None, None, do_classifier_free_guidance=False,
                                               max_sequence_length=cfg.backend.max_sequence_length)
    null = backend.gather(backend.null_cond(cond), "cpu")
    torch.testing.assert_close(null["prompt_embeds"], neg.expand(3, -1, -1))
    torch.testing.assert_close(null["pooled"], neg_pooled.expand(3, -1))
    assert backend.cache.row_bytes() > 100 * cond[0].numel() * 4


def test_cache_is_reused_when_current_and_rebuilt_never_read_when_stale(sd3_raw, tmp_path):
    cfg, backend = make(sd3_raw, tmp_path)
    path, built = backend.build_cache()
    assert built
    assert backend.build_cache() == (path, False)
    # A prompt changes: a new fingerprint, so a new file; the old one is never opened for it.
    data = tmp_path / "data" / "shapes" / "data.csv"
    data.write_text(data.read_text().replace("a magenta circle", "a yellow circle", 1))
    _, backend2 = make(sd3_raw, tmp_path)
    path2, built2 = backend2.build_cache()
    assert built2 and path2 != path
    with pytest.raises(cc.StaleCacheError):
        cc.ConditionCache(path, backend2.cache_fingerprint(backend2._dataset_rows()))
    # A file under the current name but made for other rows is rebuilt, not used
    shutil.copy(path, path2)
    assert backend2.build_cache()[1] is True


def test_shared_backbone_adapters_give_each_route_its_own_field(sd3_raw, tmp_path, tiny_sd3):
    from danceopd.config import TeacherConfig
    from router.teacher import Teacher

    cfg, backend = make(sd3_raw, tmp_path)
    backend.build_cache()
    shared = Teacher(cfg, "lora_fields")
    assert shared.adapter_of == {"realism": "realism", "style": "style"}
    n_base = sum(p.numel() for n, p in shared.field.model.named_parameters() if "lora_" not in n)
    n_one = sum(p.numel() for p in backend.load_transformer(tiny_sd3).parameters())
    assert n_base == n_one  # ONE backbone for both fields
    rows = backend._dataset_rows()[:2]
    z, s, c = backend.noise([1, 2]), torch.tensor([0.6, 0.3]), backend.encode(rows)
    out = {a: shared.query(z.numpy(), s.numpy(), c.numpy(), 1.0, route=a) for a in ("realism", "style")}
    assert not torch.allclose(torch.from_numpy(out["realism"]), torch.from_numpy(out["style"]), atol=1e-4)
    for name in ("realism", "style"):  # each adapter equals that LoRA merged into its own teacher
        merged = backend.build_teacher(TeacherConfig(name="m", kind="pretrained", lora=str(tiny_sd3 / "loras" / name)), tmp_path)
        torch.testing.assert_close(torch.from_numpy(out[name]), merged.velocity(z, s, c), atol=1e-4, rtol=1e-4)
    again = shared.query(z.numpy(), s.numpy(), c.numpy(), 1.0, route="realism")  # switching back
    torch.testing.assert_close(torch.from_numpy(again), torch.from_numpy(out["realism"]))


def test_student_inits_base_checkpoint_and_lora_merged(sd3_raw, tmp_path, tiny_sd3):
    from danceopd.lora import trainable_state_dict

    raw = json.loads(json.dumps(sd3_raw))
    cfg, backend = make(raw, tmp_path)
    backend.build_cache()
    z, s, c = backend.noise([3]), torch.tensor([0.5]), backend.encode(backend._dataset_rows()[:1])
    student = backend.build_student("base", 0)
    assert set(trainable_state_dict(student)) and all("lora_" in k for k in trainable_state_dict(student))
    base_v = backend.predict(student, z, s, c)  # fresh LoRA: B = 0, so the base's field
    teacher_v = backend.build_teacher(cfg.teachers[0], tmp_path).velocity(z, s, c)
    torch.testing.assert_close(base_v, teacher_v)
    # a full checkpoint folder (save_student) loads back as the student's init
    backend.save_student(student, tmp_path / "ckpt")
    again = backend.build_student(str(tmp_path / "ckpt"), 0)
    torch.testing.assert_close(backend.predict(again, z, s, c), base_v)
    # init_lora: the LoRA merged into the initial weights
    raw["student"]["init_lora"] = str(tiny_sd3 / "loras" / "style")
    cfg2, backend2 = make(raw, tmp_path)
    lora_student = backend2.build_student("base", 0)
    shared = backend2.build_teacher(cfg2.teachers[1], tmp_path)
    shared.use("style")
    torch.testing.assert_close(backend2.predict(lora_student, z, s, c), shared.velocity(z, s, c), atol=1e-4, rtol=1e-4)


def test_validate_names_every_missing_model_path(sd3_raw, tmp_path):
    from danceopd.validate import validate

    raw = json.loads(json.dumps(sd3_raw))
    raw["teachers"][1]["adapters"]["style"] = str(tmp_path / "nope-style")
    raw["student"]["init_lora"] = str(tmp_path / "nope-init")
    cfg = config_from_dict(raw, base_dir=tmp_path)
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    msg = str(e.value)
    assert "\n" not in msg and "student.init_lora" in msg and "teachers.1.adapters.style" in msg and "nope-style" in msg


def _variant(tiny_sd3, tmp_path, name, edit):
    """A copy of the tiny pipeline with one config entry changed."""
    dst = tmp_path / name
    shutil.copytree(tiny_sd3, dst)
    path, key, value = edit
    c = json.loads((dst / path).read_text())
    c[key] = value
    (dst / path).write_text(json.dumps(c))
    return dst


@pytest.mark.parametrize("edit,what", [
    (("scheduler/scheduler_config.json", "shift", 1.0), "scheduler"),
    (("transformer/config.json", "patch_size", 1), "patch size"),
    (("text_encoder_3/config.json", "d_ff", 64), "text encoders"),
])
def test_incompatible_teacher_is_one_line_before_anything_starts(sd3_raw, tmp_path, tiny_sd3, edit, what):
    from danceopd.validate import validate

    raw = json.loads(json.dumps(sd3_raw))
    raw["teachers"][0]["path"] = str(_variant(tiny_sd3, tmp_path, "other", edit))
    with pytest.raises(ConfigError) as e:
        validate(config_from_dict(raw, base_dir=tmp_path))
    assert e.value.args[0].startswith("teachers.0.path:") and what in str(e.value) and "\n" not in str(e.value)


def test_edit_routes_are_refused_on_sd3(sd3_raw, tmp_path):
    from danceopd.validate import validate

    raw = json.loads(json.dumps(sd3_raw))
    raw["routing"]["routes"][1].update(task="local_edit", requires_source_image=True)
    with pytest.raises(ConfigError, match="no image-conditioned path"):
        validate(config_from_dict(raw, base_dir=tmp_path))


@pytest.mark.ray
def test_ray_run_with_cfg_absorption_saves_a_lora_checkpoint_and_resumes(ray_local, sd3_raw, tmp_path, tiny_sd3):
    from danceopd.checkpoint import latest_checkpoint, list_checkpoints, load_json, load_tensors
    from danceopd.lora import load_lora_folder, load_trainable_state_dict
    from services.loop import train
    from tests.conftest import cfg_for

    assert sd3_raw["routing"]["routes"][0]["cfg_scale"] == 3.0  # CFG absorbed on the teacher side
    # one rollout worker and no evaluator: two fewer pipeline loads per job, nothing asserted of them
    over = dict(checkpoint__every=2, checkpoint__keep=3, sync__max_policy_lag=0, rollout__workers=1, eval__enabled=False)
    full = cfg_for(sd3_raw, tmp_path, "full", learner__steps=4, **over)
    summary = train(full, mode="ray", show_progress=False)
    assert summary["steps"] == 4
    _, backend = make(sd3_raw, tmp_path)
    student = backend.build_student("base", 0)
    adapter_bytes = sum(p.numel() * 4 for p in student.parameters() if p.requires_grad)
    assert summary["sync_bytes"] == adapter_bytes  # LoRA-only weight sync: adapter-sized pushes
    assert adapter_bytes * 10 < sum(p.numel() * 4 for p in student.parameters())
    # resumed from the full run's step-2 checkpoint (into a folder of its own): the same step 4
    step2 = next(p for p in list_checkpoints(full.output_path) if load_json(p / "state.json")["step"] == 2)
    resumed = cfg_for(sd3_raw, tmp_path, "resumed", learner__steps=4, **over)
    train(resumed, mode="ray", resume_from=step2, show_progress=False)
    ckpt = latest_checkpoint(resumed.output_path)
    assert load_json(ckpt / "state.json")["step"] == 4
    wa = load_tensors(latest_checkpoint(full.output_path) / "model.safetensors")
    wb = load_tensors(ckpt / "model.safetensors")
    assert wa and all("lora_" in k for k in wa)  # a LoRA checkpoint: adapters only
    assert any(v.abs().sum() > 0 for k, v in wa.items() if "lora_B" in k)  # it learned something
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-6)
    # the checkpoint's PEFT folder is the same student: merged onto the base it predicts the same
    load_trainable_state_dict(student, wb)
    merged = load_lora_folder(backend.load_transformer(tiny_sd3), ckpt / "lora", merge=True)
    z, s, c = backend.noise([5]), torch.tensor([0.4]), backend.encode(backend._dataset_rows()[:1])
    torch.testing.assert_close(backend.predict(merged, z, s, c), backend.predict(student, z, s, c), atol=1e-5, rtol=1e-5)


def test_bf16_compute_keeps_fp32_velocities_and_teacher_weights_halve(sd3_raw, tmp_path):
    """The GPU path (bf16 autocast, bf16 frozen teacher weights) exercised with CPU autocast."""
    cfg, backend = make(sd3_raw, tmp_path)
    backend.build_cache()
    z, s, c = backend.noise([7, 8]), torch.tensor([0.7, 0.2]), backend.encode(backend._dataset_rows()[:2])
    fp32 = backend.build_teacher(cfg.teachers[0], tmp_path).velocity(z, s, c)
    backend.compute_dtype = torch.bfloat16
    teacher = backend.build_teacher(cfg.teachers[0], tmp_path)
    assert {p.dtype for p in teacher.model.parameters()} == {torch.bfloat16}
    v = teacher.velocity(z, s, c)
    assert v.dtype == torch.float32 and z.dtype == torch.float32
    assert not torch.equal(v, fp32)  # it did compute in bf16...
    torch.testing.assert_close(v, fp32, atol=0.1, rtol=0.05)  # ...to bf16 precision
    student = backend.build_student("base", 0)  # trainable student: fp32 master weights
    assert {p.dtype for p in student.parameters() if p.requires_grad} == {torch.float32}
    assert backend.predict(student, z, s, c).dtype == torch.float32


def test_gradient_checkpointing_gives_the_same_gradients(sd3_raw, tmp_path):
    grads = {}
    for on in (False, True):
        raw = json.loads(json.dumps(sd3_raw))
        raw["backend"]["gradient_checkpointing"] = on
        raw["student"]["lora"]["enabled"] = False
        _, backend = make(raw, tmp_path)
        backend.build_cache()
        model = backend.build_student("base", 0).train()
        assert model.is_gradient_checkpointing is on
        z, s, c = backend.noise([1, 2]), torch.tensor([0.5, 0.5]), backend.encode(backend._dataset_rows()[:2])
        backend.predict(model, z, s, c).square().mean().backward()
        grads[on] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    torch.testing.assert_close(grads[True], grads[False])


@pytest.mark.parametrize("name,keys", [
    ("sd35_medium", ("backend.pretrained", "teachers.1.adapters.realism", "teachers.1.adapters.style", "data.path")),
    ("zimage", ("backend.pretrained", "teachers.1.path", "teachers.2.lora", "data.path")),
])
def test_cluster_config_lists_every_placeholder_path_in_one_line(name, keys):
    from danceopd.config import load_config
    from danceopd.validate import validate

    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    assert cfg.backend.dtype == "bfloat16" and cfg.learner.num_gpus >= 1 and cfg.student.lora.enabled
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    msg = str(e.value)
    for key in keys:
        assert key in msg, key
    assert "\n" not in msg


def test_submit_ships_the_pipeline_and_lora_folders(sd3_raw, tmp_path, tiny_sd3):
    from services.control.jobs import config_inputs

    shutil.copytree(tiny_sd3, tmp_path / "models" / "pipe")
    raw = json.loads(json.dumps(sd3_raw))
    raw["backend"]["pretrained"] = "models/pipe"
    raw["teachers"][1]["adapters"] = {"realism": "models/pipe/loras/realism", "style": "/abs/style"}
    raw["data"]["path"] = "data/shapes/data.csv"
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    from danceopd.config import load_config

    local, absolute = config_inputs(path, load_config(path))
    assert tmp_path / "models" / "pipe" in local and tmp_path / "models" / "pipe" / "loras" / "realism" in local
    assert "/abs/style" in absolute


def test_cache_command_builds_then_reports_up_to_date(sd3_raw, tmp_path):
    from typer.testing import CliRunner

    from services.cli import app

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(sd3_raw))
    first = CliRunner().invoke(app, ["cache", str(path)])
    assert first.exit_code == 0 and first.output.strip().startswith("built: "), first.output
    again = CliRunner().invoke(app, ["cache", str(path)])
    assert again.exit_code == 0 and again.output.strip().startswith("up to date: ")


@pytest.mark.ray
def test_cache_command_in_ray_mode_encodes_in_an_actor_not_in_this_process(ray_local, sd3_raw, tmp_path, monkeypatch):
    """`danceopd cache --mode ray` (on the session's cluster): an actor with the rollout role's
    placement encodes the rows, this process loads no encoder; once current, a no-op (no actor)."""
    import time

    import ray._private.state as gcs
    from typer.testing import CliRunner

    from danceopd.backends import backend_class
    from services.cli import app

    loads = []
    cls = backend_class("sd3")
    load = cls._load_encoders
    monkeypatch.setattr(cls, "_load_encoders", lambda self: (loads.append(self), load(self))[1])
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(sd3_raw))
    before = set(gcs.actors())
    first = CliRunner().invoke(app, ["cache", str(path), "--mode", "ray"])
    lines = first.output.strip().splitlines()
    assert first.exit_code == 0 and lines[-1].startswith("built: "), first.output
    assert any(ln.startswith("building the condition cache on ") for ln in lines), first.output
    assert loads == []  # encoded elsewhere
    def builders():
        return [a["State"] for k, a in gcs.actors().items() if k not in before and a["ActorClassName"].endswith("ConditionCacheBuilder")]

    for _ in range(50):  # ray.kill is asynchronous
        if builders() == ["DEAD"]:
            break
        time.sleep(0.1)
    assert builders() == ["DEAD"]  # removed once built: its resources (a GPU) go back
    again = CliRunner().invoke(app, ["cache", str(path), "--mode", "ray"])
    assert again.exit_code == 0 and again.output.strip() == f"up to date: {lines[-1].removeprefix('built: ')}"
    assert len(gcs.actors()) == len(before) + 1  # current: no actor started


def test_cache_fingerprint_is_the_same_where_ray_unpacks_a_copy(sd3_raw, tmp_path, tiny_sd3):
    """Another node sees the job's files under another absolute path (with other mtimes): same rows and
    encoders must give the same fingerprint there, and a changed image must not."""
    import os

    _, backend = make(sd3_raw, tmp_path)
    rows = backend._dataset_rows()
    fp = backend.cache_fingerprint(rows)
    copy = tmp_path / "node2"
    shutil.copytree(tmp_path / "data", copy / "data")
    shutil.copytree(tiny_sd3, copy / "pipe")
    for p in copy.rglob("*"):
        os.utime(p, (1, 1))
    raw = json.loads(json.dumps(sd3_raw))
    raw["backend"]["pretrained"] = str(copy / "pipe")
    raw["teachers"][1]["adapters"] = {k: str(copy / "pipe" / "loras" / k) for k in ("realism", "style")}
    _, there = make(raw, copy)
    assert there.cache_fingerprint(there._dataset_rows()) == fp
    img = next(r.target_image for r in there._dataset_rows() if r.target_image is not None)
    from PIL import Image

    Image.new("RGB", (16, 16), (1, 2, 3)).save(img)
    assert there.cache_fingerprint(there._dataset_rows()) != fp


def test_sample_command_on_a_lora_checkpoint_with_a_new_prompt(sd3_raw, tmp_path):
    """`danceopd sample` on an sd3 LoRA checkpoint: a prompt that is no dataset row is encoded on
    demand (the cache holds only the dataset), and the images decode through the VAE."""
    from typer.testing import CliRunner

    from danceopd.checkpoint import latest_checkpoint
    from services.cli import app
    from services.loop import train
    from tests.conftest import cfg_for

    cfg = cfg_for(sd3_raw, tmp_path, "local", learner__steps=2, eval__enabled=False)
    train(cfg, mode="local", show_progress=False)
    ckpt = latest_checkpoint(cfg.output_path)
    out = tmp_path / "samples"
    res = CliRunner().invoke(app, ["sample", str(ckpt), "--route", "realism", "--prompt", "a purple moon over water",
                                   "--n", "2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) >= 2
    from PIL import Image

    assert Image.open(pngs[0]).size[0] >= 32  # decoded pixels at the bucket, not latents


def test_a_rollout_reads_the_condition_cache_once_not_per_euler_step(sd3_raw, tmp_path, monkeypatch):
    """The text embeddings a rollout's transformer reads are gathered (and, on a GPU, copied to
    it) once per rollout: N and 2N steps read the cache as often."""
    from danceopd.dataset import Dataset
    from danceopd.work import WorkItem, WorkOrder
    from rollout_workers.worker import RolloutWorker

    reads = []
    real = cc.ConditionCache.get
    monkeypatch.setattr(cc.ConditionCache, "get", lambda self, idx, field: reads.append(field) or real(self, idx, field))
    counts = []
    for n in (4, 8):
        raw = {**sd3_raw, "method": {**sd3_raw["method"], "rollout_steps": n}, "rollout": {**sd3_raw["rollout"], "early_stop": False}}
        cfg, backend = make(raw, tmp_path)
        backend.build_cache()
        worker = RolloutWorker(cfg)
        rows = Dataset.load(cfg.resolve(cfg.data.path)).rows[:3]
        order = WorkOrder(0, tuple(WorkItem(i, "t2i_cfg", r, 10 + i, i) for i, r in enumerate(rows)))
        reads.clear()
        worker.rollout(order)
        counts.append(len(reads))
    assert counts[0] == counts[1] > 0, f"cache reads grow with the steps: {counts}"
